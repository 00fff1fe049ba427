"""The generation endpoints, from HTTP request to HTTP response.

    Content-Type (415) -> read body (413; 408 past the read timeout) -> parse (400) -> model (404)
      -> field checks, number of prompts and prompt length bound (400) -> backend ready (503)
      -> admit the request, its sequences (n x prompts) and prompt bytes (429)
      -> tokenize in a tokenizer thread (400) -> trade the prompt bytes for prompt tokens (429)
      -> start the engine requests -> first delta (RequestFailed: its own status)
      -> stream SSE, or collect and answer JSON

Until the first delta arrives the answer is still an ordinary HTTP status, so failures before
the first token reach clients as errors they can retry. A client that leaves at any point aborts
its engine requests at once: non-streaming and first-delta waits race a disconnect watcher; a
stream is cancelled by Starlette when the client goes away. `Generation.close()` runs on every
exit, so the admission counters always return to zero.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from services.common.errors import InvalidRequestError
from services.common.images import ValidatedImages
from services.gateway.admission import AdmissionController, AdmissionRejected, AdmissionTicket
from services.gateway.backend import Backend, PromptImage, RequestFailed
from services.gateway.config import GatewayConfig
from services.gateway.errors import ApiError, ClientGone, internal_error, parse_error
from services.gateway.generation import Arrival, Generation
from services.gateway.image_fetch import RemoteFetcher
from services.gateway.images import ImageReferences, load_images, reference_scope
from services.gateway.length_bound import LengthBound
from services.gateway.metrics import GatewayMetrics
from services.gateway.prompts import (
    ModelLimits,
    check_before_tokenizing,
    check_num_prompts,
    echo_prompts,
    image_sources,
    num_sequences,
    prompt_text_bytes,
    to_sampling_spec,
    tokenize_chat,
    tokenize_chat_with_images,
    tokenize_completion,
)
from services.gateway.protocol import ChatCompletionRequest, CompletionRequest
from services.gateway.responses import (
    ChatFormatter,
    ChoiceState,
    CompletionFormatter,
    Formatter,
    ResponseHeader,
    UsageCounter,
    add_prompt_logprobs,
)
from services.gateway.tokenizer_pool import TokenizerPool
from services.gateway.tool_parsers import resolve_parser
from services.gateway.tools import ToolPlan, check_tool_parser, tool_plan, tool_sampling

logger = logging.getLogger(__name__)

T = TypeVar("T")
GenerationRequest = ChatCompletionRequest | CompletionRequest

PARSE_INLINE_MAX_BYTES = 256 * 1024  # larger bodies are parsed off the event loop


def check_json_content_type(request: Request) -> None:
    """415 unless the body is declared `application/json` (charset, if given, utf-8: JSON is UTF-8)."""
    media_type, *params = (part.strip().lower() for part in request.headers.get("content-type", "").split(";"))
    charsets = [value.strip('"') for name, _, value in (p.partition("=") for p in params) if name.strip() == "charset"]
    if media_type != "application/json" or any(charset not in ("utf-8", "utf8") for charset in charsets):
        raise ApiError(
            415,
            "Unsupported Content-Type: the body must be JSON, sent with 'Content-Type: application/json'.",
            code="unsupported_media_type",
        )


async def read_body(request: Request, max_body_bytes: int, timeout_s: float) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed the limit, and with 408 when
    it has not all arrived within `timeout_s` (the answer then closes the connection: the body was
    not read to its end)."""
    try:
        return await asyncio.wait_for(_read_body(request, max_body_bytes), timeout_s)
    except asyncio.TimeoutError as exc:  # TimeoutError itself only from Python 3.11
        raise ApiError(
            408,
            f"The request body did not arrive within {timeout_s:g} seconds.",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from exc


async def _read_body(request: Request, max_body_bytes: int) -> bytes:
    too_large = ApiError(
        413, f"The request body exceeds the limit of {max_body_bytes} bytes.", code="request_too_large"
    )
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "The Content-Length header is not a number.")
        if int(declared) > max_body_bytes:
            raise too_large
    chunks, num_bytes = [], 0
    try:
        async for chunk in request.stream():
            num_bytes += len(chunk)
            if num_bytes > max_body_bytes:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise ClientGone() from exc
    return b"".join(chunks)


async def read_json(http_request: Request, config: GatewayConfig, parse: Callable[[bytes], T]) -> T:
    """The body, declared JSON (415), read within the limits (413, 408) and parsed by `parse`, off the
    event loop when large; a pydantic ValidationError becomes a 400 naming the field."""
    check_json_content_type(http_request)
    body = await read_body(http_request, config.max_body_bytes, config.body_read_timeout_s)
    try:
        if len(body) <= PARSE_INLINE_MAX_BYTES:
            return parse(body)
        return await asyncio.to_thread(parse, body)
    except ValidationError as exc:
        raise parse_error(exc) from exc


