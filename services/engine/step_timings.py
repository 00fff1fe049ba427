"""What an engine measures of its own speed, for the router's cost model (SchedulerStats.recent_*).

Two bounded rings, newest last, published with every stats message; a reader keeps the entries whose
`seq` it has not seen (the ring survives lost messages, not a long silence):

  steps     StepTiming: tokens and attention pairs computed, and how long that took. A step is
            timed from its launch to the end of its sampling (`collected`); steps that sample
            nothing (middle prompt chunks) are not waited for on their own, so they are timed with
            the next step that samples, from the first one's launch:

                launch A (no sampling)   launch B   collect B     ->  one timing: A + B, 2 steps
                |---------------------------------------------|

            With asynchronous scheduling step N + 1 is launched before N is collected and stays
            open; its timing starts at its launch and so overlaps N's end (an overestimate the
            router's least-squares fit absorbs as noise).
  finished  FinishedRequestTiming: time to first token, time per output token, output length.

With a StepTimeModel (the engine's, for SLO-aware admission: services/engine/step_model.py) each
timing also feeds it the steps' summed StepLoad and their busy time: from the later of the first
step's launch and the previous collection, to this collection. Under asynchronous scheduling a step
is launched while the one before still runs, and it starts computing when that one ends (about its
collection), so the busy time is the step's own, not the overlap the router's duration includes.

The engine calls `launched` / `collected` / `finished` from its loop; `recent_*` may be read from
another thread (a copy of a deque is taken under the GIL).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

from services.common.control import FinishedRequestTiming, StepTiming
from services.engine.request import Request
from services.engine.step_model import StepLoad, StepTimeModel

RECENT_TIMINGS = 32  # entries of each ring a stats message carries
_MAX_OPEN_STEPS = 64  # launched and never collected (an engine reset): the oldest are dropped


class StepTimings:
    def __init__(self, max_recent: int = RECENT_TIMINGS, step_model: StepTimeModel | None = None) -> None:
        # launched steps not yet timed: (launch time, tokens, attention pairs, the step's pending sample)
        self._open: deque[tuple[float, int, int, object | None]] = deque(maxlen=_MAX_OPEN_STEPS)
        self._step_model = step_model
        self._open_loads: deque[StepLoad] = deque(maxlen=_MAX_OPEN_STEPS)  # beside _open, with a model
        self._last_collected_s = float("-inf")
        self._steps: deque[StepTiming] = deque(maxlen=max_recent)
        self._finished: deque[FinishedRequestTiming] = deque(maxlen=max_recent)
        self._num_steps = 0
        self._num_finished = 0

    def launched(
        self, started_s: float, requests: Sequence[Request], num_new_tokens: Sequence[int], pending: object | None
    ) -> None:
        """A step was launched at `started_s` (call it after num_computed_tokens counts the new tokens)."""
        pairs = sum(n * r.num_computed_tokens for r, n in zip(requests, num_new_tokens))
        self._open.append((started_s, sum(num_new_tokens), pairs, pending))
        if self._step_model is not None:
            load = StepLoad()
            for r, n in zip(requests, num_new_tokens):
                load = load.with_chunk(r.num_prompt_tokens, r.num_computed_tokens - n, n)
            self._open_loads.append(load)

    def collected(self, pending: object) -> None:
        """`pending`'s tokens are on the host: its step, and every one launched before it, are done."""
        if not any(entry[3] is pending for entry in self._open):
            return
        first_s = self._open[0][0]
        num_steps = num_tokens = num_pairs = 0
        load = StepLoad()
        while self._open:
            _, tokens, pairs, owner = self._open.popleft()
            num_steps, num_tokens, num_pairs = num_steps + 1, num_tokens + tokens, num_pairs + pairs
            if self._open_loads:
                load += self._open_loads.popleft()
            if owner is pending:
                break
        now = time.monotonic()
        self._steps.append(StepTiming(self._num_steps, num_steps, num_tokens, num_pairs, now - first_s))
        self._num_steps += 1
        if self._step_model is not None:
            self._step_model.observe(load, num_steps, now - max(first_s, self._last_collected_s))
        self._last_collected_s = now

    def finished(self, request: Request, end_s: float) -> None:
        """`request` ended here at `end_s` (not aborted) after its first token."""
        first_s = request.first_token_s
        if first_s is None:
            return
        num_output = len(request.output_token_ids)
        tpot_s = (end_s - first_s) / (num_output - 1) if num_output > 1 else 0.0
        timing = FinishedRequestTiming(
            self._num_finished, request.request_id, num_output, first_s - request.arrival_time_s, tpot_s
        )
        self._finished.append(timing)
        self._num_finished += 1

    def recent_steps(self) -> list[StepTiming]:
        return list(self._steps)

    def recent_finished(self) -> list[FinishedRequestTiming]:
        return list(self._finished)
