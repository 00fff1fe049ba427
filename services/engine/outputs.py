"""What the engine returns, shaped like vLLM's `RequestOutput` so users of either know both."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1-based rank in the model's distribution
    decoded_token: str | None = None


# one entry per prompt token: None for the first, then {token_id: Logprob} with the prompt token first
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]  # all tokens so far; while unfinished the engine keeps appending to this list
    logprobs: list[dict[int, Logprob]] | None  # one entry per token in token_ids, when asked
    finish_reason: str | None = None  # "stop", "length", "abort" (None: unfinished or handed off)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # what this step added, for streaming
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[dict[int, Logprob]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # when asked (SamplingParams.prompt_logprobs): in the first output with a token only, as deltas are;
    # LLM.generate puts them in its final outputs
    prompt_logprobs: PromptLogprobs | None = None
    # (queue s, prefill s): arrival here -> first step -> first token, in the output that brings this
    # engine's first token for the request only (the worker's TTFT breakdown)
    first_token_phases: tuple[float, float] | None = None


@dataclass(frozen=True)
class Handoff:
    """A prefill-only request that reached its first token: it left this engine with its KV held
    (export it with `export_kv`, free it with `release_kv`) and goes on on a decode worker."""

    request_id: str
    output_token_ids: list[int]  # every token sampled so far (resumed ones included); streamed already


class StepOutputs(list[RequestOutput]):
    """One step's RequestOutputs (a list, in the order requests produced tokens), plus `handoffs`:
    the prefill-only requests this step ended, whose outputs are in the list unfinished."""

    def __init__(self, outputs: Iterable[RequestOutput] = (), handoffs: list[Handoff] | None = None) -> None:
        super().__init__(outputs)
        self.handoffs: list[Handoff] = handoffs or []
