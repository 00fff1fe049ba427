"""Continuous batching with chunked prefill, decodes first, and preemption by recompute.

Each step spends a token budget (`max_num_batched_tokens`):
  1. running requests, decodes before unfinished prefills, each asking for all its uncomputed
     tokens (one for a decode, the rest of the prompt for a prefill, cut to the budget);
  2. waiting requests in the waiting queue's order (preempted ones first; then arrival order, or
     Preble's priority groups by prefix-cache hit: services/engine/waiting_queue.py), while the
     budget lasts and fewer than `max_num_seqs` run, up to the first that does not fit; a new
     request first adopts its cached prefix blocks (unless it computes prompt logprobs: cached
     blocks have no logits), the device's and then, with a host tier, those restored from host
     memory; restored blocks that do not fit the device pool are recomputed instead.
In a step that decodes, prefill chunks (of running and waiting requests alike) share at most
`max_prefill_tokens_beside_decodes` of the budget, so that one long prompt stretches every running
request's inter-token gap by a bounded amount (Sarathi-Serve, OSDI 2024, "stall-free batching").
With SLOs (EngineConfig.ttft_slo_ms / tpot_slo_ms), an SLOAdmission gate further cuts or holds each
prefill chunk of a step that decodes so that the predicted step time stays within the TPOT SLO, and
the waiting queue orders requests by TTFT slack (LayerKV: services/engine/slo_admission.py). Without
them (the default) neither exists and the rules above are all there is.

When the KV pool cannot supply a running request's blocks, the latest-arrived request not yet
scheduled this step is preempted: its blocks are freed, its computed count reset to zero, and
it goes back to the front of the waiting queue to recompute prompt plus output later. A request
that would have to preempt itself waits instead. New requests never preempt. Progress is
guaranteed because `add_request` refuses any request that could not fit in the pool alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.engine.kv_cache.manager import KVCacheManager
from services.engine.request import Request, RequestStatus
from services.engine.slo_admission import SLOAdmission
from services.engine.step_model import StepLoad
from services.engine.waiting_queue import WaitingQueue, make_waiting_queue


@dataclass
class ScheduledBatch:
    """One step's work, in batch order (decodes first)."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.requests

    def add(self, request: Request, num_new_tokens: int) -> None:
        self.requests.append(request)
        self.num_new_tokens.append(num_new_tokens)


