"""Prefix affinity: SGLang's cache-aware routing (sgl-router `cache_aware.rs`) on the event-fed index.

Per request, over the candidates:

    load(w)    = num_running(w) + num_waiting(w)               requests; waiting includes the
                                                               router's in-flight placements
    imbalanced = max_load - min_load > balance_abs_threshold
                 and max_load > balance_rel_threshold * min_load
    ratio(w)   = hit_tokens(w) / num_prompt_tokens             hits as the engine counts them, a
                                                               host-tier hit at host_tier_hit_weight
                                                               (PrefillRequest.effective_hit_tokens)

    1. imbalanced                   -> the least loaded worker        "balance"
    2. max ratio > cache_threshold  -> the worker of max ratio        "cache_hit"
                                       (least loaded among equals)
    3. otherwise                    -> the least loaded worker        "least_load"

Both thresholds must be exceeded for the load to count as imbalanced: the absolute one keeps a
small cluster from flapping (3 vs 1 requests is "3x" but nothing), the relative one keeps a busy
cluster from chasing small differences. Ties go to the earliest candidate.

Differences from sgl-router: the match comes from the workers' KV events, not from a tree of the
router's own guesses; the router's recent placements enter it only as pending claims that those
events settle or that expire (services.router.index), which is what keeps a burst sharing a new
prefix together before the first event arrives. A miss goes to the least loaded worker rather than
to the one with the smallest tree, since free KV room is already in each worker's snapshot.

Bursts. Back-to-back requests sharing a prefix that is most of each prompt all take "cache_hit" on
the worker of the first, each adding one waiting request to its load, until that worker leads the
least loaded one by more than balance_abs_threshold requests (and by balance_rel_threshold): with
idle peers the (balance_abs_threshold + 2)-th request of the burst, by default the 34th, goes
elsewhere ("balance"), which then claims the prefix too, so later requests choose the less loaded
of the two holders. That split is this policy's intended load balancing, not a premature one.

Tunables (PrefixAffinityConfig):
  cache_threshold        0.5   match ratio a cache hit must exceed
  balance_abs_threshold  32    requests by which max load must exceed min load
  balance_rel_threshold  1.5   factor by which max load must exceed min load
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.router.load import LoadView
from services.router.policies.base import Decision, Policy, PrefillRequest, least_cost


@dataclass(frozen=True)
class PrefixAffinityConfig:
    cache_threshold: float = 0.5
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.5


class PrefixAffinity(Policy):
    name = "prefix_affinity"

    def __init__(self, config: PrefixAffinityConfig = PrefixAffinityConfig()) -> None:
        self.cache_threshold = config.cache_threshold
        self.balance_abs_threshold = config.balance_abs_threshold
        self.balance_rel_threshold = config.balance_rel_threshold

    def choose_prefill(
        self, request: PrefillRequest, candidates: Sequence[str], index_match: Mapping[str, int], load: LoadView
    ) -> Decision:
        loads: dict[str, float] = {}
        for w in candidates:
            worker_load = load.get(w)
            loads[w] = worker_load.num_running + worker_load.num_waiting
        least_loaded = least_cost(candidates, loads)
        if self.is_imbalanced(max(loads.values()), loads[least_loaded]):
            return Decision(least_loaded, "balance")
        best, best_hit_tokens = least_loaded, 0.0
        for w in candidates:
            hit_tokens = request.effective_hit_tokens(w, index_match.get(w, 0))
            if hit_tokens > best_hit_tokens or (hit_tokens == best_hit_tokens > 0 and loads[w] < loads[best]):
                best, best_hit_tokens = w, hit_tokens
        if best_hit_tokens > self.cache_threshold * request.num_prompt_tokens:
            return Decision(best, "cache_hit")
        return Decision(least_loaded, "least_load")

    def is_imbalanced(self, max_load: float, min_load: float) -> bool:
        return max_load - min_load > self.balance_abs_threshold and max_load > self.balance_rel_threshold * min_load
