"""Preble's E2 placement: exploit a cached prefix when it is most of the prompt, else explore by cost.

After Srivatsa et al., "Preble: Efficient Distributed Prompt Scheduling for LLM Serving" (ICLR 2025),
its E2 global scheduler: load cost over a history window per important prefix-tree node, eviction
cost, post-assignment rebalancing by moving prefix subtrees, and replication of hot prefixes when an
overload detector fires.

Per request of n prompt tokens, over the candidates:

    hit(w)  tokens worker w would not recompute (the index's match, counted as the engine counts
            hits: whole blocks, never the block of the last prompt token), those it restores from its
            host tier at host_tier_hit_weight each (PrefillRequest.effective_hit_tokens, rounded down)
    m       = max_w hit(w)

    exploit  (m > n - m): the targets are the candidates holding the longest prefix (hit(w) = m)
             and those the request's important node k is assigned to (below); the target of
             lowest cost(w) wins                                                        "exploit"
             ... unless k's TTFT trend on that worker is overloaded: then k is replicated on the
             non-assigned candidate of lowest cost, which takes the request           "replicate"
    explore  (m <= n - m): the candidate of lowest cost(w)                              "explore"

    cost(w) = load(w) + evict(w) + prefill_time(n - hit(w), n)

Ties go to the earliest candidate. The fitted prefill_time(extend, context) = a + b·extend +
c·extend·context and its prior are services.router.policies.preble_model's.

Prefix tree and important nodes (services.router.policies.preble_tree). Every placed prompt is
inserted into a radix tree over its block hashes; its important node k is the deepest node on its
path longer than the context before it. The policy keeps, per important node with requests in the
last window_s seconds, over those requests: count, prompt tokens, missed tokens (n - hit on the
worker chosen) and the workers it is assigned to (every worker a request of k was placed on, unless
rebalancing moved it). A request's statistics stay with its important node when the tree splits
(they follow the node that is important for it afterwards, merging with what is there); when the
tree prunes the node they stay counted until they leave the window, and the prefix's next request
starts a new node.

Load cost, in seconds, per worker w:

    load(w)   = Σ_{k assigned to w} miss(k) · count(k) · prefill_time(tokens(k), context(k)) / replicas(k)
              + b · queued_prefill_tokens(w)                                    (its waiting queue)
              + decoding(w) · median_decode_tokens · tpot(w)
    miss(k)   = missed tokens / prompt tokens of k's requests in the window
    replicas  = the number of workers k is assigned to
    tokens(k) = k's span, context(k) = the prefix it ends (k's span included), in tokens
    decoding  = w's num_decoding averaged over the load view's window, plus in-flight decodes
    tpot(w)   = the median of w's last median_samples finished requests' TPOT (all workers' before
                w has one, prior_tpot_s before any); median_decode_tokens likewise over output
                lengths (requests of more than one output token), prior_decode_tokens before any

The first sum is kept per worker as three running sums (Σ weight, Σ weight·tokens, Σ weight·tokens·
context, weight = miss·count/replicas), updated whenever one node's figures change, so it costs
O(1) to read whatever the fitted coefficients are: no placement scans the nodes.

Eviction cost. A worker's KV capacity and what it caches say how many blocks the request's new ones
would evict, and the index's view of its recency which:

    occupied(w) = max(blocks w holds per the index, total(w) - free(w))
    need(w)     = ceil(n / block_size) - device_hit(w) / block_size - (total(w) - occupied(w))
                  (device_hit: hit(w) without the host tier's blocks, which take device blocks too)
    evict(w)    = Σ over w's least recently placed nodes, oldest first, until their blocks cover
                  need(w), of each node's load contribution on w (0 for a node that is not an
                  important node assigned to w)                          (0 when need(w) <= 0)

(the authors' code prices an evicted node at miss · count · prefill_time, its load; here its share
on w). The recency lists, one per worker, and the bounded walk over them are
services.router.policies.preble_eviction's. The request's own cached prefix is not told apart from
the rest. Without the router's index (a policy used alone) holdings are taken as the tree says and
occupied(w) = total(w) - free(w); without a reported total (num_total_blocks 0), evict(w) is 0.

Rebalancing. Every rebalance_requests_per_worker × #candidates placements, with B and L the
candidates of highest and lowest load(w): if load(B) > rebalance_ratio × load(L), B's important
nodes with at least rebalance_min_requests requests in the window are moved to L, cheapest first
(B's assignment replaced by L), while the move leaves load(B) >= load(L). Moving a node moves its
subtree: every request whose important node it is (its descendants up to the next important ones,
which move on their own) follows the assignment from then on. Only the policy's tree and sums
change; the router's index still says what B caches, so the moved requests miss once on L. A busiest
worker with a single such node is left alone (replication is the detector's).

Replication. Each important node of at least two requests keeps, per worker, the TTFT its requests
reported there (FinishedRequestTiming, the prefill worker's own, dated on arrival), over the window:
overloaded when the mean of the second half of the window >= overload_ratio × the first half's (each
half holding at least overload_min_samples). Only then is an exploit target's node replicated.

Cost per placement: O(#candidates + the prompt's path in the tree + its new blocks), plus the
rebalancing check every rebalance_requests_per_worker × #candidates placements (a sort of the
busiest worker's movable nodes) and eviction-table rebuilds (at most eviction_walk_nodes nodes).
An exploit computes load(w) for its targets alone, and evict(w) only for workers whose other terms
leave them a chance. benchmarks/router_placement.py --preble-scale measures it.

Departures from the paper and the authors' code (WukLab/preble), each for this router: exploit
targets include the index's holders as well as the node's assignment (the index is the caches'
truth; other gateways place too); the decode term counts the worker's decoding sequences rather
than each node's; a rebalancing check moves nodes between one pair of workers; the miss rate counts
what the chosen worker was predicted to miss, from the index.

What the workers report (services.router.load): step timings feed the prefill-time fit; finished
requests' TPOT, output length and TTFT feed the medians and the detector; num_total_blocks the
eviction cost. The policy reads what came since its last placement.

Tunables (PrebleConfig), the paper's and its authors' code's where they give one:
  window_s                       180.0   the history window H (3 minutes)
  max_window_requests            200000  placements the window keeps at most (memory bound; ours)
  median_samples                 200     TPOT and output-length samples the medians cover
  fit_samples                    256     step timings the prefill-time fit covers (ours)
  fit_min_samples                32      timings before the fit replaces the prior (ours)
  prior_prefill_s_per_token      1e-4    the prior: prefill_time = 1e-4 s × extend (ours)
  prior_tpot_s                   0.02    TPOT before any is reported (ours)
  prior_decode_tokens            256     output length before any is reported (the router's default)
  rebalance_requests_per_worker  50      placements between two rebalancing checks, per candidate
  rebalance_ratio                1.5     load(B) / load(L) that must be exceeded to rebalance
  rebalance_min_requests         2       window requests a node needs to be moved
  overload_ratio                 2.0     second-half / first-half mean TTFT that fires the detector
  overload_min_samples           2       TTFTs each half needs (ours: one is noise)
  eviction_walk_nodes            64      nodes of a worker's recency list the eviction walk covers (ours)
  eviction_refresh_s             1.0     age at which a worker's eviction table is rebuilt (ours)
  max_tree_blocks                1000000 blocks the prefix tree holds at most (ours)
  max_tracked_requests           65536   placements remembered to match TTFT reports (ours)
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from services.router.index import PrefixIndex
from services.router.load import LoadView, WorkerLoad
from services.router.policies.base import Decision, Policy, PrefillRequest, least_cost
from services.router.policies.preble_eviction import EvictionLists
from services.router.policies.preble_model import PrefillTimeFit, RecentMedian, TTFTTrend
from services.router.policies.preble_tree import PrefixNode, PrefixTree


@dataclass(frozen=True)
class PrebleConfig:
    window_s: float = 180.0
    max_window_requests: int = 200_000
    median_samples: int = 200
    fit_samples: int = 256
    fit_min_samples: int = 32
    prior_prefill_s_per_token: float = 1e-4
    prior_tpot_s: float = 0.02
    prior_decode_tokens: int = 256
    rebalance_requests_per_worker: int = 50
    rebalance_ratio: float = 1.5
    rebalance_min_requests: int = 2
    overload_ratio: float = 2.0
    overload_min_samples: int = 2
    eviction_walk_nodes: int = 64
    eviction_refresh_s: float = 1.0
    max_tree_blocks: int = 1_000_000
    max_tracked_requests: int = 65536


class NodeLoad:
    """An important node's requests in the window, and what they add to each assigned worker's load."""

    __slots__ = (
        "applied",
        "context_tokens",
        "count",
        "merged_into",
        "missed_tokens",
        "node",
        "num_tokens",
        "prompt_tokens",
        "serial",
        "trends",
        "workers",
    )

    def __init__(self, node: PrefixNode[NodeLoad], block_size: int, serial: int) -> None:
        self.node: PrefixNode[NodeLoad] | None = node  # None once pruned from the tree, merged or out of the window
        self.num_tokens = node.num_blocks * block_size
        self.context_tokens = node.end * block_size
        self.count = 0
        self.prompt_tokens = 0
        self.missed_tokens = 0
        self.workers = 0  # bits of the workers it is assigned to
        self.serial = serial  # creation order: ties among equal costs
        self.merged_into: NodeLoad | None = None  # its requests now counted there
        self.trends: dict[str, TTFTTrend] | None = None
        # what _apply added to each worker of `workers`: (weight, worker bits, tokens, tokens x context)
        self.applied: tuple[float, int, float, float] | None = None

    @property
    def replicas(self) -> int:
        return self.workers.bit_count()

    @property
    def miss_rate(self) -> float:
        return self.missed_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class _WorkerState:
    __slots__ = ("bit", "movable", "name", "num_loads", "s0", "s1", "s2")

    def __init__(self, name: str, bit: int) -> None:
        self.name = name
        self.bit = bit
        self.s0 = self.s1 = self.s2 = 0.0  # Σ weight, Σ weight·tokens, Σ weight·tokens·context
        self.num_loads = 0  # node loads assigned here
        self.movable: set[NodeLoad] = set()  # those with rebalance_min_requests requests or more


class _Window:
    """The placements of the window, oldest first: (time, node load, prompt tokens, missed tokens), in four
    deques rather than a tuple each (fewer objects for the garbage collector to walk)."""

    def __init__(self) -> None:
        self.times: deque[float] = deque()
        self.node_loads: deque[NodeLoad] = deque()
        self._prompt_tokens: deque[int] = deque()
        self._missed_tokens: deque[int] = deque()

    def append(self, now: float, node_load: NodeLoad, prompt_tokens: int, missed_tokens: int) -> None:
        self.times.append(now)
        self.node_loads.append(node_load)
        self._prompt_tokens.append(prompt_tokens)
        self._missed_tokens.append(missed_tokens)

    def popleft(self) -> tuple[NodeLoad, int, int]:
        self.times.popleft()
        return self.node_loads.popleft(), self._prompt_tokens.popleft(), self._missed_tokens.popleft()


class Preble(Policy):
    name = "preble"

    def __init__(self, config: PrebleConfig = PrebleConfig()) -> None:
        self.config = config
        self.tree: PrefixTree[NodeLoad] = PrefixTree(config.max_tree_blocks, self._on_split, self._on_remove)
        self._eviction: EvictionLists[NodeLoad] = EvictionLists(
            config.eviction_walk_nodes, config.eviction_refresh_s, _eviction_weights
        )
        self.fit = PrefillTimeFit(config.fit_samples, config.fit_min_samples, config.prior_prefill_s_per_token)
        self.decode_tokens = RecentMedian(config.median_samples, config.prior_decode_tokens)
        self._tpot_all = RecentMedian(config.median_samples, config.prior_tpot_s)
        self._tpot: dict[str, RecentMedian] = {}
        self._window = _Window()
        self._workers: dict[str, _WorkerState] = {}
        self._by_bit: dict[int, _WorkerState] = {}
        # the last max_tracked_requests placements: request id -> node load, and -> worker (two maps rather
        # than a tuple each: the second holds strings only, which the garbage collector does not walk)
        self._placed: OrderedDict[str, NodeLoad] = OrderedDict()
        self._placed_on: dict[str, str] = {}
        self._index: PrefixIndex | None = None
        self._block_size = 1
        self._serials = itertools.count()
        self._step_cursor = 0
        self._finished_cursor = 0
        self.num_requests = 0
        self.num_moves = 0  # important nodes rebalancing moved, in all
        self._checked_at = 0  # num_requests at the last rebalancing check
        self._decisions: dict[tuple[str, str], Decision] = {}  # (worker, reason) -> its decision, reused

    def bind_index(self, index: PrefixIndex) -> None:
        self._index = self._eviction.index = index

    # ------------------------------------------------------------------ placement

    def choose_prefill(
        self, request: PrefillRequest, candidates: Sequence[str], index_match: Mapping[str, int], load: LoadView
    ) -> Decision:
        now = load.now()
        self._block_size = request.block_size
        self.take_reports(load)
        self._expire(now)
        n = request.num_prompt_tokens
        path = self.tree.insert(request.block_hashes, now)
        block_size = request.block_size
        max_hit_blocks = request.hit_tokens(len(request.block_hashes)) // block_size
        device_hits = {w: min(index_match.get(w, 0), max_hit_blocks) * block_size for w in candidates}  # hit_tokens(m)
        hits = device_hits
        if request.host_match:  # host-tier blocks count host_tier_hit_weight each (whole tokens, rounded down)
            hits = {w: int(request.effective_hit_tokens(w, index_match.get(w, 0))) for w in candidates}
        if len(candidates) > 1 and self.num_requests - self._checked_at >= self._rebalance_every(candidates):
            self._rebalance(candidates, {w: self._load_cost(w, load) for w in candidates})
        a, b, c = self.fit.coefficients
        extend_s_per_token = b + c * n  # prefill_time(n - hit, n) = a + (b + c·n)·(n - hit)
        decode_tokens, tpot_all, tpots, states = self.decode_tokens.median, self._tpot_all, self._tpot, self._workers

        def add_lower(workers: Sequence[str], lower: dict[str, float]) -> None:
            """lower(w) = load(w) + prefill_time(n - hit(w), n) of the workers without one: _load_cost inlined (the
            hot path), its operations in its order (the same floats, bit for bit); the workers in their order (the
            order in which the policy meets a new worker decides its bit)."""
            for w in workers:
                if w in lower:
                    continue
                state = states.get(w) or self._state(w)
                decode_s = load.mean_decoding(w) * decode_tokens * tpots.get(w, tpot_all).median
                queued = load.get(w).queued_prefill_tokens
                window_s = a * state.s0 + b * state.s1 + c * state.s2  # the sum's leading terms: the same rounding
                lower[w] = window_s + b * queued + decode_s + a + extend_s_per_token * (n - hits[w])

        # the eviction cost counts device hits only: blocks restored from the host tier take device blocks too
        cost = _Costs(
            candidates, add_lower, lambda w: self._eviction_cost(w, load.get(w), request, device_hits[w], now)
        )
        important = _important_node(path)
        matched = max(hits.values())
        if matched > n - matched:
            decision = self._exploit(important, candidates, hits, matched, cost, now)
        else:
            decision = self._decision(cost.cheapest(candidates), "explore")
        self._record(request, path, important, decision.worker, hits[decision.worker], now)
        self._expire(now)  # (at most max_window_requests: the one just added may push one out)
        self.tree.prune(now - self.config.window_s)
        return decision

    def _exploit(
        self,
        important: PrefixNode[NodeLoad] | None,
        candidates: Sequence[str],
        hits: Mapping[str, int],
        matched: int,
        cost: _Costs,
        now: float,
    ) -> Decision:
        node_load = important.stats if important is not None else None
        assigned = node_load.workers if node_load is not None else 0
        states = self._workers
        target = cost.cheapest(
            [w for w in candidates if hits[w] == matched or assigned & (states.get(w) or self._state(w)).bit]
        )
        if node_load is None or not self._overloaded(node_load, target, now):
            return self._decision(target, "exploit")
        others = [w for w in candidates if not node_load.workers & self._state(w).bit]
        if not others:
            return self._decision(target, "exploit")
        replica = cost.cheapest(others)
        self._retract(node_load)
        node_load.workers |= self._state(replica).bit
        self._apply(node_load)
        assert node_load.trends is not None
        node_load.trends[target].clear()
        return self._decision(replica, "replicate")

    def _decision(self, worker: str, reason: str) -> Decision:
        """Decision(worker, reason), one object per pair: it is frozen, and building one costs more than a lookup."""
        decision = self._decisions.get((worker, reason))
        if decision is None:
            decision = self._decisions[worker, reason] = Decision(worker, reason)
        return decision

    def _overloaded(self, node_load: NodeLoad, worker: str, now: float) -> bool:
        trend = node_load.trends.get(worker) if node_load.trends else None
        return trend is not None and trend.overloaded(now, self.config.overload_ratio, self.config.overload_min_samples)

    def _record(
        self,
        request: PrefillRequest,
        path: list[PrefixNode[NodeLoad]],
        important: PrefixNode[NodeLoad] | None,
        worker: str,
        hit_tokens: int,
        now: float,
    ) -> None:
        self.num_requests += 1
        if important is None:
            return  # no full block: nothing to share, nothing to count
        node_load = important.stats
        if node_load is None:
            node_load = important.stats = NodeLoad(important, self._block_size, next(self._serials))
        state = self._state(worker)
        missed = request.num_prompt_tokens - hit_tokens
        self._retract(node_load)
        node_load.count += 1
        node_load.prompt_tokens += request.num_prompt_tokens
        node_load.missed_tokens += missed
        node_load.workers |= state.bit
        self._apply(node_load)
        self._window.append(now, node_load, request.num_prompt_tokens, missed)
        self._eviction.touch(worker, state.bit, path)
        self._placed[request.request_id] = node_load
        self._placed_on[request.request_id] = worker
        if len(self._placed) > self.config.max_tracked_requests:
            del self._placed_on[self._placed.popitem(last=False)[0]]

    # ------------------------------------------------------------------ costs

    def load_cost(self, worker: str, load: LoadView) -> float:
        """load(w) of the module doc, in seconds."""
        return self._load_cost(worker, load)

    def window_load(self, worker: str) -> float:
        """The first term of load(w): its important nodes' prefill work in the window (running sums)."""
        state = self._state(worker)
        a, b, c = self.fit.coefficients
        return a * state.s0 + b * state.s1 + c * state.s2

    def window_load_reference(self, worker: str) -> float:
        """window_load recomputed from every node load in the window (the slow reference, for tests)."""
        bit = self._state(worker).bit
        total = 0.0
        for node_load in {_resolved(entry) for entry in self._window.node_loads}:
            if node_load.workers & bit and node_load.count > 0:
                prefill = self.fit.prefill_time(node_load.num_tokens, node_load.context_tokens)
                total += node_load.miss_rate * node_load.count * prefill / node_load.replicas
        return total

    def contribution(self, node_load: NodeLoad) -> float:
        """What `node_load` adds to the load of each worker it is assigned to."""
        if node_load.applied is None:
            return 0.0
        weight, _, tokens, pairs = node_load.applied
        a, b, c = self.fit.coefficients
        return weight * (a + b * tokens + c * pairs)

    def node_load(self, request_id: str) -> NodeLoad | None:
        """The node load a remembered placement counts under, while its requests are in the window."""
        placed = self._placed.get(request_id)
        if placed is None:
            return None
        node_load = _resolved(placed)
        return node_load if node_load.count > 0 else None

    def tpot(self, worker: str) -> float:
        median = self._tpot.get(worker)
        return median.median if median is not None else self._tpot_all.median

    def eviction_cost(self, worker: str, request: PrefillRequest, hit_tokens: int, load: LoadView) -> float:
        """evict(w) of the module doc, in seconds."""
        return self._eviction_cost(worker, load.get(worker), request, hit_tokens, load.now())

    def _load_cost(self, worker: str, load: LoadView) -> float:
        state = self._workers.get(worker) or self._state(worker)
        a, b, c = self.fit.coefficients
        decode_s = load.mean_decoding(worker) * self.decode_tokens.median * self.tpot(worker)
        queued = load.get(worker).queued_prefill_tokens
        return a * state.s0 + b * state.s1 + c * state.s2 + b * queued + decode_s

    def _eviction_cost(
        self, worker: str, view: WorkerLoad, request: PrefillRequest, hit_tokens: int, now: float
    ) -> float:
        total = view.num_total_blocks
        if total <= 0:
            return 0.0
        held = self._index.num_keys(worker) if self._index is not None else 0
        empty = total - max(held, total - view.num_free_blocks)
        block_size = request.block_size
        need = -(-request.num_prompt_tokens // block_size) - hit_tokens // block_size - max(0, empty)
        if need <= 0:
            return 0.0
        weights, token_weights, pair_weights = self._eviction.evicted(worker, self._state(worker).bit, need, now)
        a, b, c = self.fit.coefficients
        return a * weights + b * token_weights + c * pair_weights

    # ------------------------------------------------------------------ rebalancing

    def _rebalance_every(self, candidates: Sequence[str]) -> int:
        return self.config.rebalance_requests_per_worker * len(candidates)

    def _rebalance(self, candidates: Sequence[str], base: dict[str, float]) -> None:
        """Move the busiest candidate's important nodes to the least busy one (the module doc)."""
        self._checked_at = self.num_requests
        busiest = least_cost(candidates, {w: -base[w] for w in candidates})
        least = least_cost(candidates, base)
        if busiest == least or base[busiest] <= self.config.rebalance_ratio * base[least]:
            return
        source, target = self._state(busiest), self._state(least)
        movable = sorted(source.movable, key=lambda node_load: (self.contribution(node_load), node_load.serial))
        if len(movable) < 2:
            return
        high, low = base[busiest], base[least]
        for node_load in movable:
            moved = self.contribution(node_load)
            if high - moved < low + moved:
                break
            before = self.window_load(least)
            self._retract(node_load)
            node_load.workers = (node_load.workers & ~source.bit) | target.bit
            self._apply(node_load)
            high -= moved
            low += self.window_load(least) - before
            self.num_moves += 1
        base[busiest], base[least] = high, low

    # ------------------------------------------------------------------ running sums

    def _apply(self, node_load: NodeLoad) -> None:
        """Add the node load's contribution to each worker it is assigned to (after a change)."""
        replicas = node_load.replicas
        if node_load.count <= 0 or replicas == 0:
            node_load.applied = None
            return
        weight = node_load.miss_rate * node_load.count / replicas
        tokens, pairs = float(node_load.num_tokens), float(node_load.num_tokens * node_load.context_tokens)
        node_load.applied = (weight, node_load.workers, tokens, pairs)
        movable = node_load.count >= self.config.rebalance_min_requests and node_load.node is not None
        by_bit, workers = self._by_bit, node_load.workers
        while workers:
            low = workers & -workers
            workers ^= low
            state = by_bit[low]
            state.s0 += weight
            state.s1 += weight * tokens
            state.s2 += weight * pairs
            state.num_loads += 1
            if movable:
                state.movable.add(node_load)

    def _retract(self, node_load: NodeLoad) -> None:
        """Take the node load's contribution back out (before a change)."""
        applied, node_load.applied = node_load.applied, None
        if applied is None:
            return
        weight, workers, tokens, pairs = applied
        by_bit = self._by_bit
        while workers:
            low = workers & -workers
            workers ^= low
            state = by_bit[low]
            state.num_loads -= 1
            if state.num_loads:
                state.s0 -= weight
                state.s1 -= weight * tokens
                state.s2 -= weight * pairs
            else:  # exactly zero, whatever rounding the additions left
                state.s0 = state.s1 = state.s2 = 0.0
            state.movable.discard(node_load)

    def _states_of(self, workers: int) -> list[_WorkerState]:
        states = []
        while workers:
            low = workers & -workers
            states.append(self._by_bit[low])
            workers ^= low
        return states

    def _state(self, worker: str) -> _WorkerState:
        state = self._workers.get(worker)
        if state is None:
            state = self._workers[worker] = _WorkerState(worker, 1 << len(self._workers))
            self._by_bit[state.bit] = state
        return state

    # ------------------------------------------------------------------ the window and the tree

    def _expire(self, now: float) -> None:
        window, horizon = self._window, now - self.config.window_s
        while window.times and (window.times[0] < horizon or len(window.times) > self.config.max_window_requests):
            entry_load, num_prompt_tokens, missed = window.popleft()
            node_load = _resolved(entry_load)
            self._retract(node_load)
            node_load.count -= 1
            node_load.prompt_tokens -= num_prompt_tokens
            node_load.missed_tokens -= missed
            if node_load.count > 0:
                self._apply(node_load)
            else:  # out of the window: its assignment goes with it
                node_load.workers = 0
                node_load.trends = None
                if node_load.node is not None and node_load.node.stats is node_load:
                    node_load.node.stats = None
                node_load.node = None

    def _on_split(self, head: PrefixNode[NodeLoad], tail: PrefixNode[NodeLoad]) -> None:
        self._eviction.on_split(head, tail)
        node_load = tail.stats
        if node_load is None:
            return
        if tail.important:
            self._retract(node_load)
            node_load.num_tokens = tail.num_blocks * self._block_size
            self._apply(node_load)
            return
        tail.stats = None
        owner: PrefixNode[NodeLoad] | None = head
        while owner is not None and not owner.important:
            owner = owner.parent
        assert owner is not None  # the root's child is always important
        self._retract(node_load)
        if owner.stats is None:  # the requests' important node is now `owner`
            owner.stats = node_load
            node_load.node = owner
            node_load.num_tokens = owner.num_blocks * self._block_size
            node_load.context_tokens = owner.end * self._block_size
            self._apply(node_load)
            return
        into = owner.stats  # `owner` already counts requests of its own: one node load for all
        self._retract(into)
        into.count += node_load.count
        into.prompt_tokens += node_load.prompt_tokens
        into.missed_tokens += node_load.missed_tokens
        into.workers |= node_load.workers
        node_load.merged_into, node_load.node, node_load.workers, node_load.trends = into, None, 0, None
        node_load.count = node_load.prompt_tokens = node_load.missed_tokens = 0
        self._apply(into)

    def _on_remove(self, node: PrefixNode[NodeLoad]) -> None:
        self._eviction.on_remove(node)
        node_load = node.stats
        if node_load is None:
            return
        node.stats = None  # its requests stay counted until they leave the window, but nothing follows it
        if node_load.count >= self.config.rebalance_min_requests:  # no longer movable: the sets forget it
            self._retract(node_load)
            node_load.node = None
            self._apply(node_load)
        node_load.node = None

    # ------------------------------------------------------------------ what the workers report

    def take_reports(self, load: LoadView) -> None:
        """Read what the workers reported since the last call (each placement calls it first)."""
        now = load.now()
        steps, self._step_cursor = load.step_timings_since(self._step_cursor)
        for _, step in steps:
            self.fit.add(step.num_steps, step.num_tokens, step.num_attention_pairs, step.duration_s)
        finished, self._finished_cursor = load.finished_since(self._finished_cursor)
        for worker, request in finished:
            if request.num_output_tokens > 1:
                self.decode_tokens.add(request.num_output_tokens)
                self._tpot_all.add(request.tpot_s)
                if worker in self._workers:  # a TPOT of its own only for a worker the policy places on
                    tpot = self._tpot.get(worker)
                    if tpot is None:
                        tpot = self._tpot[worker] = RecentMedian(self.config.median_samples, self.config.prior_tpot_s)
                    tpot.add(request.tpot_s)
            self._observe_ttft(worker, request.request_id, request.ttft_s, now)

    def _observe_ttft(self, worker: str, request_id: str, ttft_s: float, now: float) -> None:
        if request_id not in self._placed:
            parent_id, sep, index = request_id.rpartition("#")  # a child of an n > 1 request
            request_id = parent_id if sep and index.isdigit() else request_id
        placed = self._placed.get(request_id)
        if placed is None or self._placed_on[request_id] != worker:
            return  # unknown, or not its prefill worker
        node_load = _resolved(placed)
        if node_load.count < 2:
            return  # a prefix of one request is not hot (and most are: no trend for them)
        if node_load.trends is None:
            node_load.trends = {}
        trend = node_load.trends.get(worker)
        if trend is None:
            trend = node_load.trends[worker] = TTFTTrend(self.config.window_s)
        trend.add(now, ttft_s)


class _Costs:
    """cost(w) = lower(w) + evict(w), each computed once and only for the workers it may decide.

    `cheapest(workers)` equals least_cost(workers, cost) over every cost (evict(w) >= 0): the workers
    are taken by increasing lower bound (candidate order among equals), and once a lower bound
    exceeds the best cost found no later one can win or tie. An exploit computes the lower bounds of
    its targets alone.

    Lives for one placement, so nothing it keeps can go stale. `add_lower(workers, lower)` fills in the
    lower bounds of a whole list in one call (one Python call a list rather than one a worker).
    """

    __slots__ = ("_add_lower", "_evict", "_lower", "_total", "candidates")

    def __init__(
        self,
        candidates: Sequence[str],
        add_lower: Callable[[Sequence[str], dict[str, float]], None],
        evict: Callable[[str], float],
    ) -> None:
        self.candidates = candidates
        self._add_lower = add_lower
        self._evict = evict
        self._lower: dict[str, float] = {}
        self._total: dict[str, float] = {}

    def cheapest(self, workers: Sequence[str]) -> str:
        lower, total = self._lower, self._total
        self._add_lower(workers, lower)
        best, best_cost = workers[0], 0.0
        for i, worker in enumerate(sorted(workers, key=lower.__getitem__)):  # stable: candidate order among equals
            if i and lower[worker] > best_cost:
                break
            cost = total.get(worker)
            if cost is None:
                cost = total[worker] = lower[worker] + self._evict(worker)
            if i == 0 or cost < best_cost or (cost == best_cost and self._earlier(worker, best)):
                best, best_cost = worker, cost
        return best

    def _earlier(self, worker: str, other: str) -> bool:
        return self.candidates.index(worker) < self.candidates.index(other)


def _eviction_weights(node: PrefixNode[NodeLoad], bit: int) -> tuple[float, float, float] | None:
    """An evicted node's load contribution on the worker of `bit`, as the three running-sum terms."""
    node_load = node.stats
    if node_load is None or node_load.applied is None or not node_load.applied[1] & bit:
        return None  # not an important node with requests in the window, or not assigned there
    weight, _, tokens, pairs = node_load.applied
    return weight, weight * tokens, weight * pairs


def _important_node(path: list[PrefixNode[NodeLoad]]) -> PrefixNode[NodeLoad] | None:
    """The deepest node of the path longer than the context before it."""
    for node in reversed(path):
        if node.important:
            return node
    return None


def _resolved(node_load: NodeLoad) -> NodeLoad:
    while node_load.merged_into is not None:
        node_load = node_load.merged_into
    return node_load
