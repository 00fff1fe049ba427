"""Engine deltas -> OpenAI responses and server-sent events, in OpenAI's exact shapes.

Chat stream, per request (n choices; `usage` is present, null, on every chunk only when
stream_options.include_usage is set):

    data: {..., "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, ...}]}  each choice
    data: {..., "choices": [{"index": i, "delta": {"content": "..."}, "logprobs": ..., ...}]}  as text comes
    data: {..., "choices": [{"index": i, "delta": {"tool_calls": [{"index": k, ...}]}, ...}]}  with tools
    data: {..., "choices": [{"index": i, "delta": {}, "finish_reason": "stop"}]}              each choice
    data: {..., "choices": [], "usage": {...}}                                               include_usage
    data: [DONE]

The completions stream is the same without the role chunks, with `text` instead of `delta`; with
`echo`, each choice's first chunk starts with its prompt's text (and, with `logprobs`, its prompt
tokens' logprobs: the first token's null, as nothing comes before it).

`prompt_logprobs` (vLLM's extra; never streamed) answer in vLLM's shape: `choices[i].prompt_logprobs`
on completions, a top-level `prompt_logprobs` on chat, each a list with None first, then per prompt
token `{token id: {"logprob", "rank", "decoded_token"}}`, the prompt token first. The key is absent
from answers that did not ask for them.
A chat with tools reads its text through services.gateway.tools (content, tool calls, finish_reason).
An error once the stream has started is sent as `data: {"error": {...}}`, then `data: [DONE]`.

Logprob values of -inf (impossible tokens) are sent as -9999.0: JSON has no infinity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel

from services.common.messages import CompletionDelta, PositionLogprobs, PromptPositionLogprobs, RequestDelta
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
    PromptLogprob,
    PromptLogprobs,
    PromptTokensDetails,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from services.gateway.tools import ChoiceToolCalls, ToolPlan

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


def prompt_logprobs_answer(
    positions: list[PromptPositionLogprobs] | None, num_top: int | None
) -> PromptLogprobs | None:
    """vLLM's prompt_logprobs: each prompt token's logprob, then its `num_top` best alternatives."""
    if positions is None or num_top is None:
        return None
    answer: PromptLogprobs = []
    for position in positions:
        if position is None:
            answer.append(None)
            continue
        shown = [position[0], *sorted(position, key=lambda t: t.rank)[:num_top]]
        answer.append(
            {
                str(t.token_id): PromptLogprob(logprob=_finite(t.logprob), rank=t.rank, decoded_token=t.token)
                for t in shown
            }
        )
    return answer


def echo_logprobs(
    first_token: str, positions: list[PromptPositionLogprobs], num_top: int, text_offset: int
) -> CompletionLogprobs:
    """The prompt's tokens as `completion_logprobs` gives the output's (`first_token`: the text of the
    first, which has no logprob: null, as are its alternatives)."""
    logprobs = CompletionLogprobs()
    for position in positions:
        token, token_logprob, top = first_token, None, None
        if position is not None:
            token, token_logprob = position[0].token, _finite(position[0].logprob)
            top = {token: token_logprob}
            for alternative in sorted(position, key=lambda t: t.rank)[:num_top]:
                top.setdefault(alternative.token, _finite(alternative.logprob))
        logprobs.tokens.append(token)
        logprobs.token_logprobs.append(token_logprob)
        logprobs.top_logprobs.append(top)
        logprobs.text_offset.append(text_offset)
        text_offset += len(token)
    return logprobs


def _joined(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=first.top_logprobs + second.top_logprobs,
        text_offset=first.text_offset + second.text_offset,
    )


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
    prompt_logprobs: list[PromptPositionLogprobs] | None = None  # its prompt's, when asked
    echoed: bool = False  # its prompt's text was streamed (echo)

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def add(self, completion: CompletionDelta) -> None:
        self.texts.append(completion.text)
        if completion.logprobs:
            self.logprobs.extend(completion.logprobs)
        if completion.finish_reason is not None:
            self.finish_reason = completion.finish_reason


def add_prompt_logprobs(
    choices: list[ChoiceState], first_choice: int, num_per_prompt: int, delta: RequestDelta
) -> None:
    """A delta's prompt logprobs (its prompt's first delta with tokens carries them) go to each choice of
    its prompt, before any of them takes a token."""
    if delta.prompt_logprobs is not None:
        for choice in choices[first_choice : first_choice + num_per_prompt]:
            choice.prompt_logprobs = delta.prompt_logprobs


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
    num_top_logprobs: int = 0  # alternatives at each position of `logprobs` (completions: echoed ones too)
    num_prompt_logprobs: int | None = None  # prompt_logprobs asked for: alternatives at each prompt position
    num_choices_per_prompt: int = 1


@dataclass(frozen=True)
class EchoedPrompt:
    """What `echo` puts before each of a prompt's choices: its text (a token-id prompt's decoded), and
    its first token's text (the only prompt token without a logprob)."""

    text: str
    first_token: str


