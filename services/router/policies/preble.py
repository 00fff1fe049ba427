"""Preble's E2 placement: exploit a cached prefix when it is most of the prompt, else explore by cost.

After Srivatsa et al., "Preble: Efficient Distributed Prompt Scheduling for LLM Serving" (2024).

Per request of n prompt tokens, over the candidates:

    m(w)   tokens worker w would not recompute (its cached prefix, counted as the engine counts
           hits: whole blocks, never the block of the last prompt token)
    m      = max_w m(w)          the longest cached prefix anywhere
    rest   = n - m               the tokens left to compute even at the best worker

    exploit  (m > rest):  among the workers with m(w) = m, the one of lowest cost    "exploit"
    explore  (m <= rest): over all candidates, the one of lowest cost                "explore"

so m == rest explores and one more cached block exploits. Load cost, in prompt-token
equivalents of prefill work:

    cost(w)        = prefill(n, m(w)) + base(w)
    base(w)        = queued_prefill_tokens(w) + decode_token_weight * decoding(w)
    prefill(n, c)  = (n - c) + attention_weight * (n^2 - c^2) / 2
    decoding(w)    = w's num_decoding averaged over the last decode_window_s of snapshots,
                     plus the router's in-flight decodes (services.router.load)

prefill(n, c) is the work of computing tokens c..n-1: the linear part (projections and MLP) is
one unit per token; token i also attends to i earlier tokens, which the optional quadratic term
counts (sum over i of i = (n^2 - c^2) / 2). attention_weight is the attention FLOPs of one
(query, key) pair over the linear FLOPs of one token, 4 * layers * d_model / (2 * params): about
3e-5 for an 8B Llama, which makes an 8k-token prompt about 13% dearer than linear. It defaults to
0 (pure token counts) because the linear term dominates below ~16k tokens and token counts are
what the snapshots report. queued_prefill_tokens includes the router's in-flight estimate, so
placements between snapshots see each other. Preble's eviction term (the cost of the cached
blocks a request would push out) is left out: the index carries no per-block hit rates.

Post-assignment adjustments (both only ever move an exploit):

  rebalance  Once the policy has placed warmup_requests requests, let B and L be the candidates
             of highest and lowest base(w). If the exploit target is B, and
             base(B) > rebalance_ratio * base(L) and base(B) - base(L) > rebalance_min_tokens,
             the request goes to L instead ("rebalance"). The absolute gap keeps a near-idle
             cluster (base(L) = 0, base(B) = a few tokens) from throwing cache hits away.

  replicate  Over the last window_s seconds the policy counts its placements per worker and,
             for exploits, per (worker, prefix), a prefix named by the hash of its last matched
             block. When the exploit target is the only candidate holding the prefix, and that
             prefix had at least replicate_min_requests of the worker's placements and more than
             replicate_share of them, the request goes to the lowest-cost other candidate
             ("replicate"), which then caches the prefix too; later requests for it choose between
             the holders by cost. A prefix is replicated at most once per replicate_cooldown_s
             (its second holder shows in the index at once, by the replica's pending claims,
             which ends the single-holder condition anyway).

Bursts. The router's pending claims (services.router.index) make a request sharing the prefix of
one placed a microsecond earlier see it as cached there. So a back-to-back burst sharing a new
prefix longer than each suffix explores once and then exploits that worker; the first split is the
replication above, by default at the 10th request of the burst (the 2nd..9th are 8 exploits, more
than half of the holder's 9 placements), Preble's intended spreading of a hot prefix. Rebalancing
needs warmup_requests placements first.

Ties go to the earliest candidate.

Tunables (PrebleConfig):
  decode_token_weight     32.0    prompt tokens of work one sequence in the decode batch weighs
  attention_weight        0.0     quadratic attention term of prefill(n, c); 0 = linear
  warmup_requests         100     placements before rebalancing may start
  rebalance_ratio         2.0     base(B) / base(L) that must be exceeded to rebalance
  rebalance_min_tokens    4096.0  base(B) - base(L) that must be exceeded to rebalance
  replicate_share         0.5     share of a worker's recent placements a prefix must exceed
  replicate_min_requests  8       recent placements of a prefix on its holder before replicating
  replicate_cooldown_s    10.0    seconds between two replications of one prefix
  window_s                60.0    seconds of placements the replication counts cover
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from services.router.load import LoadView
from services.router.policies.base import Decision, Policy, PrefillRequest, least_cost

K = TypeVar("K", bound=Hashable)

# Replication timestamps kept before old ones (past the cooldown) are pruned.
_MAX_REPLICATED_PREFIXES = 4096


@dataclass(frozen=True)
class PrebleConfig:
    decode_token_weight: float = 32.0
    attention_weight: float = 0.0
    warmup_requests: int = 100
    rebalance_ratio: float = 2.0
    rebalance_min_tokens: float = 4096.0
    replicate_share: float = 0.5
    replicate_min_requests: int = 8
    replicate_cooldown_s: float = 10.0
    window_s: float = 60.0


class _PlacementWindow:
    """Placements of the last window_s seconds: counts per worker and per (worker, prefix)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._entries: deque[tuple[float, str, int | None]] = deque()
        self._per_worker: dict[str, int] = {}
        self._per_prefix: dict[tuple[str, int], int] = {}

    def add(self, now: float, worker: str, prefix: int | None) -> None:
        self._expire(now)
        self._entries.append((now, worker, prefix))
        self._per_worker[worker] = self._per_worker.get(worker, 0) + 1
        if prefix is not None:
            self._per_prefix[worker, prefix] = self._per_prefix.get((worker, prefix), 0) + 1

    def counts(self, now: float, worker: str, prefix: int) -> tuple[int, int]:
        """(placements of `prefix` on `worker`, all placements on `worker`) within the window."""
        self._expire(now)
        return self._per_prefix.get((worker, prefix), 0), self._per_worker.get(worker, 0)

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        entries = self._entries
        while entries and entries[0][0] < horizon:
            _, worker, prefix = entries.popleft()
            _decrement(self._per_worker, worker)
            if prefix is not None:
                _decrement(self._per_prefix, (worker, prefix))


