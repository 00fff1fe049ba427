"""Least load: the candidate with the least prefill work waiting, ignoring the cache.

    cost(w) = queued_prefill_tokens(w) + running_weight * num_running(w)

queued_prefill_tokens includes the router's in-flight estimate (services.router.load), so two
placements between snapshots see each other. Ties go to the earliest candidate.

Tunables (LeastLoadConfig):
  running_weight  64.0  prompt tokens one running request weighs: it takes a share of every step
                        (its decode token, or its chunk of a prefill) from the new request
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.router.load import LoadView, WorkerLoad
from services.router.policies.base import Decision, Policy, PrefillRequest, least_cost


@dataclass(frozen=True)
class LeastLoadConfig:
    running_weight: float = 64.0


def least_load_cost(load: WorkerLoad, running_weight: float) -> float:
    return load.queued_prefill_tokens + running_weight * load.num_running


class LeastLoad(Policy):
    name = "least_load"

    def __init__(self, config: LeastLoadConfig = LeastLoadConfig()) -> None:
        self.running_weight = config.running_weight

    def choose_prefill(
        self, request: PrefillRequest, candidates: Sequence[str], index_match: Mapping[str, int], load: LoadView
    ) -> Decision:
        cost = {w: least_load_cost(load.get(w), self.running_weight) for w in candidates}
        return Decision(least_cost(candidates, cost), "least_load")
