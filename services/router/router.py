"""The router: where each request's encode, prefill and decode run.

    place(request)
      1. block hashes  the request's own (from the gateway) or hashed here from its token ids
      2. match         PrefixIndex.match_tiers: leading blocks each prefill worker holds on its device,
                       and the blocks it holds right after them on its host tier
      3. decode        disaggregated: the decode worker with room and the lowest score (below)
      4. prefill       the policy's choice among the prefill workers (colocated: those with room
                       first), which is also the decode worker in colocated mode
      5. encode        per image, a worker holding its embedding, else the least loaded one
      6. account       in-flight estimates on every chosen worker, decision counters, the
                       predicted hit kept for observe_hit, and a pending claim on the prefill
                       worker for every full block of the prompt (PrefixIndex.add_pending)

Decode placement never picks a worker whose free KV blocks cannot hold the request:

    need_blocks = ceil((num_prompt_tokens + expected_output_tokens) / block_size)
    expected_output_tokens = max_tokens, or default_expected_output_tokens when not given
    score(w)    = num_decoding(w) + decode_kv_usage_weight * kv_usage(w)      lowest wins

and raises NoRoomNow (a NoWorkerAvailable) when none has room: the gateway queues the request until a
decode worker reports room (services.gateway.cluster), so a full decode pool delays requests rather
than refusing them. A request no decode worker could hold even empty (need_blocks above every
reported num_total_blocks) would wait forever: it goes to the decode worker with the most blocks
instead (need_blocks counts max_tokens in full; the decode engine queues what it cannot hold yet). In
colocated mode one list serves both stages and decode = prefill; the policy chooses among the
workers with room, or among all of them when none has (the engine queues the request until its
own blocks free up, so a full colocated cluster queues rather than refuses).

Degrade, don't fail. Every engine worker runs a whole engine: a prefill worker serves a request
that names no KV target to its end, and a decode worker computes a prompt itself. So when a
disaggregated cluster has lost a whole stage (the gateway has removed every prefill worker, or
every decode worker: down, or restarting), place() puts the request whole on a survivor, as a
colocated cluster would (prefill_worker == decode_worker, reason "fallback_whole"): the worker
holding the longest prefix among those with room (else among all: its engine queues), then the
least loaded. Only an empty cluster raises NoWorkerAvailable. A decode pool without room makes the
request wait (NoRoomNow) rather than overloading a prefill worker.

Suspended workers. A worker that has gone quiet (stopped, stuck) but is not yet found down stays in
its pool, with its cache and load, and is skipped (`suspend_worker`, until `resume_worker`): its
stage's other workers take its placements, or the survivors of the other stage whole when it was the
last one. When every engine worker is suspended they are all used anyway: a slow worker's queue costs
time, a refusal an error.

Hits are predicted as the engine counts them (whole blocks, never the block of the last prompt
token): matched_tokens is the best any prefill worker offers, predicted_hit_tokens what the chosen
one offers. observe_hit reports what the worker really reused, for the predicted-versus-observed
hit metric.

Host tier. A worker with a host-memory KV tier restores the blocks it holds there right after its
device prefix instead of recomputing them: cheaper than a miss, dearer than a device hit (a copy over
PCIe). Where a hit is a cost or a score, host-tier tokens count host_tier_hit_weight each:

    effective_hit_tokens(w) = device_hit_tokens(w) + host_tier_hit_weight * host_hit_tokens(w)

the policies read it through PrefillRequest (its host_match and weight; index_match stays the device
match, in blocks), the fallback orders survivors by it, and the in-flight prefill estimate is the
prompt net of it. predicted_hit_tokens and matched_tokens count the tokens not recomputed, from either
tier (predicted_host_hit_tokens says how many of them come from the host tier), since they are
compared with what the worker reports reusing.

Placements recorded at once. A worker's BlockStored events come after it has scheduled the
request, up to a second after the placement; meanwhile a burst of requests sharing a new prefix
would find it nowhere and scatter. So each placement claims the request's blocks on its prefill
worker at once (PrefixIndex.add_pending): the next request sharing the prefix matches them and
the policies exploit that worker. A pending block counts fully, in the match the policies see and
in predicted_hit_tokens (and so in the in-flight prefill estimate): the engine caches a block as
soon as it schedules the request that computes it, so a request placed behind it on the same
worker reuses it. When the earlier request is lost instead, observe_hit shows the overestimate.
The worker's own events settle the claims (services.router.index); the rest end on `release`, on
`remove_worker`, on a replay (`index.replace_worker`) or pending_block_ttl_s after the placement.

Several gateways each run a Router over the same workers. A gateway that learns another one's
placement (from the worker's event stream) reports it with `record_remote_placement`: the same
claims and in-flight estimates, no decision counted and no hit predicted. Request ids must be
unique across gateways: a report of an id this router already knows (its own placement echoed,
or a report repeated) changes nothing.

The router is a single-threaded object: one owner (the router actor, or one event loop) calls
place, the index and load updates and the metric reads. Feed it through its parts:
`router.index.apply(worker, seq, kv_events)`, `router.content_index.apply(...)`,
`router.load.update(WorkerLoad(...))`.

Tunables (RouterConfig; the policies' own are in their modules):
  decode_kv_usage_weight          32.0   decode score of a full KV cache, in decoding sequences
  default_expected_output_tokens  256    output tokens assumed when a request gives no max_tokens
  inflight_ttl_s                  2.0    longest life of an in-flight estimate (services.router.load)
  decode_window_s                 5.0    seconds of snapshots averaged for the decode term
  max_pending_hit_predictions     65536  predictions kept for observe_hit (oldest dropped first)
  pending_block_ttl_s             10.0   longest life of a placement's block claims (services.router.index);
                                         0 records none (placements then wait for the events)
  max_remembered_request_ids      65536  request ids kept so record_remote_placement ignores repeats
                                         and this router's own placements (oldest forgotten first)
  host_tier_hit_weight            0.75   what a host-tier hit token is worth in device hit tokens, in
                                         [0, 1] (NVIDIA Dynamo's host tier weight; --host-tier-hit-weight)
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from services.common.block_hash import MultiModalSpan, hash_request_blocks
from services.router.index import ContentIndex, PrefixIndex
from services.router.load import LoadView
from services.router.policies.base import DEFAULT_HOST_TIER_HIT_WEIGHT, Policy, PrefillRequest
from services.router.policies.kv_overlap import KvOverlap, KvOverlapConfig
from services.router.policies.least_load import LeastLoad, LeastLoadConfig, least_load_cost
from services.router.policies.preble import Preble, PrebleConfig
from services.router.policies.precise_prefix import PrecisePrefix, PrecisePrefixConfig
from services.router.policies.prefix_affinity import PrefixAffinity, PrefixAffinityConfig
from services.router.policies.round_robin import RoundRobin


@dataclass(frozen=True)
class RouterConfig:
    least_load: LeastLoadConfig = field(default_factory=LeastLoadConfig)
    prefix_affinity: PrefixAffinityConfig = field(default_factory=PrefixAffinityConfig)
    preble: PrebleConfig = field(default_factory=PrebleConfig)
    kv_overlap: KvOverlapConfig = field(default_factory=KvOverlapConfig)
    precise_prefix: PrecisePrefixConfig = field(default_factory=PrecisePrefixConfig)
    decode_kv_usage_weight: float = 32.0
    default_expected_output_tokens: int = 256
    inflight_ttl_s: float = 2.0
    decode_window_s: float = 5.0
    max_pending_hit_predictions: int = 65536
    pending_block_ttl_s: float = 10.0
    max_remembered_request_ids: int = 65536
    host_tier_hit_weight: float = DEFAULT_HOST_TIER_HIT_WEIGHT

    def __post_init__(self) -> None:
        if not 0.0 <= self.host_tier_hit_weight <= 1.0:
            raise ValueError(f"host_tier_hit_weight must be in [0, 1], got {self.host_tier_hit_weight}")


POLICIES: Mapping[str, Callable[[RouterConfig], Policy]] = {
    "round_robin": lambda config: RoundRobin(),
    "least_load": lambda config: LeastLoad(config.least_load),
    "prefix_affinity": lambda config: PrefixAffinity(config.prefix_affinity),
    "preble": lambda config: Preble(config.preble),
    "kv_overlap": lambda config: KvOverlap(config.kv_overlap),
    "precise_prefix": lambda config: PrecisePrefix(config.precise_prefix),
}


FALLBACK_WHOLE = "fallback_whole"  # the decision reason of a whole placement on a stage's survivors


@dataclass(frozen=True, slots=True)
class _Hit:
    """A worker's predicted hit on a request: tokens not recomputed, and what they are worth."""

    tokens: int  # from either tier, as the engine counts a hit
    host_tokens: int  # of those, restored from the host tier
    effective_tokens: float  # tokens - (1 - host_tier_hit_weight) * host_tokens: a device hit's worth

    @staticmethod
    def of(query: PrefillRequest, index_match: Mapping[str, int], worker: str) -> _Hit:
        num_device_blocks = index_match.get(worker, 0)
        device_tokens = query.hit_tokens(num_device_blocks)
        host_tokens = query.host_hit_tokens(worker, num_device_blocks)
        return _Hit(device_tokens + host_tokens, host_tokens, device_tokens + query.host_tier_hit_weight * host_tokens)

    def prefill_tokens(self, num_prompt_tokens: int) -> int:
        """The in-flight prefill estimate: the prompt net of the hit's worth (a host restore costs a share)."""
        return num_prompt_tokens - int(self.effective_tokens)


