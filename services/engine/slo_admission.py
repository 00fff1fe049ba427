"""SLO-aware admission of prefill chunks (LayerKV, Xiong et al., arXiv 2410.00428, §SLO-aware scheduler).

Every prefill chunk a step computes beside decodes lengthens each decode's inter-token gap by its own
time. With a TPOT SLO (time per output token), the scheduler asks this gate before it adds a chunk
to a step that decodes: the step-time model (services/engine/step_model.py) predicts the step with
the chunk, and the chunk goes only if that stays within the SLO.

    chunk rule (a step whose batch so far holds D > 0 decodes, a chunk of n prompt tokens):
      predict(batch + n) <= tpot_slo                    admit the n tokens
      else the largest k·block_size < n that fits      admit that (a long prompt still progresses)
      else (not even one block fits)                   hold: no more prefill this step
    no decode in the step                              admit (there is no gap to protect)
    the request's slack is exhausted (below)           admit, whatever it costs the decodes

The rule covers running requests' next prompt chunks and new admissions alike, in the scheduler's
order (running prefills, then the waiting queue); the first held chunk ends the step's prefills, as
the first that does not fit the budget does. Chunks stay within the token budget and
max_prefill_tokens_beside_decodes: the gate only ever cuts.

Slack and the starvation bound. A request's deadline is arrival + ttft_slo (with a TTFT SLO) or
arrival + max_hold_s (without one), and its slack at time t is

    slack(r, t) = deadline(r) - t - predict(r's whole prompt as one prefill, alone)

A request whose slack is exhausted (<= 0) is admitted whatever its chunk costs the decodes: holding
it longer only starves it, and its first token is due. So every request waits for the TPOT rule at
most until its deadline, and the rule cannot starve anyone, even with a wrong model. (The deadline
counts from arrival, not from the first hold: a preempted request, arrived long ago, is never held.)

Order (with a TTFT SLO). The waiting queue orders requests by least slack first. The SLO is one for
all, so the order of slack(r, t) is the order of the static key deadline(r) - predict(prompt),
computed when the request arrives (services/engine/waiting_queue.py takes it as `priority_key`):
  fcfs    preempted requests first (latest preempted first), then the rest by least slack;
  preble  preempted requests first, then Preble's priority groups and quotas unchanged, each group
          by least slack instead of oldest first.
A key grows with arrival, so a request is passed only by later ones whose prompts take longer to
prefill than the time between their arrivals: nobody waits for ever.

Tunables:
    MAX_HOLD_S = 2.0   without a TTFT SLO, how long after its arrival a request may be held at most
                       (SLOAdmission's max_hold_s)

Counters (totals, for SchedulerStats): chunks held entirely, chunks cut to fit, chunks admitted past
the TPOT SLO because their request's slack was exhausted.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from services.engine.request import Request
from services.engine.step_model import StepLoad, StepTimeModel

MAX_HOLD_S = 2.0


class SLOAdmission:
    """Owned by the scheduler (its thread); the counters may be read from others."""

    def __init__(
        self,
        ttft_slo_s: float | None,
        tpot_slo_s: float | None,
        step_model: StepTimeModel,
        block_size: int,
        max_hold_s: float = MAX_HOLD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttft_slo_s = ttft_slo_s
        self.tpot_slo_s = tpot_slo_s
        self.step_model = step_model
        self.block_size = block_size
        self.max_hold_s = max_hold_s
        self.clock = clock
        self.num_held_total = 0
        self.num_cut_total = 0
        self.num_forced_total = 0

    def deadline_s(self, request: Request) -> float:
        return request.arrival_time_s + (self.ttft_slo_s if self.ttft_slo_s is not None else self.max_hold_s)

    def priority_key(self, request: Request) -> float:
        """slack(request, t) + t: least first is least slack first (the waiting queue's key)."""
        return self.deadline_s(request) - self.step_model.predict_s(
            StepLoad().with_chunk(request.num_tokens, 0, request.num_tokens)
        )

    def slack_s(self, request: Request, now_s: float) -> float:
        return self.priority_key(request) - now_s

    def fit_chunk(self, load: StepLoad, request: Request, num_computed_tokens: int, num_new_tokens: int) -> int:
        """How many of the `num_new_tokens` prompt tokens after `num_computed_tokens` the step may take,
        given the `load` of its batch so far: all, fewer, or 0 (held)."""
        if self.tpot_slo_s is None or load.num_decodes == 0:
            return num_new_tokens
        if self._fits(load, request, num_computed_tokens, num_new_tokens):
            return num_new_tokens
        if self.slack_s(request, self.clock()) <= 0:
            self.num_forced_total += 1
            return num_new_tokens
        num_blocks = self._max_blocks_that_fit(
            load, request, num_computed_tokens, (num_new_tokens - 1) // self.block_size
        )
        if num_blocks == 0:
            self.num_held_total += 1
            return 0
        self.num_cut_total += 1
        return num_blocks * self.block_size

    def _fits(self, load: StepLoad, request: Request, num_computed_tokens: int, num_new_tokens: int) -> bool:
        chunk = load.with_chunk(request.num_prompt_tokens, num_computed_tokens, num_new_tokens)
        assert self.tpot_slo_s is not None
        return self.step_model.predict_s(chunk) <= self.tpot_slo_s

    def _max_blocks_that_fit(self, load: StepLoad, request: Request, num_computed_tokens: int, max_blocks: int) -> int:
        """The most whole blocks of tokens (<= max_blocks) whose chunk fits: the prediction grows with the
        chunk (no coefficient is negative), so a bisection finds it."""
        low, high = 0, max_blocks  # low fits (0 trivially), high + 1 does not
        while low < high:
            middle = (low + high + 1) // 2
            if self._fits(load, request, num_computed_tokens, middle * self.block_size):
                low = middle
            else:
                high = middle - 1
        return low


def make_slo_admission(ttft_slo_ms: float | None, tpot_slo_ms: float | None, block_size: int) -> SLOAdmission | None:
    """The gate for EngineConfig's SLOs, with a fresh step-time model; None when both are off."""
    if ttft_slo_ms is None and tpot_slo_ms is None:
        return None
    return SLOAdmission(
        None if ttft_slo_ms is None else ttft_slo_ms / 1e3,
        None if tpot_slo_ms is None else tpot_slo_ms / 1e3,
        StepTimeModel(),
        block_size,
    )
