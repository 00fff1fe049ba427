"""Typed messages between processes, in one place.

Every message is a msgspec Struct sent as one msgpack header frame (tensors, where a message has
them, follow as raw frames; see services.common.codec). Each carries the protocol version and a
request id. Nothing received from a socket is ever unpickled.

Gateway -> worker:  GenerateRequest, AbortRequest
Worker -> gateway:  OutputBatch of RequestDelta / RequestError (one batch per engine step)
"""

from __future__ import annotations

import msgspec

PROTOCOL_VERSION = 1


class SamplingSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The wire form of services.engine.SamplingParams (same fields, same defaults)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True


class GenerateRequest(msgspec.Struct, tag="generate", tag_field="kind", kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    reply_to: str  # address of the output socket the worker streams this request's tokens to
    cache_salt: str | None = None
    version: int = PROTOCOL_VERSION


class AbortRequest(msgspec.Struct, tag="abort", tag_field="kind", kw_only=True):
    request_id: str
    version: int = PROTOCOL_VERSION


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    token: str
    logprob: float


class PositionLogprobs(msgspec.Struct, array_like=True):
    """Logprobs at one output position: the sampled token, and the asked top-k by rank."""

    sampled: TokenLogprob
    top: list[TokenLogprob]


class CompletionDelta(msgspec.Struct, kw_only=True):
    """What one of a request's n completions gained in one step."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None


class RequestDelta(msgspec.Struct, tag="delta", tag_field="kind", kw_only=True):
    request_id: str
    completions: list[CompletionDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    version: int = PROTOCOL_VERSION


class RequestError(msgspec.Struct, tag="error", tag_field="kind", kw_only=True):
    """A request the worker could not serve; `status` is the HTTP status the gateway should answer."""

    request_id: str
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    status: int = 400
    version: int = PROTOCOL_VERSION


class OutputBatch(msgspec.Struct, tag="batch", tag_field="kind", kw_only=True):
    items: list[RequestDelta | RequestError]
    version: int = PROTOCOL_VERSION


WorkerInbound = GenerateRequest | AbortRequest
WorkerOutbound = OutputBatch
