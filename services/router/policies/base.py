"""The interface every prefill placement policy implements.

Contract:
  * The router calls `choose_prefill` once per request, from one thread, and always follows the
    decision; a policy may therefore update its own state (counters, windows) inside the call.
  * `candidates` is non-empty and in a fixed order; ties go to the earliest candidate.
  * `index_match` maps worker -> leading blocks of the request that worker holds on its device
    (held or claimed; absent: none). It may name workers that are not candidates; a policy ignores
    them. The blocks a worker would restore from its host tier right after those are in
    `request.host_match`; a policy that scores hits reads `request.effective_hit_tokens`, which
    counts them at `request.host_tier_hit_weight` each, below a device hit.
  * `load` is read only: the policy never adds in-flight estimates (the router does, after the
    decision).
  * `bind_index` is called once, by the router that owns the policy, with its prefix index; a policy
    that weighs what each worker caches beyond `index_match` reads it there and never changes it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from services.router.index import PrefixIndex
from services.router.load import LoadView


@dataclass(frozen=True, slots=True)
class Decision:
    worker: str
    reason: str  # short label for metrics: "cache_hit", "balance", "explore", "exploit", ...


_NO_HOST_MATCH: Mapping[str, int] = MappingProxyType({})

# What a host-tier hit is worth against a device hit (NVIDIA Dynamo's default host credit): its
# blocks are copied back over PCIe, cheaper than recomputing them, dearer than finding them on the device.
DEFAULT_HOST_TIER_HIT_WEIGHT = 0.75


@dataclass(frozen=True, slots=True)
class PrefillRequest:
    """What a policy sees of a request: its block hashes and sizes, and what workers hold of it on
    their host tier (PrefixIndex.match_tiers)."""

    request_id: str
    block_hashes: Sequence[int]  # one per full block of the prompt
    num_prompt_tokens: int
    block_size: int
    # worker -> further leading blocks it holds on its host tier right after its device match
    host_match: Mapping[str, int] = field(default_factory=lambda: _NO_HOST_MATCH)
    host_tier_hit_weight: float = DEFAULT_HOST_TIER_HIT_WEIGHT  # a host-tier hit token, in device hit tokens

    def hit_tokens(self, num_matched_blocks: int) -> int:
        """Prompt tokens a worker holding `num_matched_blocks` leading blocks would not recompute.

        As the engine counts hits: whole blocks, and never the block holding the last prompt
        token (its logits must be computed), so at most (num_prompt_tokens - 1) // block_size.
        """
        max_hit_blocks = max(0, self.num_prompt_tokens - 1) // self.block_size
        return min(num_matched_blocks, max_hit_blocks) * self.block_size

    def host_hit_tokens(self, worker: str, num_device_blocks: int) -> int:
        """Prompt tokens `worker` would restore from its host tier after its `num_device_blocks` (same cap)."""
        num_host_blocks = self.host_match.get(worker, 0)
        if not num_host_blocks:
            return 0
        return self.hit_tokens(num_device_blocks + num_host_blocks) - self.hit_tokens(num_device_blocks)

    def effective_hit_tokens(self, worker: str, num_device_blocks: int) -> float:
        """What `worker`'s hit is worth, in device hit tokens: its device hit plus
        host_tier_hit_weight x its host-tier hit. Equals hit_tokens(num_device_blocks) without host blocks."""
        device = self.hit_tokens(num_device_blocks)
        if not self.host_match:
            return device
        return device + self.host_tier_hit_weight * self.host_hit_tokens(worker, num_device_blocks)


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
