"""A streaming client for OpenAI-compatible endpoints that times every chunk.

Each request is POSTed with `stream: true` and `stream_options.include_usage` to
/v1/chat/completions or /v1/completions, over one pooled httpx.AsyncClient (no connection limit:
a cap would queue requests inside the client and inflate their TTFT; proxies from the environment
are ignored and redirects not followed, so traffic goes only to the base URL given). The
server-sent events are parsed here, line by line, and each `data:` line is timed with
time.perf_counter when it arrives:

    sent        first content   ...   content     [DONE]
     |--- ttft ---|--- itl[0] ---|...|-- itl[-1] --|
     |------------------------ e2e ----------------|

A content chunk is one whose choice carries non-empty text (`delta.content`,
`delta.reasoning_content` or `text`). The usage in the last chunk gives the token counts; when
completion_tokens differs from the number of content chunks (a server that packs tokens, or drops
some), the result says so (usage_mismatch), and TPOT uses the usage count.

Fixed-length outputs: `ignore_eos: true` and `min_tokens` = `max_tokens` (vLLM's extras) unless
RequestOptions.fixed_output_len is off.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadgen import records
from loadgen.records import RequestResult, RequestSpec

ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
CONNECT_TIMEOUT_S = 10.0
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str  # scheme://host:port, with or without a trailing /v1
    model: str
    endpoint: str = "chat"  # chat or completions
    api_key: str | None = None

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        base = base[: -len("/v1")] if base.endswith("/v1") else base
        return base + ENDPOINT_PATHS[self.endpoint]


@dataclass(frozen=True)
class RequestOptions:
    fixed_output_len: bool = True  # send ignore_eos and min_tokens = max_tokens
    prompt_token_ids: bool = False  # completions: send the prompt as token ids
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every payload


Turn = tuple[str, str]  # (user message, assistant reply) of an earlier turn


def build_payload(target: Target, options: RequestOptions, spec: RequestSpec, history: list[Turn]) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": target.model,
        "max_tokens": spec.num_output_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if options.fixed_output_len:
        payload.update(ignore_eos=True, min_tokens=spec.num_output_tokens)
    if target.endpoint == "chat":
        payload["messages"] = _messages(spec, history)
    elif spec.images:
        raise ValueError("images need the chat endpoint")
    elif options.prompt_token_ids and not history:
        payload["prompt"] = spec.prompt.token_ids
    else:
        payload["prompt"] = "".join(user + reply for user, reply in history) + spec.prompt.text
    payload.update(options.extra_body)
    return payload


def _messages(spec: RequestSpec, history: list[Turn]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for user, reply in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    content: str | list[dict[str, Any]] = spec.prompt.text
    if spec.images:
        content = [{"type": "image_url", "image_url": {"url": url}} for url in spec.images]
        content.append({"type": "text", "text": spec.prompt.text})
    messages.append({"role": "user", "content": content})
    return messages


class _Failure(Exception):
    def __init__(self, error_type: str, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.http_status = http_status


@dataclass
class _Stream:
    """What one request's stream has delivered so far."""

    sent_at: float
    chunk_times: list[float] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    done_at: float | None = None


def _chunk_text(chunk: dict[str, Any]) -> str:
    parts = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        parts.append(choice.get("text") or delta.get("content") or delta.get("reasoning_content") or "")
    return "".join(parts)


def _error_message(obj: Any) -> str:
    error = obj.get("error", obj) if isinstance(obj, dict) else obj
    message = error.get("message", error) if isinstance(error, dict) else error
    return str(message)[:MAX_ERROR_CHARS]


