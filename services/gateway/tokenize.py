"""vLLM's /tokenize and /detokenize, on the gateway's tokenizer threads.

    POST /tokenize    {"model"?, "prompt": str, "add_special_tokens": true, "return_token_strs": false}
                   or {"model"?, "messages": [...], "tools"?: [...], "add_generation_prompt": true,
                       "add_special_tokens": false, ...}
                      -> {"count", "max_model_len", "tokens": [int, ...], "token_strs": [str, ...] | null}
    POST /detokenize  {"model"?, "tokens": [int, ...]} -> {"prompt": str}

    Content-Type (415) -> read body (413, 408) -> parse (400) -> model (404) -> field checks (400)
      -> admit the text's bytes (/tokenize, 429) -> tokenize or detokenize in a tokenizer thread (400)

A prompt is tokenized as /v1/completions tokenizes a string prompt, and messages are rendered as
/v1/chat/completions renders them (services.gateway.prompts.render_chat), so with the defaults the
ids are the ones a generation request's prompt holds. As in vLLM, no length is refused: a client
counts a prompt of any length and compares the count with max_model_len. The text waits for a
tokenizer thread admitted as a generation's prompt is (a request slot, no sequences, its UTF-8 bytes
in the budget of untokenized prompt bytes), so a burst of huge /tokenize bodies is refused with 429
instead of holding every tokenizer thread while chats wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from services.common.errors import InvalidRequestError
from services.gateway.admission import AdmissionController, AdmissionRejected, AdmissionTicket
from services.gateway.backend import Backend
from services.gateway.config import GatewayConfig
from services.gateway.errors import ApiError
from services.gateway.metrics import GatewayMetrics
from services.gateway.prompts import render_chat
from services.gateway.protocol import (
    ChatMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
    parse_tokenize_request,
)
from services.gateway.serving import admission_refused, model_not_found, read_json
from services.gateway.tokenizer_pool import TokenizerPool
from services.gateway.tools import template_tools


@dataclass(frozen=True)
class TokenizationService:
    """Serves /tokenize and /detokenize with the tokenizer threads the generation routes use."""

    config: GatewayConfig
    backend: Backend
    admission: AdmissionController
    metrics: GatewayMetrics
    tokenizers: TokenizerPool

    async def tokenize(self, http_request: Request) -> Response:
        request = await read_json(http_request, self.config, parse_tokenize_request)
        self._check_model(request.model)
        try:
            if isinstance(request, TokenizeChatRequest):
                request.check()
                self._check_no_images(request)
        except InvalidRequestError as exc:
            raise ApiError.invalid(exc) from exc
        ticket = self._admit(_text_bytes(request))
        try:
            token_ids, token_strs = await self.tokenizers.run_with_tokenizer(tokenize_request, request)
        except InvalidRequestError as exc:
            raise ApiError.invalid(exc) from exc
        finally:
            ticket.release()
        response = TokenizeResponse(
            count=len(token_ids), max_model_len=self.backend.max_model_len, tokens=token_ids, token_strs=token_strs
        )
        return _json(response)

    async def detokenize(self, http_request: Request) -> Response:
        request = await read_json(http_request, self.config, DetokenizeRequest.model_validate_json)
        self._check_model(request.model)
        try:
            text = await self.tokenizers.run_with_tokenizer(detokenize_request, request, self.backend.vocab_size)
        except InvalidRequestError as exc:
            raise ApiError.invalid(exc) from exc
        return _json(DetokenizeResponse(prompt=text))

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise model_not_found(model)

    def _check_no_images(self, request: TokenizeChatRequest) -> None:
        """A vision-language model's image parts expand to rows known only once the image is loaded:
        not here yet. (A text model refuses them while rendering, as its chats do.)"""
        if self.backend.processor is None:
            return
        for index, message in enumerate(request.messages):
            if isinstance(message.content, list) and any(part.type == "image_url" for part in message.content):
                raise InvalidRequestError(
                    f"messages[{index}]: /tokenize does not take image_url parts yet", param="messages"
                )

    def _admit(self, num_text_bytes: int) -> AdmissionTicket:
        try:
            return self.admission.admit(num_sequences=0, num_prompt_bytes=num_text_bytes)
        except AdmissionRejected as exc:
            raise admission_refused(exc, self.metrics, self.config.retry_after_s) from exc


# ----------------------------------------------------------------------------------------------
# On a tokenizer thread


def tokenize_request(tokenizer: Any, request: TokenizeRequest) -> tuple[list[int], list[str] | None]:
    """The request's token ids, and their tokens' strings when it asks for them."""
    if isinstance(request, TokenizeChatRequest):
        token_ids = _chat_token_ids(tokenizer, request)
    else:
        token_ids = list(tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens))
    token_strs = list(tokenizer.convert_ids_to_tokens(token_ids)) if request.return_token_strs else None
    return token_ids, token_strs


def _chat_token_ids(tokenizer: Any, request: TokenizeChatRequest) -> list[int]:
    """As the chat route renders messages; with add_special_tokens the rendered text is encoded with
    the tokenizer's special tokens, as vLLM does."""
    tools = template_tools(request.tools)
    prompt = request.add_generation_prompt
    if not request.add_special_tokens:
        token_ids = render_chat(tokenizer, request.messages, add_generation_prompt=prompt, tokenize=True, tools=tools)
        assert isinstance(token_ids, list)
        return token_ids
    text = render_chat(tokenizer, request.messages, add_generation_prompt=prompt, tokenize=False, tools=tools)
    return list(tokenizer.encode(text, add_special_tokens=True))


def detokenize_request(tokenizer: Any, request: DetokenizeRequest, vocab_size: int) -> str:
    bad = next((t for t in request.tokens if t >= vocab_size), None)  # ids are >= 0 once parsed
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is out of the vocabulary [0, {vocab_size})", param="tokens")
    return tokenizer.decode(request.tokens)


def _text_bytes(request: TokenizeRequest) -> int:
    """UTF-8 bytes of the text the tokenizer will read (what admission counts)."""
    if isinstance(request, TokenizeChatRequest):
        return sum(_utf8_len(text) for message in request.messages for text in _texts(message))
    return _utf8_len(request.prompt)


def _texts(message: ChatMessage) -> list[str]:
    if isinstance(message.content, str):
        return [message.content]
    return [part.text for part in message.content or () if isinstance(part.text, str)]


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _json(body: BaseModel) -> Response:
    return Response(content=body.model_dump_json(), media_type="application/json")
