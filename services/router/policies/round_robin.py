"""Round robin: the i-th request goes to candidates[i % len(candidates)].

The baseline that ignores both cache and load. No tunables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from services.router.load import LoadView
from services.router.policies.base import Decision, Policy, PrefillRequest


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._num_requests = 0

    def choose_prefill(
        self, request: PrefillRequest, candidates: Sequence[str], index_match: Mapping[str, int], load: LoadView
    ) -> Decision:
        worker = candidates[self._num_requests % len(candidates)]
        self._num_requests += 1
        return Decision(worker, "round_robin")