class _Formatter:
    def __init__(self, header: ResponseHeader) -> None:
        self.header = header

    def _event(self, chunk: BaseModel) -> str:
        exclude = None if self.header.include_usage else {"usage"}
        return sse_event(chunk.model_dump_json(exclude=exclude))

    def stream_start(self, num_choices: int) -> list[str]:
        return []

    def stream_usage(self, usage: Usage) -> str:
        raise NotImplementedError

    def stream_end(self, usage: Usage) -> list[str]:
        """After the last delta: the usage chunk when the client asked for it, then [DONE]."""
        return [self.stream_usage(usage), DONE_EVENT] if self.header.include_usage else [DONE_EVENT]

    def stream_error(self, error: ErrorInfo) -> list[str]:
        """A failure once the stream has started: the error in OpenAI's shape, then [DONE]."""
        return [error_event(error), DONE_EVENT]


class ChatFormatter(_Formatter):
    """`tools`: how the request's output becomes tool calls (services.gateway.tools); None: plain text."""

    def __init__(self, header: ResponseHeader, tools: ToolPlan | None = None) -> None:
        super().__init__(header)
        self._tools = tools
        self._tool_calls: dict[int, ChoiceToolCalls] = {}  # a streamed choice's index -> its calls so far

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
        content, tool_calls = self._split(choice.index, completion)
        if content or logprobs is not None:
            events.append(
                self._chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(content=content), logprobs=logprobs)])
            )
        for call in tool_calls:
            events.append(self._chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(tool_calls=[call]))]))
        if completion.finish_reason is not None:
            finish_reason = self._streamed_finish_reason(choice.index, completion.finish_reason)
            events.append(
                self._chunk([ChatChunkChoice(index=choice.index, delta=ChatDelta(), finish_reason=finish_reason)])
            )
        return events

    def _split(self, index: int, completion: CompletionDelta) -> tuple[str, list[ToolCallDelta]]:
        """A delta's text as content and tool-call deltas (all content in a plain chat)."""
        if self._tools is None:
            return completion.text, []
        calls = self._tool_calls.setdefault(index, self._tools.choice())
        return calls.feed(completion.text, final=completion.finish_reason is not None)

    def _streamed_finish_reason(self, index: int, finish_reason: str) -> str | None:
        if self._tools is None:
            return finish_reason
        calls = self._tool_calls.get(index)
        return self._tools.finish_reason(finish_reason, calls is not None and calls.num_calls > 0)

    def _message(self, choice: ChoiceState) -> tuple[ChatMessageOut, str | None]:
        """A whole choice's message and finish_reason."""
        if self._tools is None:
            return ChatMessageOut(content=choice.text), choice.finish_reason
        content, calls = self._tools.message(choice.text)
        finish_reason = self._tools.finish_reason(choice.finish_reason, bool(calls))
        return ChatMessageOut(content=content, tool_calls=calls or None), finish_reason

    def stream_usage(self, usage: Usage) -> str:
        return self._chunk([], usage)

    def response(self, choices: list[ChoiceState], usage: Usage) -> ChatCompletionResponse:
        h = self.header
        return ChatCompletionResponse(
            id=h.request_id,
            created=h.created,
            model=h.model,
            usage=usage,
            choices=[self._choice(c) for c in choices],
            prompt_logprobs=prompt_logprobs_answer(choices[0].prompt_logprobs, h.num_prompt_logprobs),
        )

    def _choice(self, choice: ChoiceState) -> ChatChoice:
        message, finish_reason = self._message(choice)
        logprobs = ChatLogprobs(content=chat_logprobs(choice.logprobs)) if self.header.with_logprobs else None
        return ChatChoice(index=choice.index, message=message, logprobs=logprobs, finish_reason=finish_reason)


