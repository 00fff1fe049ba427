"""KV overlap: NVIDIA Dynamo's KV router cost, its default linear score, on the event-fed index.

Source: the Dynamo documentation, "Routing Concepts" (Cost Calculation, Worker Selection) and
"Configuration and Tuning" (Routing Behavior), https://docs.nvidia.com/dynamo/ under
components/router (ai-dynamo/dynamo docs/components/router/router-concepts.md and
router-configuration.md). Written from those descriptions, not from Dynamo's code.

Per request of n prompt tokens, block size b, over the candidates:

    prefill_blocks(w) = max(active_prefill_tokens(w) + n - overlap_score_credit * overlap_tokens(w), 0) / b
    decode_blocks(w)  = active_kv_blocks(w) + ceil(n / b)
    cost(w)           = prefill_load_scale * prefill_blocks(w) + decode_blocks(w)          lowest wins

    active_prefill_tokens(w)  queued_prefill_tokens of the load view: prompt tokens w has accepted and
                              not prefilled, plus the router's in-flight placements net of their hits
                              (Dynamo charges a request's uncached prompt until its first token)
    overlap_tokens(w)         b * (the leading prompt blocks w holds on its device (index_match, pending
                              claims included) + host_tier_hit_weight * the blocks it holds on its host
                              tier right after them (request.host_match)), every matched block counted
                              as Dynamo's indexer counts them
    active_kv_blocks(w)       KV blocks referenced by w's requests (the snapshot's kv_usage times w's
                              usable blocks) plus the KV blocks the router has placed on w since
    ceil(n / b)               the incoming request's blocks (Dynamo's incoming active blocks; the same on
                              every worker here, so it never changes the choice)

Both terms are in blocks, as Dynamo's: one block of prompt left to compute weighs as much as one block
of KV held by a running request, at the default prefill_load_scale of 1. Temperature 0 (Dynamo's
default) is the deterministic argmin; a host-tier block is credited at the router's host_tier_hit_weight
(RouterConfig, default 0.75, Dynamo's host tier weight); Dynamo's temperature > 0 softmax sampling,
credit decay (default 0: off), the disk tier (none here) and busy-threshold queueing are not
implemented. Ties go to the earliest candidate (Dynamo leaves the order among equal costs unspecified).

Older Dynamo releases called the prefill factor `kv-overlap-score-weight` (default 1) and wrote
cost = overlap_score_weight * prefill_blocks + decode_blocks: the role prefill_load_scale plays now.

A worker's usable blocks are its snapshot's num_total_blocks; where a snapshot does not report them,
they are recovered from kv_usage = 1 - free / usable (as the engine computes it) and remembered for the
snapshots where every block is in use. A worker not heard from yet holds no referenced blocks.

Tunables (KvOverlapConfig), Dynamo's flag and default:
  overlap_score_credit  1.0   --router-kv-overlap-score-credit: share of a cached prefix taken off the
                              prefill load (0 ignores the cache; above 1 gives extra credit)
  prefill_load_scale    1.0   --router-prefill-load-scale: weight of prefill blocks against decode blocks
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.router.load import UNBOUNDED_FREE_BLOCKS, LoadView, WorkerLoad
from services.router.policies.base import Decision, Policy, PrefillRequest, least_cost


@dataclass(frozen=True)
class KvOverlapConfig:
    overlap_score_credit: float = 1.0
    prefill_load_scale: float = 1.0


class KvOverlap(Policy):
    name = "kv_overlap"

    def __init__(self, config: KvOverlapConfig = KvOverlapConfig()) -> None:
        self.overlap_score_credit = config.overlap_score_credit
        self.prefill_load_scale = config.prefill_load_scale
        self._num_usable_blocks: dict[str, float] = {}  # worker -> usable KV blocks recovered from snapshots

    def choose_prefill(
        self, request: PrefillRequest, candidates: Sequence[str], index_match: Mapping[str, int], load: LoadView
    ) -> Decision:
        cost = self.costs(request, candidates, index_match, load)
        worker = least_cost(candidates, cost)
        hit = index_match.get(worker, 0) > 0 or request.host_match.get(worker, 0) > 0
        return Decision(worker, "cache_hit" if hit else "least_cost")

    def costs(
        self, request: PrefillRequest, candidates: Sequence[str], index_match: Mapping[str, int], load: LoadView
    ) -> dict[str, float]:
        """cost(w) of every candidate, in blocks."""
        block_size = request.block_size
        incoming_blocks = -(-request.num_prompt_tokens // block_size)
        host_match, host_weight = request.host_match, request.host_tier_hit_weight
        cost = {}
        for w in candidates:
            overlap_tokens = (index_match.get(w, 0) + host_weight * host_match.get(w, 0)) * block_size
            prefill_tokens = (
                load.get(w).queued_prefill_tokens
                + request.num_prompt_tokens
                - self.overlap_score_credit * overlap_tokens
            )
            prefill_blocks = max(prefill_tokens, 0.0) / block_size
            decode_blocks = self.active_kv_blocks(w, load) + incoming_blocks
            cost[w] = self.prefill_load_scale * prefill_blocks + decode_blocks
        return cost

    def active_kv_blocks(self, worker: str, load: LoadView) -> float:
        """Blocks referenced by the worker's requests at its last snapshot, plus those placed there since."""
        snapshot = load.snapshot(worker)
        placed_since = snapshot.num_free_blocks - load.get(worker).num_free_blocks
        return snapshot.kv_usage * self._usable_blocks(snapshot) + placed_since

    def _usable_blocks(self, snapshot: WorkerLoad) -> float:
        if snapshot.num_total_blocks:
            return float(snapshot.num_total_blocks)
        if snapshot.kv_usage < 1.0 and snapshot.num_free_blocks < UNBOUNDED_FREE_BLOCKS:
            self._num_usable_blocks[snapshot.worker] = snapshot.num_free_blocks / (1.0 - snapshot.kv_usage)
        return self._num_usable_blocks.get(snapshot.worker, 0.0)