def _decrement(counts: dict[K, int], key: K) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


class Preble(Policy):
    name = "preble"

    def __init__(self, config: PrebleConfig = PrebleConfig()) -> None:
        self.config = config
        self._num_requests = 0
        self._window = _PlacementWindow(config.window_s)
        self._replicated_at: dict[int, float] = {}  # prefix -> when it was last replicated

    def prefill_cost(self, num_prompt_tokens: int, num_cached_tokens: int) -> float:
        n, c = num_prompt_tokens, num_cached_tokens
        return (n - c) + self.config.attention_weight * (n * n - c * c) / 2

    def base_cost(self, worker: str, load: LoadView) -> float:
        queued = load.get(worker).queued_prefill_tokens
        return queued + self.config.decode_token_weight * load.mean_decoding(worker)

    def choose_prefill(
        self, request: PrefillRequest, candidates: Sequence[str], index_match: Mapping[str, int], load: LoadView
    ) -> Decision:
        n = request.num_prompt_tokens
        hits = {w: request.hit_tokens(index_match.get(w, 0)) for w in candidates}
        base = {w: self.base_cost(w, load) for w in candidates}
        cost = {w: self.prefill_cost(n, hits[w]) + base[w] for w in candidates}
        matched = max(hits.values())
        now = load.now()
        if matched > n - matched:
            holders = [w for w in candidates if hits[w] == matched]
            prefix = request.block_hashes[matched // request.block_size - 1]
            decision = self._exploit(holders, prefix, candidates, base, cost, now)
        else:
            decision, prefix = Decision(least_cost(candidates, cost), "explore"), None
        self._num_requests += 1
        self._window.add(now, decision.worker, prefix)
        return decision

    def _exploit(
        self,
        holders: list[str],
        prefix: int,
        candidates: Sequence[str],
        base: dict[str, float],
        cost: dict[str, float],
        now: float,
    ) -> Decision:
        target = least_cost(holders, cost)
        least_busy = least_cost(candidates, base)
        if self._should_rebalance(target, least_busy, candidates, base):
            return Decision(least_busy, "rebalance")
        if len(holders) == 1 and len(candidates) > 1 and self._should_replicate(target, prefix, now):
            self._remember_replica(prefix, now)
            others = [w for w in candidates if w != target]
            return Decision(least_cost(others, cost), "replicate")
        return Decision(target, "exploit")

    def _should_rebalance(
        self, target: str, least_busy: str, candidates: Sequence[str], base: dict[str, float]
    ) -> bool:
        if self._num_requests < self.config.warmup_requests:
            return False
        busiest = least_cost(candidates, {w: -base[w] for w in candidates})
        gap = base[busiest] - base[least_busy]
        return (
            target == busiest
            and busiest != least_busy
            and base[busiest] > self.config.rebalance_ratio * base[least_busy]
            and gap > self.config.rebalance_min_tokens
        )

    def _should_replicate(self, holder: str, prefix: int, now: float) -> bool:
        last = self._replicated_at.get(prefix)
        if last is not None and now - last < self.config.replicate_cooldown_s:
            return False
        prefix_count, worker_count = self._window.counts(now, holder, prefix)
        return (
            prefix_count >= self.config.replicate_min_requests
            and prefix_count > self.config.replicate_share * worker_count
        )

    def _remember_replica(self, prefix: int, now: float) -> None:
        if len(self._replicated_at) >= _MAX_REPLICATED_PREFIXES:
            horizon = now - self.config.replicate_cooldown_s
            self._replicated_at = {p: t for p, t in self._replicated_at.items() if t >= horizon}
        self._replicated_at[prefix] = now
