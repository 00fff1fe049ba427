"""Engine deltas -> OpenAI responses and server-sent events, in OpenAI's exact shapes.

Chat stream, per request (n choices; `usage` is present, null, on every chunk only when
stream_options.include_usage is set):

    data: {..., "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, ...}]}  each choice
    data: {..., "choices": [{"index": i, "delta": {"content": "..."}, "logprobs": ..., ...}]}  as text comes
    data: {..., "choices": [{"index": i, "delta": {}, "finish_reason": "stop"}]}              each choice
    data: {..., "choices": [], "usage": {...}}                                               include_usage
    data: [DONE]

The completions stream is the same without the role chunks, with `text` instead of `delta`.
An error once the stream has started is sent as `data: {"error": {...}}`, then `data: [DONE]`.

Logprob values of -inf (impossible tokens) are sent as -9999.0: JSON has no infinity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from services.common.messages import CompletionDelta, PositionLogprobs, RequestDelta
from services.gateway.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)

MIN_LOGPROB = -9999.0
DONE_EVENT = "data: [DONE]\n\n"


def sse_event(payload: str) -> str:
    return f"data: {payload}\n\n"


def error_event(info: ErrorInfo) -> str:
    return sse_event(ErrorResponse(error=info).model_dump_json())


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(positions: list[PositionLogprobs]) -> list[ChatTokenLogprob]:
    return [
        ChatTokenLogprob(
            token=p.sampled.token,
            logprob=_finite(p.sampled.logprob),
            bytes=_utf8(p.sampled.token),
            top_logprobs=[TopLogprob(token=t.token, logprob=_finite(t.logprob), bytes=_utf8(t.token)) for t in p.top],
        )
        for p in positions
    ]


def completion_logprobs(positions: list[PositionLogprobs], text_offset: int) -> CompletionLogprobs:
    """Logprobs of consecutive positions whose text starts at character `text_offset` of the choice."""
    logprobs = CompletionLogprobs()
    for position in positions:
        sampled = position.sampled
        top = {sampled.token: _finite(sampled.logprob)}
        for alternative in position.top:
            top.setdefault(alternative.token, _finite(alternative.logprob))
        logprobs.tokens.append(sampled.token)
        logprobs.token_logprobs.append(_finite(sampled.logprob))
        logprobs.top_logprobs.append(top)
        logprobs.text_offset.append(text_offset)
        text_offset += len(sampled.token)
    return logprobs


# ----------------------------------------------------------------------------------------------
# Accumulated state


@dataclass
class ChoiceState:
    """What one choice produced so far."""

    index: int
    texts: list[str] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    logprob_chars: int = 0  # characters covered by the logprob tokens sent so far (text_offset)
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def add(self, completion: CompletionDelta) -> None:
        self.texts.append(completion.text)
        if completion.logprobs:
            self.logprobs.extend(completion.logprobs)
        if completion.finish_reason is not None:
            self.finish_reason = completion.finish_reason


class UsageCounter:
    def __init__(self) -> None:
        self._prompt_tokens: dict[int, int] = {}  # first choice index of a prompt -> its tokens
        self._cached_tokens: dict[int, int] = {}
        self.completion_tokens = 0

    def add(self, first_choice: int, delta: RequestDelta) -> None:
        self._prompt_tokens[first_choice] = delta.num_prompt_tokens
        self._cached_tokens[first_choice] = max(self._cached_tokens.get(first_choice, 0), delta.num_cached_tokens)
        self.completion_tokens += sum(len(c.token_ids) for c in delta.completions)

    def usage(self) -> Usage:
        prompt_tokens = sum(self._prompt_tokens.values())
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=prompt_tokens + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self._cached_tokens.values())),
        )


# ----------------------------------------------------------------------------------------------
# Formatters


@dataclass(frozen=True)
class ResponseHeader:
    request_id: str
    model: str
    created: int  # unix seconds
    with_logprobs: bool
    include_usage: bool


class _Formatter:
    def __init__(self, header: ResponseHeader) -> None:
        self.header = header

    def _event(self, chunk: BaseModel) -> str:
        exclude = None if self.header.include_usage else {"usage"}
        return sse_event(chunk.model_dump_json(exclude=exclude))

    def stream_start(self, num_choices: int) -> list[str]:
        return []


class ChatFormatter(_Formatter):
    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        h = self.header
        return self._event(
            ChatCompletionChunk(id=h.request_id, created=h.created, model=h.model, choices=choices, usage=usage)
        )

    def stream_start(self, num_choices: int) -> list[str]:
        return [
            self._chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            for i in range(num_choices)
        ]

    def stream_delta(self, choice: ChoiceState, completion: CompletionDelta) -> list[str]:
        events = []
        logprobs = None
        if self.header.with_logprobs and completion.logprobs:
            logprobs = ChatLogprobs(content=chat_logprobs(completion.logprobs))
        if completion.text or logprobs is not None:
            events.append(
                self._chunk(
                    [ChatChunkChoice(index=choice.index, delta=ChatDelta(content=completion.text), logprobs=logprobs)]
                )
            )
        if completion.finish_reason is not None:
            events.append(
                self._chunk(
                    [ChatChunkChoice(index=choice.index, delta=ChatDelta(), finish_reason=completion.finish_reason)]
                )
            )
        return events

    def stream_usage(self, usage: Usage) -> str:
        return self._chunk([], usage)

    def response(self, choices: list[ChoiceState], usage: Usage) -> ChatCompletionResponse:
        h = self.header
        return ChatCompletionResponse(
            id=h.request_id,
            created=h.created,
            model=h.model,
            usage=usage,
            choices=[
                ChatChoice(
                    index=c.index,
                    message=ChatMessageOut(content=c.text),
                    logprobs=ChatLogprobs(content=chat_logprobs(c.logprobs)) if h.with_logprobs else None,
                    finish_reason=c.finish_reason,
                )
                for c in choices
            ],
        )


class CompletionFormatter(_Formatter):
    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        h = self.header
        return self._event(
            CompletionResponse(id=h.request_id, created=h.created, model=h.model, choices=choices, usage=usage)
        )

    def _logprobs(self, choice: ChoiceState, positions: list[PositionLogprobs]) -> CompletionLogprobs:
        logprobs = completion_logprobs(positions, choice.logprob_chars)
        choice.logprob_chars += sum(len(p.sampled.token) for p in positions)
        return logprobs

    def stream_delta(self, choice: ChoiceState, completion: CompletionDelta) -> list[str]:
        events = []
        logprobs = None
        if self.header.with_logprobs and completion.logprobs:
            logprobs = self._logprobs(choice, completion.logprobs)
        if completion.text or logprobs is not None:
            events.append(self._chunk([CompletionChoice(index=choice.index, text=completion.text, logprobs=logprobs)]))
        if completion.finish_reason is not None:
            events.append(
                self._chunk([CompletionChoice(index=choice.index, text="", finish_reason=completion.finish_reason)])
            )
        return events

    def stream_usage(self, usage: Usage) -> str:
        return self._chunk([], usage)

    def response(self, choices: list[ChoiceState], usage: Usage) -> CompletionResponse:
        h = self.header
        return CompletionResponse(
            id=h.request_id,
            created=h.created,
            model=h.model,
            usage=usage,
            choices=[
                CompletionChoice(
                    index=c.index,
                    text=c.text,
                    finish_reason=c.finish_reason,
                    logprobs=completion_logprobs(c.logprobs, 0) if h.with_logprobs else None,
                )
                for c in choices
            ],
        )


Formatter = ChatFormatter | CompletionFormatter