def admission_refused(exc: AdmissionRejected, metrics: GatewayMetrics, retry_after_s: int) -> ApiError:
    """A refused admission as the client sees it: 429 with Retry-After, counted by the full budget."""
    metrics.count_rejection(exc.reason)
    return ApiError(429, str(exc), code="rate_limit_exceeded", headers={"Retry-After": str(retry_after_s)})


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """The awaitable's result, or ClientGone if the client disconnects first (the work is cancelled)."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watcher):
            task.cancel()
        await asyncio.gather(work, watcher, return_exceptions=True)
    if not work.cancelled():
        return work.result()
    raise ClientGone()


class _EventStream(StreamingResponse):
    """A text/event-stream response that runs `on_close` however the response ends."""

    def __init__(
        self, events: AsyncIterator[str], on_close: Callable[[], Awaitable[None]], headers: dict[str, str]
    ) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


class GenerationService:
    """Serves /v1/chat/completions and /v1/completions against one backend (and /v1/responses, as a chat
    request its own service builds: `serve`)."""

    def __init__(
        self,
        config: GatewayConfig,
        backend: Backend,
        admission: AdmissionController,
        metrics: GatewayMetrics,
        tokenizers: TokenizerPool,
    ) -> None:
        self._config = config
        self._backend = backend
        self._admission = admission
        self._metrics = metrics
        self._tokenizers = tokenizers
        self._limits = ModelLimits(
            max_model_len=backend.max_model_len,
            vocab_size=backend.vocab_size,
            length_bound=LengthBound.from_tokenizer(backend.tokenizer),
        )
        self._image_fetcher = RemoteFetcher()  # one TLS context for every remote image
        self._validated_images = ValidatedImages()  # bytes seen and checked before are not decoded again
        self._image_references = ImageReferences(config.image_reference_cache_bytes)  # images named by uuid
        # reads tool_choice "auto" outputs; None: the model's format is unknown, "auto" is refused
        self._tool_parser = resolve_parser(config.tool_call_parser, backend.tokenizer, backend.processor)

    async def chat(self, http_request: Request) -> Response:
        return await self._serve(http_request, ChatCompletionRequest, "chatcmpl")

    async def completions(self, http_request: Request) -> Response:
        return await self._serve(http_request, CompletionRequest, "cmpl")

    # ------------------------------------------------------------------------------------------

    async def _serve(self, http_request: Request, schema: type[GenerationRequest], id_prefix: str) -> Response:
        arrival = Arrival(request_id=f"{id_prefix}-{uuid.uuid4().hex}", arrival_s=time.monotonic())
        request = await self._parse(http_request, schema)
        return await self.serve(http_request, arrival, request, self._formatter(request, arrival.request_id))

    async def serve(
        self, http_request: Request, arrival: Arrival, request: GenerationRequest, formatter: Formatter
    ) -> Response:
        """A parsed request from its checks on, answered in `formatter`'s shape: the pipeline of the
        module docstring, which /v1/responses shares (services.gateway.responses_api)."""
        self._check(request)
        ticket = self._admit(request)
        generation: Generation | None = None
        handed_over = False
        try:
            prompts, images = await self._tokenize(request, http_request.headers.get("authorization"))
            try:
                ticket.tokenized(sum(len(p) for p in prompts))
            except AdmissionRejected as exc:
                raise self._rejected(exc) from exc
            await self._prepare_echo(request, prompts, formatter)
            generation = Generation(
                self._backend,
                arrival,
                prompts,
                tool_sampling(to_sampling_spec(request), self.tool_plan_for(request)),
                request.cache_salt,
                ticket,
                self._metrics,
                self._config.abort_timeout_s,
                images,
            )
            generation.start()
            if request.stream:
                response = await self._stream(http_request, generation, formatter)
                handed_over = True
                return response
            return await self._complete(http_request, generation, formatter)
        finally:
            if not handed_over:
                if generation is not None:
                    await generation.close()
                ticket.release()

    async def _parse(self, http_request: Request, schema: type[GenerationRequest]) -> GenerationRequest:
        return await read_json(http_request, self._config, schema.model_validate_json)

    def _check(self, request: GenerationRequest) -> None:
        if request.model != self._config.served_model_name:
            raise model_not_found(request.model)
        try:
            request.check(self._config.max_n)
            check_num_prompts(request, self._config.max_prompts_per_request)
            check_before_tokenizing(request, self._limits)
            if isinstance(request, ChatCompletionRequest):
                check_tool_parser(request, self._tool_parser)
        except InvalidRequestError as exc:
            raise ApiError.invalid(exc) from exc
        if not self._backend.is_ready():
            self._metrics.count_rejection("not_ready")
            raise ApiError(
                503,
                "The model is not ready yet; please retry shortly.",
                code="service_unavailable",
                headers=self._retry_after(),
            )

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self._config.retry_after_s)}

    def _admit(self, request: GenerationRequest) -> AdmissionTicket:
        try:
            return self._admission.admit(num_sequences(request), prompt_text_bytes(request))
        except AdmissionRejected as exc:
            raise self._rejected(exc) from exc

    def _rejected(self, exc: AdmissionRejected) -> ApiError:
        return admission_refused(exc, self._metrics, self._config.retry_after_s)

    async def _tokenize(
        self, request: GenerationRequest, credential: str | None
    ) -> tuple[list[list[int]], list[PromptImage]]:
        """The prompts' token ids, and the images of a vision-language chat (fetched and checked here;
        images named by uuid are the ones this credential sent under it)."""
        tokenizers = self._tokenizers
        try:
            if not isinstance(request, ChatCompletionRequest):
                return await tokenizers.run_with_tokenizer(
                    tokenize_completion, request, self._limits, self._config.max_prompts_per_request
                ), []
            processor = self._backend.processor
            sources = image_sources(request.messages) if processor is not None else []
            if not sources:  # a text model refuses image parts in tokenize_chat
                return [await tokenizers.run_with_tokenizer(tokenize_chat, request, self._limits)], []
            loaded = await load_images(
                sources,
                self._config.image_policy,
                fetcher=self._image_fetcher,
                validated=self._validated_images,
                references=self._image_references,
                scope=reference_scope(credential, request.cache_salt),
            )
            token_ids, images = await tokenizers.run_with_processor(
                tokenize_chat_with_images, request, self._limits, loaded
            )
            return [token_ids], images
        except InvalidRequestError as exc:
            raise ApiError.invalid(exc) from exc

    def _formatter(self, request: GenerationRequest, request_id: str) -> Formatter:
        header = ResponseHeader(
            request_id=request_id,
            model=self._config.served_model_name,
            created=int(time.time()),
            with_logprobs=request.num_logprobs is not None,
            include_usage=request.include_usage,
            num_top_logprobs=request.num_logprobs or 0,
            num_prompt_logprobs=request.prompt_logprobs,
            num_choices_per_prompt=request.num_choices_per_prompt,
        )
        if isinstance(request, ChatCompletionRequest):
            return ChatFormatter(header, self.tool_plan_for(request))
        return CompletionFormatter(header)

    def tool_plan_for(self, request: GenerationRequest) -> ToolPlan | None:
        """How a chat's output becomes tool calls (services.gateway.tools); None: plain text. Public for
        /v1/responses, whose formatter reads the output with it."""
        return tool_plan(request, self._tool_parser) if isinstance(request, ChatCompletionRequest) else None

    async def _prepare_echo(self, request: GenerationRequest, prompts: list[list[int]], formatter: Formatter) -> None:
        """`echo`: the completions formatter puts each prompt's text (and tokens) before its choices'."""
        if isinstance(request, CompletionRequest) and request.echo and isinstance(formatter, CompletionFormatter):
            formatter.echo = await self._tokenizers.run_with_tokenizer(echo_prompts, request, prompts)

    # ------------------------------------------------------------------------------------------

    async def _complete(self, http_request: Request, generation: Generation, formatter: Formatter) -> Response:
        choices = [ChoiceState(index=i) for i in range(generation.num_choices)]
        usage = UsageCounter()

        async def collect() -> None:
            while (item := await _next_delta(generation, self._config.retry_after_s)) is not None:
                first_choice, delta = item
                usage.add(first_choice, delta)
                add_prompt_logprobs(choices, first_choice, generation.num_choices_per_prompt, delta)
                for completion in delta.completions:
                    choices[first_choice + completion.index].add(completion)

        await until_disconnected(http_request, collect())
        body = formatter.response(choices, usage.usage())
        return _json(body, formatter.header.request_id)

    async def _stream(self, http_request: Request, generation: Generation, formatter: Formatter) -> Response:
        first = await until_disconnected(http_request, _next_delta(generation, self._config.retry_after_s))
        events = _stream_events(first, generation, formatter)
        return _EventStream(events, on_close=generation.close, headers={"X-Request-Id": formatter.header.request_id})


async def _next_delta(generation: Generation, retry_after_s: int | None = None):
    """The next delta; a backend refusal becomes the ApiError it describes (with Retry-After, given
    `retry_after_s`, when it is a 429 or 503 answered before the response starts)."""
    try:
        return await generation.next_delta()
    except RequestFailed as exc:
        raise ApiError.from_request_error(exc.error, retry_after_s) from exc


async def _stream_events(first, generation: Generation, formatter: Formatter) -> AsyncIterator[str]:
    choices = [ChoiceState(index=i) for i in range(generation.num_choices)]
    usage = UsageCounter()
    try:
        for event in formatter.stream_start(generation.num_choices):
            yield event
        item = first
        while item is not None:
            first_choice, delta = item
            usage.add(first_choice, delta)
            add_prompt_logprobs(choices, first_choice, generation.num_choices_per_prompt, delta)
            for completion in delta.completions:
                for event in formatter.stream_delta(choices[first_choice + completion.index], completion):
                    yield event
            item = await _next_delta(generation)
        ending = formatter.stream_end(usage.usage())
    except ApiError as exc:
        ending = formatter.stream_error(exc.info)
    except Exception:
        logger.exception("stream %s failed", formatter.header.request_id)
        ending = formatter.stream_error(internal_error().info)
    for event in ending:
        yield event


def _json(body: BaseModel, request_id: str) -> Response:
    return Response(content=body.model_dump_json(), media_type="application/json", headers={"X-Request-Id": request_id})