def _matched_tokens(query: PrefillRequest, index_match: Mapping[str, int], workers: Sequence[str]) -> int:
    """The longest prefix any of `workers` would not recompute, from either tier."""
    host_match = query.host_match
    return query.hit_tokens(max((index_match.get(w, 0) + host_match.get(w, 0) for w in workers), default=0))


class NoWorkerAvailable(RuntimeError):
    """No worker can take the request: no engine worker is left, an image has no encode worker, or (NoRoomNow)
    no decode worker has KV room now."""


class NoRoomNow(NoWorkerAvailable):
    """Every decode worker is short of the request's KV blocks now; one will have room once requests finish.
    Nothing was recorded: placing the request again later is safe."""


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """A request to place. Give `block_hashes` (hashed by the caller, salt and images included) or `token_ids`."""

    request_id: str
    token_ids: Sequence[int] | None = None
    block_hashes: Sequence[int] | None = None
    num_prompt_tokens: int | None = None  # default: len(token_ids)
    max_tokens: int | None = None
    cache_salt: str | None = None
    image_hashes: Sequence[str] = ()  # content hashes of the request's images, in prompt order
    mm_spans: Sequence[MultiModalSpan] = ()  # the images' placeholder spans, to hash token_ids


@dataclass(frozen=True, slots=True)
class Placement:
    prefill_worker: str
    decode_worker: str
    policy: str
    reason: str
    matched_tokens: int  # the longest reusable prefix on any prefill worker
    predicted_hit_tokens: int  # the reusable prefix on prefill_worker, pending claims counted as held
    encode_workers: tuple[str, ...] = ()  # one per image_hashes entry
    predicted_host_hit_tokens: int = 0  # of predicted_hit_tokens, those prefill_worker restores from its host tier