class StreamingClient:
    """Sends RequestSpecs to one target; use as `async with StreamingClient(...) as client`."""

    def __init__(self, target: Target, options: RequestOptions, timeout_s: float) -> None:
        self.target = target
        self._options = options
        self._timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        self._http = httpx.AsyncClient(
            headers=headers,
            trust_env=False,
            follow_redirects=False,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S)),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )

    async def __aenter__(self) -> StreamingClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.aclose()

    async def send(self, spec: RequestSpec, history: list[Turn], run_start: float) -> RequestResult:
        """Send one request and time its stream; failures become the result's error, never raise."""
        payload = build_payload(self.target, self._options, spec, history)
        stream = _Stream(sent_at=time.perf_counter())
        failure: _Failure | None = None
        try:
            await asyncio.wait_for(self._read(payload, stream), timeout=self._timeout_s)
        except _Failure as e:
            failure = e
        except (asyncio.TimeoutError, httpx.TimeoutException) as e:
            failure = _Failure(records.TIMEOUT, f"{type(e).__name__}: no complete reply in {self._timeout_s:g} s")
        except httpx.TransportError as e:
            failure = _Failure(records.CONNECTION, f"{type(e).__name__}: {e}")
        return _result(spec, stream, failure, run_start)

    async def _read(self, payload: dict[str, Any], stream: _Stream) -> None:
        async with self._http.stream("POST", self.target.url, json=payload) as response:
            if response.status_code >= 400:
                body = (await response.aread()).decode(errors="replace")
                try:
                    message = _error_message(json.loads(body))
                except ValueError:
                    message = body[:MAX_ERROR_CHARS]
                error_type = records.HTTP_5XX if response.status_code >= 500 else records.HTTP_4XX
                raise _Failure(error_type, message, response.status_code)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                body = (await response.aread()).decode(errors="replace")
                raise _Failure(records.INVALID_RESPONSE, f"not a stream: {body[:MAX_ERROR_CHARS]}")
            event = ""
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if line.startswith("event:"):
                    event = line[len("event:") :].strip()
                elif line.startswith("data:"):
                    if self._on_data(line[len("data:") :].strip(), event, now, stream):
                        return
                elif not line:
                    event = ""
        raise _Failure(records.INCOMPLETE_STREAM, "the stream ended without [DONE]")

    @staticmethod
    def _on_data(data: str, event: str, now: float, stream: _Stream) -> bool:
        """Take one event's data; True at [DONE]."""
        if data == "[DONE]":
            stream.done_at = now
            return True
        try:
            chunk = json.loads(data)
        except ValueError:
            raise _Failure(records.INVALID_RESPONSE, f"chunk is not JSON: {data[:MAX_ERROR_CHARS]}") from None
        if event == "error" or not isinstance(chunk, dict) or "error" in chunk or chunk.get("object") == "error":
            raise _Failure(records.STREAM_ERROR, _error_message(chunk))
        if chunk.get("usage"):
            stream.usage = chunk["usage"]
        text = _chunk_text(chunk)
        if text:
            stream.chunk_times.append(now)
            stream.text_parts.append(text)
        return False


def _result(spec: RequestSpec, stream: _Stream, failure: _Failure | None, run_start: float) -> RequestResult:
    times = stream.chunk_times
    usage = stream.usage or {}
    completion_tokens = usage.get("completion_tokens")
    num_output_tokens = int(completion_tokens) if completion_tokens is not None else len(times)
    return RequestResult(
        index=spec.index,
        start_s=stream.sent_at - run_start,
        ttft_s=times[0] - stream.sent_at if times else None,
        itl_s=[b - a for a, b in itertools.pairwise(times)],
        e2e_s=stream.done_at - stream.sent_at if failure is None and stream.done_at is not None else None,
        num_input_tokens=int(usage.get("prompt_tokens", spec.prompt.num_tokens)),
        num_output_tokens=num_output_tokens,
        num_content_chunks=len(times),
        expected_output_tokens=spec.num_output_tokens,
        usage_reported=completion_tokens is not None,
        usage_mismatch=completion_tokens is not None and int(completion_tokens) != len(times),
        error_type=failure.error_type if failure else None,
        error=str(failure) if failure else None,
        http_status=failure.http_status if failure else None,
        tag=spec.tag,
        conversation=spec.conversation,
        turn=spec.turn,
        prefix_group=spec.prefix_group,
        output_text="".join(stream.text_parts),
    )