class CompletionFormatter(_Formatter):
    def __init__(self, header: ResponseHeader) -> None:
        super().__init__(header)
        self.echo: list[EchoedPrompt] | None = None  # per prompt, with `echo` (set once tokenized)

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        h = self.header
        return self._event(
            CompletionResponse(id=h.request_id, created=h.created, model=h.model, choices=choices, usage=usage)
        )

    def _logprobs(self, choice: ChoiceState, positions: list[PositionLogprobs]) -> CompletionLogprobs:
        logprobs = completion_logprobs(positions, choice.logprob_chars)
        choice.logprob_chars += sum(len(p.sampled.token) for p in positions)
        return logprobs

    def _echoed(self, choice: ChoiceState) -> EchoedPrompt | None:
        return None if self.echo is None else self.echo[choice.index // self.header.num_choices_per_prompt]

    def _echo_logprobs(self, choice: ChoiceState, prompt: EchoedPrompt, text_offset: int) -> CompletionLogprobs:
        positions = choice.prompt_logprobs or []
        return echo_logprobs(prompt.first_token, positions, self.header.num_top_logprobs, text_offset)

    def stream_delta(self, choice: ChoiceState, completion: CompletionDelta) -> list[str]:
        events = []
        text, logprobs = completion.text, None
        prompt = self._echoed(choice)
        if prompt is not None and not choice.echoed:  # the choice's first chunk: its prompt first
            choice.echoed = True
            text = prompt.text + text
            if self.header.with_logprobs:
                logprobs = self._echo_logprobs(choice, prompt, 0)
                choice.logprob_chars = sum(len(token) for token in logprobs.tokens)
        if self.header.with_logprobs and completion.logprobs:
            output_logprobs = self._logprobs(choice, completion.logprobs)
            logprobs = output_logprobs if logprobs is None else _joined(logprobs, output_logprobs)
        if text or logprobs is not None:
            events.append(self._chunk([CompletionChoice(index=choice.index, text=text, logprobs=logprobs)]))
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
                    text=self._text(c),
                    finish_reason=c.finish_reason,
                    logprobs=self._choice_logprobs(c) if h.with_logprobs else None,
                    prompt_logprobs=prompt_logprobs_answer(c.prompt_logprobs, h.num_prompt_logprobs),
                )
                for c in choices
            ],
        )

    def _text(self, choice: ChoiceState) -> str:
        prompt = self._echoed(choice)
        return choice.text if prompt is None else prompt.text + choice.text

    def _choice_logprobs(self, choice: ChoiceState) -> CompletionLogprobs:
        prompt = self._echoed(choice)
        if prompt is None:
            return completion_logprobs(choice.logprobs, 0)
        echoed = self._echo_logprobs(choice, prompt, 0)
        text_offset = sum(len(token) for token in echoed.tokens)
        return _joined(echoed, completion_logprobs(choice.logprobs, text_offset))


class Formatter(Protocol):
    """What the generation pipeline (services.gateway.serving) asks of the formatter of one response:
    the chat and completions formatters here, the Responses API's (services.gateway.responses_output)."""

    header: ResponseHeader

    def stream_start(self, num_choices: int) -> list[str]: ...

    def stream_delta(self, choice: ChoiceState, completion: CompletionDelta) -> list[str]: ...

    def stream_end(self, usage: Usage) -> list[str]: ...

    def stream_error(self, error: ErrorInfo) -> list[str]: ...

    def response(self, choices: list[ChoiceState], usage: Usage) -> BaseModel: ...
