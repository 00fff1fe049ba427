"""The router's view of every worker's load: the last snapshot plus what the router placed since.

Snapshots arrive every few hundred milliseconds, placements every few hundred microseconds; two
placements made between snapshots must see each other, or a burst lands on one worker. So each
placement leaves an in-flight estimate on the workers it chose (prefill tokens still to compute,
one waiting request, KV blocks it will take, one more decoding sequence), and `get` returns the
snapshot plus the in-flight estimates:

    placed ─────────────▶ acknowledged ─────────────▶ next snapshot of that worker
            counted in flight           still counted            now in the snapshot: dropped

An estimate leaves when the worker's first snapshot after `acknowledge` arrives (the snapshot
counts the request itself from then on), on `release` (the placement was abandoned), or after
`inflight_ttl_s` whatever happened (a lost acknowledgement must not inflate a worker for ever).

The decode term some policies weigh is smoothed: `mean_decoding` is the mean of the worker's
num_decoding over the snapshots of the last `decode_window_s` seconds (the latest one always
counts), plus the in-flight decodes; a decode batch that happens to drain at one sample does not
make the worker look idle.

A worker with no snapshot yet reads as idle, with unbounded free KV blocks (UNBOUNDED_FREE_BLOCKS):
at start-up nothing is known and nothing is running.

Timings. A snapshot may carry the worker's latest timings (SchedulerStats.recent_steps and
recent_finished: step durations with their token counts; finished requests' TTFT, TPOT and output
length). Each is a ring the worker resends; `update` keeps the entries it has not seen (by seq, per
worker; a worker counting from 0 again restarted) in two logs of the last MAX_TIMINGS entries over
all workers, numbered in arrival order. A reader keeps a cursor (`step_timings_since(cursor)`,
`finished_since(cursor)`) and reads only what came after it; what the logs dropped meanwhile is lost.

Tunables (defaults in RouterConfig):
  inflight_ttl_s   2.0   seconds an in-flight estimate lives at most
  decode_window_s  5.0   seconds of snapshots averaged by mean_decoding
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from services.common.control import FinishedRequestTiming, StepTiming

UNBOUNDED_FREE_BLOCKS = 1 << 40
MAX_TIMINGS = 4096  # entries each timings log keeps, over all workers

T = TypeVar("T", StepTiming, FinishedRequestTiming)


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    worker: str
    stage: str  # "colocated", "prefill", "decode", "encode"
    num_running: int  # requests in the running batch
    num_waiting: int  # requests queued on the worker
    kv_usage: float  # 0..1 of usable KV blocks referenced by requests
    num_free_blocks: int  # KV blocks a new request can take (cached-but-unreferenced count as free)
    queued_prefill_tokens: int  # prompt tokens accepted but not yet prefilled
    num_decoding: int  # sequences in the decode batch
    num_total_blocks: int = 0  # usable KV blocks of the device tier; 0: not reported
    recent_steps: tuple[StepTiming, ...] = ()  # the worker's latest step timings (see the module doc)
    recent_finished: tuple[FinishedRequestTiming, ...] = ()  # ... and finished requests' timings

    @classmethod
    def from_snapshot(
        cls,
        snapshot: SnapshotFields,
        *,
        num_free_blocks: int,
        queued_prefill_tokens: int = 0,
        num_decoding: int | None = None,
    ) -> WorkerLoad:
        """From the gateway's WorkerSnapshot plus the fields it does not carry.

        Without `num_decoding`, decode and colocated workers count every running request as decoding.
        """
        if num_decoding is None:
            num_decoding = snapshot.num_running if snapshot.stage in ("decode", "colocated") else 0
        return cls(
            snapshot.worker,
            snapshot.stage,
            snapshot.num_running,
            snapshot.num_waiting,
            snapshot.kv_cache_usage,
            num_free_blocks,
            queued_prefill_tokens,
            num_decoding,
        )


class SnapshotFields(Protocol):
    """The fields of services.gateway.backend.WorkerSnapshot the router reads."""

    @property
    def worker(self) -> str: ...
    @property
    def stage(self) -> str: ...
    @property
    def num_running(self) -> int: ...
    @property
    def num_waiting(self) -> int: ...
    @property
    def kv_cache_usage(self) -> float: ...


@dataclass(slots=True)
class _InFlight:
    request_id: str
    worker: str
    placed_at: float
    prefill_tokens: int
    requests: int
    kv_blocks: int
    decoding: int
    acknowledged: bool = False
    removed: bool = False


@dataclass(slots=True)
class _Totals:
    prefill_tokens: int = 0
    requests: int = 0
    kv_blocks: int = 0
    decoding: int = 0


class LoadView:
    """Per-worker load: snapshots (`update`) plus the router's in-flight placements (`add_inflight`)."""

    def __init__(
        self, inflight_ttl_s: float = 2.0, decode_window_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.inflight_ttl_s = inflight_ttl_s
        self.decode_window_s = decode_window_s
        self._clock = clock
        self._loads: dict[str, WorkerLoad] = {}
        self._totals: dict[str, _Totals] = {}
        self._by_request: dict[str, list[_InFlight]] = {}
        self._by_age: deque[_InFlight] = deque()
        self._acknowledged: dict[str, list[_InFlight]] = {}  # worker -> acknowledged, awaiting its snapshot
        self._decode_samples: dict[str, deque[tuple[float, int]]] = {}
        self._decode_sums: dict[str, int] = {}
        # worker -> get()'s answer while neither its snapshot nor its in-flight totals change (the
        # router asks for one worker's load several times a placement)
        self._effective: dict[str, WorkerLoad] = {}
        self._steps = _TimingLog[StepTiming]()
        self._finished = _TimingLog[FinishedRequestTiming]()

    def now(self) -> float:
        """The router's clock (seconds; monotonic), shared with the policies' windows."""
        return self._clock()

    # ------------------------------------------------------------------ snapshots

    def update(self, load: WorkerLoad) -> None:
        """A fresh snapshot of one worker; it now counts the requests acknowledged before it."""
        now = self._clock()
        self._loads[load.worker] = load
        self._effective.pop(load.worker, None)
        for entry in self._acknowledged.pop(load.worker, ()):
            self._remove(entry)
        samples = self._decode_samples.setdefault(load.worker, deque())
        samples.append((now, load.num_decoding))
        self._decode_sums[load.worker] = self._decode_sums.get(load.worker, 0) + load.num_decoding
        if load.recent_steps:
            self._steps.add(load.worker, load.recent_steps)
        if load.recent_finished:
            self._finished.add(load.worker, load.recent_finished)

    def remove_worker(self, worker: str) -> None:
        self._loads.pop(worker, None)
        self._effective.pop(worker, None)
        self._decode_samples.pop(worker, None)
        self._decode_sums.pop(worker, None)
        self._acknowledged.pop(worker, None)
        self._steps.forget(worker)
        self._finished.forget(worker)
        doomed = [entry for entries in self._by_request.values() for entry in entries if entry.worker == worker]
        for entry in doomed:
            self._remove(entry)

    def step_timings_since(self, cursor: int) -> tuple[list[tuple[str, StepTiming]], int]:
        """(worker, timing) pairs logged after `cursor` (still kept), oldest first, and the cursor past them."""
        return self._steps.since(cursor)

    def finished_since(self, cursor: int) -> tuple[list[tuple[str, FinishedRequestTiming]], int]:
        """(worker, finished request) pairs logged after `cursor` (still kept), oldest first, and the next cursor."""
        return self._finished.since(cursor)

    def snapshot(self, worker: str) -> WorkerLoad:
        """The last snapshot alone (idle with unbounded room before the first one)."""
        load = self._loads.get(worker)
        return load if load is not None else WorkerLoad(worker, "", 0, 0, 0.0, UNBOUNDED_FREE_BLOCKS, 0, 0)

    # ------------------------------------------------------------------ effective load

    def get(self, worker: str) -> WorkerLoad:
        """The last snapshot plus the in-flight estimates on this worker."""
        self._expire()
        effective = self._effective.get(worker)
        if effective is not None:
            return effective
        base = self.snapshot(worker)
        extra = self._totals.get(worker)
        if extra is None:
            return base
        effective = self._effective[worker] = WorkerLoad(
            worker,
            base.stage,
            base.num_running,
            base.num_waiting + extra.requests,
            base.kv_usage,
            max(0, base.num_free_blocks - extra.kv_blocks),
            base.queued_prefill_tokens + extra.prefill_tokens,
            base.num_decoding + extra.decoding,
            base.num_total_blocks,
            base.recent_steps,
            base.recent_finished,
        )
        return effective

    def mean_decoding(self, worker: str) -> float:
        """num_decoding averaged over the last decode_window_s of snapshots, plus in-flight decodes."""
        self._expire()
        extra = self._totals.get(worker)
        inflight = extra.decoding if extra is not None else 0
        samples = self._decode_samples.get(worker)
        if not samples:
            return float(inflight)
        horizon = self._clock() - self.decode_window_s
        while len(samples) > 1 and samples[0][0] < horizon:
            self._decode_sums[worker] -= samples.popleft()[1]
        return self._decode_sums[worker] / len(samples) + inflight

    # ------------------------------------------------------------------ in-flight estimates

    def add_inflight(
        self,
        request_id: str,
        worker: str,
        *,
        prefill_tokens: int = 0,
        requests: int = 0,
        kv_blocks: int = 0,
        decoding: int = 0,
    ) -> None:
        """Count work just placed on `worker` until its snapshot does (or the estimate expires)."""
        entry = _InFlight(request_id, worker, self._clock(), prefill_tokens, requests, kv_blocks, decoding)
        self._by_request.setdefault(request_id, []).append(entry)
        self._by_age.append(entry)
        self._add_totals(entry, +1)

    def acknowledge(self, request_id: str, worker: str | None = None) -> None:
        """The worker (or every worker of the request) has accepted it: drop it at that worker's next snapshot."""
        for entry in self._by_request.get(request_id, ()):
            if not entry.acknowledged and (worker is None or entry.worker == worker):
                entry.acknowledged = True
                self._acknowledged.setdefault(entry.worker, []).append(entry)

    def release(self, request_id: str) -> None:
        """Forget a placement at once (aborted or failed before any worker counted it)."""
        for entry in list(self._by_request.get(request_id, ())):
            self._remove(entry)

    def num_inflight(self) -> int:
        """Requests with an in-flight estimate on some worker."""
        self._expire()
        return len(self._by_request)

    def _expire(self) -> None:
        by_age = self._by_age
        if not by_age:
            return
        horizon = self._clock() - self.inflight_ttl_s
        while by_age and (by_age[0].removed or by_age[0].placed_at < horizon):
            entry = by_age.popleft()
            if not entry.removed:
                self._remove(entry)

    def _remove(self, entry: _InFlight) -> None:
        if entry.removed:
            return
        entry.removed = True
        self._add_totals(entry, -1)
        entries = self._by_request.get(entry.request_id)
        if entries is not None:
            entries.remove(entry)
            if not entries:
                del self._by_request[entry.request_id]

    def _add_totals(self, entry: _InFlight, sign: int) -> None:
        self._effective.pop(entry.worker, None)
        totals = self._totals.setdefault(entry.worker, _Totals())
        totals.prefill_tokens += sign * entry.prefill_tokens
        totals.requests += sign * entry.requests
        totals.kv_blocks += sign * entry.kv_blocks
        totals.decoding += sign * entry.decoding
        if sign < 0 and not (totals.prefill_tokens or totals.requests or totals.kv_blocks or totals.decoding):
            del self._totals[entry.worker]


class _TimingLog(Generic[T]):
    """The last MAX_TIMINGS new entries of the workers' timing rings, numbered in arrival order."""

    def __init__(self) -> None:
        self._entries: deque[tuple[str, T]] = deque(maxlen=MAX_TIMINGS)
        self._num_logged = 0
        self._last_seq: dict[str, int] = {}  # worker -> the highest seq logged

    def add(self, worker: str, ring: tuple[T, ...]) -> None:
        last = self._last_seq.get(worker, -1)
        if ring[-1].seq < last:  # the worker counts from 0 again: it restarted
            last = -1
        for timing in ring:
            if timing.seq > last:
                self._entries.append((worker, timing))
                self._num_logged += 1
        self._last_seq[worker] = max(last, ring[-1].seq)

    def since(self, cursor: int) -> tuple[list[tuple[str, T]], int]:
        num_new = min(self._num_logged - cursor, len(self._entries))
        if num_new <= 0:
            return [], self._num_logged
        newest_first = list(itertools.islice(reversed(self._entries), num_new))
        return newest_first[::-1], self._num_logged

    def forget(self, worker: str) -> None:
        self._last_seq.pop(worker, None)