class Scheduler:
    def __init__(
        self,
        kv_cache: KVCacheManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_prefill_tokens_beside_decodes: int | None = None,
        scheduling_policy: str = "fcfs",
        slo: SLOAdmission | None = None,
    ) -> None:
        self.kv_cache = kv_cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_tokens_beside_decodes = max_prefill_tokens_beside_decodes
        self.max_num_seqs = max_num_seqs
        self.slo = slo  # None: no SLO, admission by budget and KV room alone
        priority_key = slo.priority_key if slo is not None and slo.ttft_slo_s is not None else None
        self.waiting: WaitingQueue = make_waiting_queue(scheduling_policy, self._num_adoptable_tokens, priority_key)
        self.running: list[Request] = []  # arrival order
        self.num_preemptions_total = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # Load, for the router (read from the worker's stats calls, possibly on another thread: each reads
    # a copy of the queue, which list() takes in one C call under the GIL, then sums outside it).

    @property
    def queued_prefill_tokens(self) -> int:
        """Prefill work accepted and not done: the tokens not yet computed of every waiting request and
        of every running request still in its prompt (a preempted one recomputes prompt and output)."""
        waiting, running = list(self.waiting), list(self.running)
        return sum(r.num_tokens - r.num_computed_tokens for r in waiting) + sum(
            r.num_tokens - r.num_computed_tokens for r in running if r.num_computed_tokens < r.num_prompt_tokens
        )

    @property
    def num_decoding(self) -> int:
        """Running requests past their prompt: the decode batch."""
        return sum(1 for r in list(self.running) if r.num_computed_tokens >= r.num_prompt_tokens)

    @property
    def num_slo_held_total(self) -> int:
        """Prefill chunks the TPOT SLO held back entirely (0 without an SLO)."""
        return self.slo.num_held_total if self.slo is not None else 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """A request whose KV is already in place (imported): it joins the running set directly."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget, capped = self._schedule_running(batch, self.max_num_batched_tokens)
        if not capped:
            budget = self._prefill_budget(batch, budget)
        self._schedule_waiting(batch, budget)
        return batch

    def _prefill_budget(self, batch: ScheduledBatch, budget: int) -> int:
        """What is left of `budget` for prefill chunks, given the decodes `batch` holds so far."""
        if self.max_prefill_tokens_beside_decodes is None or batch.empty:
            return budget
        return min(budget, self.max_prefill_tokens_beside_decodes)

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> tuple[int, bool]:
        """Schedule running requests; returns the budget left and whether the prefill cap is applied."""
        order = sorted(self.running, key=lambda r: r.num_computed_tokens < r.num_prompt_tokens)  # decodes first
        # a request its step in flight will end (asynchronous scheduling) gets no more work
        pending = [r for r in order if not r.certain_to_finish]
        capped = False
        while pending and budget > 0:
            request = pending.pop(0)
            if not capped and request.num_computed_tokens < request.num_prompt_tokens:  # the first prefill
                budget, capped = self._prefill_budget(batch, budget), True
                if budget <= 0:
                    break
            num_new = min(request.num_tokens_with_pending - request.num_computed_tokens, budget)
            if capped and self.slo is not None:  # a prompt chunk: the TPOT SLO may cut or hold it
                num_new = self.slo.fit_chunk(_load(batch), request, request.num_computed_tokens, num_new)
                if not num_new:
                    return 0, capped  # held: no more prefill this step
            while not self.kv_cache.allocate_slots(request, num_new):
                if not pending:  # only itself left to preempt: wait for others to finish
                    num_new = 0
                    break
                victim = max(pending, key=lambda r: r.arrival_time_s)
                pending.remove(victim)
                self._preempt(victim, batch)
            if num_new:
                batch.add(request, num_new)
                budget -= num_new
        return budget, capped

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        preempted_now = set(id(r) for r in batch.preempted)
        self.waiting.refresh()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting.peek()
            if id(request) in preempted_now or request.num_pending_tokens:
                break  # preempted in this step, or its token of a step in flight not in yet: it waits
            max_new = self._slo_chunk(batch, request, budget)
            if not max_new:
                break  # held by the TPOT SLO
            num_computed = self._admit(request, max_new)
            if num_computed is None:
                break
            num_new = min(request.num_tokens - num_computed, max_new)
            self.waiting.pop()
            request.num_computed_tokens = num_computed
            if request.num_preemptions == 0:
                request.num_cached_prompt_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.add(request, num_new)
            budget -= num_new

    def _admit(self, request: Request, max_new: int) -> int | None:
        """Allocate a waiting request's blocks: its cached prefix, then up to `max_new` tokens to compute.
        Returns the prefix's tokens (computed from now on), or None when the pool has no room."""
        kv_cache, block_size = self.kv_cache, self.kv_cache.block_size
        # cached blocks have no logits: a request still computing prompt logprobs adopts none
        computed = [] if request.computes_prompt_logprobs else kv_cache.get_computed_blocks(request)
        restored = [] if request.computes_prompt_logprobs else kv_cache.get_host_hits(request, len(computed))
        num_computed = (len(computed) + len(restored)) * block_size
        if kv_cache.allocate_slots(request, min(request.num_tokens - num_computed, max_new), computed, restored):
            return num_computed
        if not restored:
            return None
        # no device room for the restored blocks: they are misses, recomputed in their turn
        num_computed = len(computed) * block_size
        if kv_cache.allocate_slots(request, min(request.num_tokens - num_computed, max_new), computed):
            return num_computed
        return None

    def _slo_chunk(self, batch: ScheduledBatch, request: Request, budget: int) -> int:
        """The most tokens a waiting request may compute this step: the budget, or what the TPOT SLO lets
        (0: held). Asked on the probe's cached prefix, before `get_computed_blocks` (which counts a lookup in
        the prefix-cache metrics: a request held step after step would count every step). The probe
        matches hashes alone, so it finds at least what adoption does: a chunk after fewer cached tokens
        has less context and costs no more."""
        if self.slo is None:
            return budget
        num_cached = self._num_adoptable_tokens(request)
        return self.slo.fit_chunk(_load(batch), request, num_cached, min(request.num_tokens - num_cached, budget))

    def _num_adoptable_tokens(self, request: Request) -> int:
        """Cached prefix tokens a waiting request would adopt now (the waiting queue's probe)."""
        return 0 if request.computes_prompt_logprobs else self.kv_cache.num_cached_prefix_tokens(request)

    def _preempt(self, request: Request, batch: ScheduledBatch) -> None:
        self.kv_cache.free(request.request_id)
        self.running.remove(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.push_front(request)
        batch.preempted.append(request)

    # ------------------------------------------------------------------ updates

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of the queues and free its blocks (unless it keeps them: export, handoff)."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if not request.keeps_kv:
            self.kv_cache.free(request.request_id)


def _load(batch: ScheduledBatch) -> StepLoad:
    """The work `batch` holds so far (its requests' computed counts are still those before the step)."""
    load = StepLoad()
    for request, num_new in zip(batch.requests, batch.num_new_tokens):
        load = load.with_chunk(request.num_prompt_tokens, request.num_computed_tokens, num_new)
    return load
