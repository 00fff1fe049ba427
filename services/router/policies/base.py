"""The interface every prefill placement policy implements.

Contract:
  * The router calls `choose_prefill` once per request, from one thread, and always follows the
    decision; a policy may therefore update its own state (counters, windows) inside the call.
  * `candidates` is non-empty and in a fixed order; ties go to the earliest candidate.
  * `index_match` maps worker -> leading blocks of the request that worker holds (absent: none).
    It may name workers that are not candidates; a policy ignores them.
  * `load` is read only: the policy never adds in-flight estimates (the router does, after the
    decision).
  * `bind_index` is called once, by the router that owns the policy, with its prefix index; a policy
    that weighs what each worker caches beyond `index_match` reads it there and never changes it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.router.index import PrefixIndex
from services.router.load import LoadView


@dataclass(frozen=True, slots=True)
class Decision:
    worker: str
    reason: str  # short label for metrics: "cache_hit", "balance", "explore", "exploit", ...


@dataclass(frozen=True, slots=True)
class PrefillRequest:
    """What a policy sees of a request: its block hashes and sizes."""

    request_id: str
    block_hashes: Sequence[int]  # one per full block of the prompt
    num_prompt_tokens: int
    block_size: int

    def hit_tokens(self, num_matched_blocks: int) -> int:
        """Prompt tokens a worker holding `num_matched_blocks` leading blocks would not recompute.

        As the engine counts hits: whole blocks, and never the block holding the last prompt
        token (its logits must be computed), so at most (num_prompt_tokens - 1) // block_size.
        """
        max_hit_blocks = max(0, self.num_prompt_tokens - 1) // self.block_size
        return min(num_matched_blocks, max_hit_blocks) * self.block_size


class Policy(ABC):
    name: str

    @abstractmethod
    def choose_prefill(
        self, request: PrefillRequest, candidates: Sequence[str], index_match: Mapping[str, int], load: LoadView
    ) -> Decision:
        """The prefill worker for this request, with the reason for the choice."""

    def bind_index(self, index: PrefixIndex) -> None:
        """The router's prefix index, read only (see the module doc). Most policies need only index_match."""
        return None


def least_cost(candidates: Sequence[str], cost: Mapping[str, float]) -> str:
    """The candidate of lowest cost, the earliest among equals."""
    best = candidates[0]
    best_cost = cost[best]
    for worker in candidates[1:]:
        if cost[worker] < best_cost:
            best, best_cost = worker, cost[worker]
    return best
