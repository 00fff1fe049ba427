"""A request's state inside one engine.

Token accounting (the scheduler's only view of progress):

    all_token_ids:  | prompt (num_prompt_tokens) | output tokens ... |
                    |<---- num_computed_tokens ---->|<- to compute ->|

`num_computed_tokens` counts tokens whose KV is in the cache. A step schedules
`num_tokens - num_computed_tokens` (capped by the chunk budget); when a step's chunk reaches
`num_tokens`, the model's last logits are sampled and one token is appended. Preemption resets
`num_computed_tokens` to 0 and the request recomputes prompt plus output from scratch.

With asynchronous scheduling the next step is scheduled while the last one's tokens are still on the
device: `num_pending_tokens` counts them (sampled, not yet appended), and the scheduler works from
`num_tokens_with_pending`. A pending token is the input of the next step's decode, taken from the
device; it joins `output_token_ids` when its step is collected.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from services.common.block_hash import MultiModalSpan
from services.engine.multimodal.inputs import MultiModalInputs
from services.engine.sampling_params import SamplingParams
from services.engine.structured import GrammarState


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"  # EOS, stop token or stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context length
    FINISHED_ABORTED = "abort"
    # disaggregated prefill: the prompt and first token are done here and the KV is held for the decode
    # worker, where the request goes on; it has left this engine but is not over for the client
    FINISHED_HANDOFF = "handoff"

    @property
    def finished(self) -> bool:
        """The request has left this engine's queues."""
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
            RequestStatus.FINISHED_HANDOFF,
        )


@dataclass(eq=False)  # identity semantics: a request is one object
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    max_output_tokens: int  # max_tokens resolved against the context length
    arrival_time_s: float = field(default_factory=time.monotonic)
    cache_salt: str | None = None
    prompt_text: str | None = None
    generator: torch.Generator | None = None  # per-request RNG when a seed is given

    output_token_ids: list[int] = field(default_factory=list)
    # one entry per output token when logprobs were asked: {token_id: (logprob, rank)}
    output_logprobs: list[dict[int, tuple[float, int]]] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0  # sampled on the device by a launched step, not yet appended
    num_cached_prompt_tokens: int = 0  # prefix-cache hit on first scheduling (for metrics)
    # prompt logprobs (sampling_params.prompt_logprobs): prompt positions [0, this) are covered by a
    # launched step (position 0 has none); a resumed request starts at num_prompt_tokens (sent already)
    num_prompt_logprob_positions: int = 1
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    scheduled_s: float | None = None  # time.monotonic() when a step first took it
    first_token_s: float | None = None  # ... when its first token here was collected
    # block hashes of this request's full blocks, extended as blocks fill (see kv_cache.manager)
    block_hashes: list[int] = field(default_factory=list)
    # keep KV blocks after finishing, until the engine is told to release them (KV export)
    hold_kv: bool = False
    # disaggregated prefill: after the first token the request ends with FINISHED_HANDOFF (unless a real
    # stop came first) and keeps its KV for the decode worker, where it goes on
    prefill_only: bool = False
    # images of the prompt (embeddings on the model's device) and M-RoPE positions; None: text only
    multi_modal: MultiModalInputs | None = None
    # the matcher of its output constraint (sampling_params.structured); None: unconstrained
    grammar: GrammarState | None = None

    @property
    def mm_spans(self) -> tuple[MultiModalSpan, ...]:
        """The prompt's images as block-hash keys (services.common.block_hash)."""
        return self.multi_modal.spans if self.multi_modal is not None else ()

    @property
    def mrope_delta(self) -> int:
        return self.multi_modal.mrope_delta if self.multi_modal is not None else 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return self.num_tokens + self.num_pending_tokens

    @property
    def certain_to_finish(self) -> bool:
        """Its pending token will end it whatever that token is: its length, or a prefill-only handoff."""
        if not self.num_pending_tokens:
            return False
        return self.prefill_only or self.num_output_tokens + self.num_pending_tokens >= self.max_output_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def computes_prompt_logprobs(self) -> bool:
        """It asked for prompt logprobs and some position's is not computed yet (see prompt_logprobs)."""
        return (
            self.sampling_params.prompt_logprobs is not None
            and self.num_prompt_logprob_positions < self.num_prompt_tokens
        )

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def handed_off(self) -> bool:
        return self.status is RequestStatus.FINISHED_HANDOFF

    @property
    def keeps_kv(self) -> bool:
        """Its blocks outlive it: held for export, or for the decode worker it was handed to."""
        return self.hold_kv or self.handed_off

    @property
    def finish_reason(self) -> str | None:
        """The client's finish reason: None while unfinished, and for a handoff (it goes on elsewhere)."""
        return self.status.value if self.status.finished and not self.handed_off else None