@dataclass(frozen=True)
class RouterStats:
    decisions: dict[tuple[str, str], int]  # (policy, reason) -> placements; encode choices as ("encode", ...)
    num_placements: int
    num_prompt_tokens: int  # over all placements
    predicted_hit_tokens: int  # over all placements
    num_observed: int  # placements whose hit was observed
    predicted_hit_tokens_observed: int  # predictions of those placements
    observed_hit_tokens: int  # what those placements really reused
    load_imbalance: float  # busiest / least busy prefill worker by least_load cost, each floored at 1 token


class Router:
    def __init__(
        self,
        prefill_workers: Sequence[str],
        decode_workers: Sequence[str],
        policy_name: str,
        block_size: int,
        config: RouterConfig = RouterConfig(),
        *,
        encode_workers: Sequence[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if policy_name not in POLICIES:
            raise ValueError(f"unknown routing policy {policy_name!r}; choose one of {sorted(POLICIES)}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.colocated = list(prefill_workers) == list(decode_workers)
        if not self.colocated and set(prefill_workers) & set(decode_workers):
            raise ValueError("prefill and decode workers overlap; pass one list twice for colocated mode")
        self.prefill_workers = list(prefill_workers)
        self.decode_workers = list(decode_workers)
        self.encode_workers = list(encode_workers)
        self.suspended: set[str] = set()  # workers in a pool that placement skips for now (suspend_worker)
        self.block_size = block_size
        self.config = config
        self.policy = POLICIES[policy_name](config)
        self.index = PrefixIndex(config.pending_block_ttl_s, clock)
        self.policy.bind_index(self.index)
        self.content_index = ContentIndex()
        self.load = LoadView(config.inflight_ttl_s, config.decode_window_s, clock)
        self.decisions: Counter[tuple[str, str]] = Counter()
        self._num_placements = 0
        self._num_prompt_tokens = 0
        self._predicted_hit_tokens = 0
        self._num_observed = 0
        self._predicted_hit_tokens_observed = 0
        self._observed_hit_tokens = 0
        self._pending_hits: OrderedDict[str, tuple[str, int]] = OrderedDict()  # request id -> (worker, hit tokens)
        self._request_ids: OrderedDict[str, None] = OrderedDict()  # placed here or recorded, newest last

    # ------------------------------------------------------------------ placement

    def place(self, request: RouteRequest) -> Placement:
        query = self._prefill_request(request)
        need_blocks = self._kv_blocks_needed(query.num_prompt_tokens, request.max_tokens)
        prefill_workers, decode_workers = self._placeable_pools()
        if not prefill_workers and not decode_workers:
            raise NoWorkerAvailable("no prefill or decode worker")
        if request.image_hashes and not self.encode_workers:
            raise NoWorkerAvailable("the request has images and there is no encode worker")
        index_match, host_match = self.index.match_tiers(query.block_hashes)
        if host_match:
            query = replace(query, host_match=host_match)
        if not self.colocated and not (prefill_workers and decode_workers):
            return self._place_whole(request, query, index_match, need_blocks, prefill_workers or decode_workers)
        if self.colocated:
            candidates = self._with_room(prefill_workers, need_blocks) or prefill_workers
            decision = self.policy.choose_prefill(query, candidates, index_match, self.load)
            decode_worker = decision.worker
        else:
            decode_worker = self._choose_decode(decode_workers, need_blocks)  # before any state changes: it may refuse
            decision = self.policy.choose_prefill(query, prefill_workers, index_match, self.load)
        encode_workers = self._choose_encoders(request)
        hit = _Hit.of(query, index_match, decision.worker)
        matched = _matched_tokens(query, index_match, prefill_workers)
        self._account(request.request_id, query.num_prompt_tokens, decision.worker, decode_worker, need_blocks, hit)
        self.index.add_pending(request.request_id, decision.worker, query.block_hashes)
        self._remember(request.request_id)
        self.decisions[self.policy.name, decision.reason] += 1
        return Placement(
            decision.worker,
            decode_worker,
            self.policy.name,
            decision.reason,
            matched,
            hit.tokens,
            encode_workers,
            hit.host_tokens,
        )

    def _placeable_pools(self) -> tuple[list[str], list[str]]:
        """(prefill, decode) pools without the suspended workers; the whole pools when that leaves none."""
        prefill = [w for w in self.prefill_workers if w not in self.suspended]
        decode = [w for w in self.decode_workers if w not in self.suspended]
        if prefill or decode:
            return prefill, decode
        return self.prefill_workers, self.decode_workers

    def _place_whole(
        self,
        request: RouteRequest,
        query: PrefillRequest,
        index_match: Mapping[str, int],
        need_blocks: int,
        survivors: Sequence[str],
    ) -> Placement:
        """A disaggregated cluster missing a stage: the request whole on one of `survivors`, the other stage's
        placeable workers (see the module docstring). The policy is not asked: its state (rotation,
        rebalancing) describes the prefill pool."""
        candidates = self._with_room(survivors, need_blocks) or survivors
        weight = self.config.least_load.running_weight
        worker = min(
            candidates,
            key=lambda w: (
                -query.effective_hit_tokens(w, index_match.get(w, 0)),
                least_load_cost(self.load.get(w), weight),
                w,
            ),
        )
        encode_workers = self._choose_encoders(request)
        hit = _Hit.of(query, index_match, worker)
        matched = _matched_tokens(query, index_match, survivors)
        self._account(request.request_id, query.num_prompt_tokens, worker, worker, need_blocks, hit)
        self.index.add_pending(request.request_id, worker, query.block_hashes)
        self._remember(request.request_id)
        self.decisions[self.policy.name, FALLBACK_WHOLE] += 1
        return Placement(
            worker, worker, self.policy.name, FALLBACK_WHOLE, matched, hit.tokens, encode_workers, hit.host_tokens
        )

    def _prefill_request(self, request: RouteRequest) -> PrefillRequest:
        if request.block_hashes is not None:
            block_hashes = request.block_hashes
        elif request.token_ids is not None:
            block_hashes = hash_request_blocks(request.token_ids, self.block_size, request.cache_salt, request.mm_spans)
        else:
            raise ValueError(f"request {request.request_id!r} has neither token_ids nor block_hashes")
        num_prompt_tokens = request.num_prompt_tokens
        if num_prompt_tokens is None:
            if request.token_ids is None:
                raise ValueError(f"request {request.request_id!r} gives block_hashes without num_prompt_tokens")
            num_prompt_tokens = len(request.token_ids)
        return self._checked(self._query(request.request_id, block_hashes, num_prompt_tokens))

    def _query(self, request_id: str, block_hashes: Sequence[int], num_prompt_tokens: int) -> PrefillRequest:
        return PrefillRequest(
            request_id,
            block_hashes,
            num_prompt_tokens,
            self.block_size,
            host_tier_hit_weight=self.config.host_tier_hit_weight,
        )

    def _checked(self, query: PrefillRequest) -> PrefillRequest:
        if query.num_prompt_tokens < 1 or len(query.block_hashes) > query.num_prompt_tokens // self.block_size:
            raise ValueError(
                f"request {query.request_id!r}: {len(query.block_hashes)} blocks do not fit "
                f"{query.num_prompt_tokens} prompt tokens"
            )
        return query

    def _kv_blocks_needed(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        expected_output = self.config.default_expected_output_tokens if max_tokens is None else max_tokens
        return -(-(num_prompt_tokens + expected_output) // self.block_size)

    def _with_room(self, workers: Sequence[str], need_blocks: int) -> list[str]:
        return [w for w in workers if self.load.get(w).num_free_blocks >= need_blocks]

    def _choose_decode(self, decode_workers: Sequence[str], need_blocks: int) -> str:
        best, best_score = None, 0.0
        for worker in decode_workers:
            load = self.load.get(worker)
            if load.num_free_blocks < need_blocks:
                continue
            score = load.num_decoding + self.config.decode_kv_usage_weight * load.kv_usage
            if best is None or score < best_score:
                best, best_score = worker, score
        if best is not None:
            return best
        if not decode_workers:
            raise NoWorkerAvailable("no decode worker")
        largest = max(decode_workers, key=lambda w: (self.load.get(w).num_total_blocks, w))
        if 0 < self.load.get(largest).num_total_blocks < need_blocks:  # room never comes: see the module doc
            return largest
        raise NoRoomNow(f"no decode worker has {need_blocks} free KV blocks now")

    def _choose_encoders(self, request: RouteRequest) -> tuple[str, ...]:
        if not request.image_hashes:
            return ()
        chosen: dict[str, str] = {}
        for content_hash in request.image_hashes:
            if content_hash in chosen:
                continue
            holders = [w for w in self.content_index.holders(content_hash) if w in self.encode_workers]
            pool, reason = (holders, "embedding_hit") if holders else (self.encode_workers, "least_load")
            worker = min(pool, key=self._encode_load)
            chosen[content_hash] = worker
            self.load.add_inflight(request.request_id, worker, requests=1)
            self.decisions["encode", reason] += 1
        return tuple(chosen[h] for h in request.image_hashes)

    def _encode_load(self, worker: str) -> int:
        load = self.load.get(worker)
        return load.num_running + load.num_waiting

    def _account(
        self,
        request_id: str,
        num_prompt_tokens: int,
        prefill_worker: str,
        decode_worker: str,
        need_blocks: int,
        hit: _Hit,
    ) -> None:
        self._add_inflight(
            request_id, hit.prefill_tokens(num_prompt_tokens), prefill_worker, decode_worker, need_blocks
        )
        self._num_placements += 1
        self._num_prompt_tokens += num_prompt_tokens
        self._predicted_hit_tokens += hit.tokens
        self._pending_hits[request_id] = (prefill_worker, hit.tokens)
        if len(self._pending_hits) > self.config.max_pending_hit_predictions:
            self._pending_hits.popitem(last=False)

    def _add_inflight(
        self, request_id: str, prefill_tokens: int, prefill_worker: str, decode_worker: str | None, need_blocks: int
    ) -> None:
        if self.colocated:
            self.load.add_inflight(
                request_id, prefill_worker, prefill_tokens=prefill_tokens, requests=1, kv_blocks=need_blocks, decoding=1
            )
            return
        self.load.add_inflight(request_id, prefill_worker, prefill_tokens=prefill_tokens, requests=1)
        if decode_worker is not None:
            self.load.add_inflight(request_id, decode_worker, kv_blocks=need_blocks, decoding=1)

    def _remember(self, request_id: str) -> None:
        self._request_ids[request_id] = None
        if len(self._request_ids) > self.config.max_remembered_request_ids:
            self._request_ids.popitem(last=False)

    # ------------------------------------------------------------------ other gateways' placements

    def record_remote_placement(
        self,
        request_id: str,
        prefill_worker: str,
        block_hashes: Sequence[int],
        num_prompt_tokens: int,
        *,
        decode_worker: str | None = None,
        max_tokens: int | None = None,
        acknowledged: bool = True,
    ) -> bool:
        """Another gateway's router placed `request_id` on `prefill_worker`: count it as if placed here.

        `block_hashes` are the request's full-block hashes (salt and images included, as the
        gateway hashes them), `num_prompt_tokens` its prompt length; `decode_worker` and
        `max_tokens` (disaggregated mode) size the decode estimate as place() does. Records the
        pending block claims on `prefill_worker` and the in-flight estimates (prefill tokens net
        of what `prefill_worker` already holds or claims; decode room and one decoding sequence on
        `decode_worker`, or on `prefill_worker` in colocated mode and when `prefill_worker` is a decode
        worker serving the request whole: n > 1, or a fallback). No decision is counted, no hit
        predicted, no policy state touched. The estimates and claims are reconciled like local
        ones: `acknowledge`, `release`, snapshots, events and the TTLs. With `acknowledged` (the
        default: the report comes from the worker, which has accepted the request) the prefill
        estimate leaves at that worker's next snapshot, as after acknowledge(request_id,
        prefill_worker).

        Returns False, changing nothing, for a request id this router already knows (one it placed,
        or a repeated report) and for a worker outside its prefill and decode pools; True when recorded.
        Raises ValueError when the blocks do not fit the prompt.
        """
        serves_whole = prefill_worker in self.decode_workers  # a decode worker computing the prompt itself
        if request_id in self._request_ids or not (prefill_worker in self.prefill_workers or serves_whole):
            return False
        query = self._checked(self._query(request_id, block_hashes, num_prompt_tokens))
        index_match, host_match = self.index.match_tiers(block_hashes)
        if host_match:
            query = replace(query, host_match=host_match)
        hit = _Hit.of(query, index_match, prefill_worker)
        known_decode_worker = prefill_worker if serves_whole else None
        if decode_worker in self.decode_workers:
            known_decode_worker = decode_worker
        self._add_inflight(
            request_id,
            hit.prefill_tokens(num_prompt_tokens),
            prefill_worker,
            known_decode_worker,
            self._kv_blocks_needed(num_prompt_tokens, max_tokens),
        )
        if acknowledged:
            self.load.acknowledge(request_id, prefill_worker)
        self.index.add_pending(request_id, prefill_worker, block_hashes)
        self._remember(request_id)
        return True

    # ------------------------------------------------------------------ feedback

    def acknowledge(self, request_id: str, worker: str | None = None) -> None:
        """A worker accepted the request: its next snapshot counts it (see LoadView)."""
        self.load.acknowledge(request_id, worker)

    def release(self, request_id: str) -> None:
        """The placement (this router's or a recorded remote one) was abandoned before any worker took
        it: its in-flight estimates and its open block claims go."""
        self.load.release(request_id)
        self.index.release_pending(request_id)
        self._pending_hits.pop(request_id, None)

    def observe_hit(self, request_id: str, worker: str, hit_tokens: int) -> None:
        """What `worker` really reused of the request's prompt (its prefix-cache hit), once known.

        Only a report from the prefill worker the request was placed on is compared with the prediction.
        """
        pending = self._pending_hits.pop(request_id, None)
        if pending is None or pending[0] != worker:
            return  # unknown, or run elsewhere than placed (a retry): no prediction to compare
        predicted = pending[1]
        self._num_observed += 1
        self._predicted_hit_tokens_observed += predicted
        self._observed_hit_tokens += hit_tokens

    def add_worker(self, worker: str, stage: str) -> None:
        """A worker (re)joined: it takes placements for its stage ("colocated" serves prefill and decode)."""
        pools = {
            "prefill": [self.prefill_workers],
            "decode": [self.decode_workers],
            "encode": [self.encode_workers],
            "colocated": [self.prefill_workers, self.decode_workers],
        }[stage]
        for pool in pools:
            if worker not in pool:
                pool.append(worker)
        self.suspended.discard(worker)

    def suspend_worker(self, worker: str) -> None:
        """Skip `worker` in placement (it has gone quiet) but keep its pool, cache entries and load: unlike
        remove_worker, nothing is forgotten, since it may only be slow. Undone by resume_worker."""
        self.suspended.add(worker)

    def resume_worker(self, worker: str) -> None:
        """Place on `worker` again (it was heard from)."""
        self.suspended.discard(worker)

    def remove_worker(self, worker: str) -> None:
        """Forget a worker that left or died: its pools, cache entries, pending claims and load."""
        for pool in (self.prefill_workers, self.decode_workers, self.encode_workers):
            if worker in pool:
                pool.remove(worker)
        self.suspended.discard(worker)
        self.index.remove_worker(worker)
        self.content_index.remove_worker(worker)
        self.load.remove_worker(worker)

    # ------------------------------------------------------------------ metrics

    def load_imbalance(self) -> float:
        if not self.prefill_workers:
            return 1.0
        weight = self.config.least_load.running_weight
        costs = [max(1.0, least_load_cost(self.load.get(w), weight)) for w in self.prefill_workers]
        return max(costs) / min(costs)

    def stats(self) -> RouterStats:
        return RouterStats(
            dict(self.decisions),
            self._num_placements,
            self._num_prompt_tokens,
            self._predicted_hit_tokens,
            self._num_observed,
            self._predicted_hit_tokens_observed,
            self._observed_hit_tokens,
            self.load_imbalance(),
        )
