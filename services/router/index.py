"""The router's global cache indexes, fed by the workers' own events (and, for KV blocks, by the
router's pending claims until those events settle them).

PrefixIndex: which worker holds which KV block (block hash -> workers), from KV events.
ContentIndex: which encode worker holds which image embedding (content hash -> workers), from
embedding events (services.router.events).

Representation. Each worker gets a bit (1 << slot); each key maps to the OR of its holders' bits,
and each worker keeps the set of keys it holds (for AllBlocksCleared, replay and removal):

    holders:  h0 -> 0b0101 (w0, w2)   h1 -> 0b0001 (w0)   h2 -> 0b0101 (w0, w2)
    keys:     w0 -> {h0, h1, h2}      w2 -> {h0, h2}

Prefix match. Block hashes are chained (services.common.block_hash), so a request's block i
equals a cached block i only if their whole prefixes agree; a worker can reuse the first k blocks
of a request iff it holds each of blocks 0..k-1. `match` walks the request's blocks once, ANDing
the holder masks; a worker's match length is the index at which its bit drops out:

    request:  h0     h1     h2     h3
    w0        yes    yes    NO     yes    -> 2   (h3 is stored but unreachable: the hole at h2)
    w2        yes    NO     yes    yes    -> 1

Cost: O(len(request's blocks)) dict lookups and integer ANDs, whatever the number of blocks
indexed; the walk stops as soon as no worker is left.

Eviction (BlockRemoved) of a block in the middle of a chain leaves the later blocks stored; they
stay in the index (the worker really holds them) and the match stops at the hole, as the engine's
own lookup does.

Sequence discipline (both indexes). A worker numbers its event batches FIRST_EVENT_SEQ,
FIRST_EVENT_SEQ + 1, ...; `apply` accepts only the batch numbered one past the last one applied
(or FIRST_EVENT_SEQ from a worker the index does not know yet). Any other number, a gap, a
repeat, or a restarted worker counting again from zero, is refused unapplied: `apply` returns
False and the caller asks that worker for a replay of its full state, installed by
`replace_worker(worker, seq, ...)`, after which batch seq + 1 is expected. While a replay is
pending the caller may drop the worker's batches; the replay supersedes them.

Pending claims (PrefixIndex only). A BlockStored arrives only once the worker has scheduled the
request, often a second after the router placed it; a burst sharing a new prefix would scatter
meanwhile. So the router records each placement at once: `add_pending(request_id, worker,
block_hashes)` claims every block of the request on that worker. Claims keep their own holder
masks, which `match` ORs into the held ones block by block (one more dict lookup per block
walked), so a claimed block counts as a held one:

    holders:          h0 -> 0b001 (w0)      h1 -> (absent)        held: keys[w], as above
    pending_holders:  h0 -> 0b100 (w2)      h1 -> 0b100 (w2)      an open claim
    pending:          w2 -> {h0: run << 32 | count, h1: run << 32 | count}
    match sees        h0 -> 0b101           h1 -> 0b100

`count` is the number of live placements claiming the block there; `run` is the serial number of
the placement that opened the current run of claims (the count went from 0 to 1). Reconciliation
with the worker's events and the placement's fate:

    BlockStored(h) on w            settles: h is held (keys[w]); the run of claims on (w, h) ends
    BlockRemoved(h) on w           of a block w held: removes it and settles (the run ends);
                                   of a block only claimed: nothing (it may yet be stored)
    AllBlocksCleared on w          drops and settles what w held; claims on the rest stay
    a placement ends               release_pending(request_id), or pending_block_ttl_s after it was
                                   made: count - 1 on each of its blocks whose run it joined
                                   (serial >= run); the claim goes at count 0
    replace_worker(w), remove_worker(w)
                                   every claim on w ends (a replay is the worker's whole truth)

so a claim never outlives its placement by more than the TTL; a placement never ends a claim of a
later run (claim, store, evict, claim again, then the first placement ends: the second claim
stays); a release after the store leaves the stored blocks alone; and a claim on a block the
worker already held goes with that block's eviction. Claims live in dicts of their own, sized by
the placements of the last second or so rather than by the whole index: a placement costs
O(len(block_hashes)) operations on those small dicts when made and again when it ends, and
`match` stays one walk over the request's blocks.

Host tier (PrefixIndex only). An engine with a host-memory KV tier keeps blocks evicted from the
device there and restores them on a hit. Its events tell the tiers apart by `medium`: BlockStored /
BlockRemoved with medium None (or vLLM's "GPU") are device blocks, as above; medium "CPU" enters and
leaves the host tier; any other medium is ignored (never taken for a device block). A block may be on
both tiers at once (restored while its host copy stays). The host tier keeps a holder map of its own,
in the same bitmask style, beside the device one:

    device:  holders  h0 -> 0b01 (w0)       h1 -> (absent)       keys      w0 -> {h0}
    host:    host_holders  h1 -> 0b01 (w0)  h2 -> 0b01 (w0)      host_keys w0 -> {h1, h2}

`match` reads the device map and the claims only, as before. `match_tiers` walks the request's blocks
once for both: a worker's chain goes on through its device prefix (held or claimed) and then through
the blocks it holds on the host tier, which the engine restores contiguously after that prefix. With
the maps above, for the request h0 h1 h2 h3:

    request:  h0       h1      h2      h3
    w0        device   host    host    NO     -> device 1, host 2 more

    device_alive(i) = device_alive(i-1) & (holders(h_i) | pending(h_i))
    chain_alive(i)  = device_alive(i) | (chain_alive(i-1) & host_holders(h_i))

A worker's host count is where its bit leaves chain_alive minus where it leaves device_alive. Cost:
one more dict lookup per block walked, and none at all while no worker holds a host block.
AllBlocksCleared clears both tiers; replace_worker and remove_worker drop the worker's host blocks too
(a replay installs the host blocks it is given, none by default). The batch sequence numbers are the
device tier's, one stream per worker.

Tunables:
  pending_block_ttl_s  10.0  seconds a placement's claims live at most; 0 records none

The indexes are plain single-threaded objects: one owner (the router) calls them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from services.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from services.router.events import AllEmbeddingsCleared, EmbeddingEvent, EmbeddingRemoved, EmbeddingStored

# The number of a worker's first event batch.
FIRST_EVENT_SEQ = 0

# A pending claim packs (run << _RUN_SHIFT) | count into one int: no object per claimed block.
_RUN_SHIFT = 32
_COUNT_MASK = (1 << _RUN_SHIFT) - 1

# The `medium` of KV events: the device's (None as tristage writes it, "GPU" as vLLM does) and the host tier's.
DEVICE_MEDIA = (None, "GPU")
HOST_MEDIUM = "CPU"

K = TypeVar("K", bound=Hashable)


class _HolderSets(Generic[K]):
    """key -> bitmask of holder workers, worker -> keys held, worker -> next expected batch number."""

    def __init__(self) -> None:
        self._holders: dict[K, int] = {}
        self._keys: dict[str, set[K]] = {}
        self._bit_of: dict[str, int] = {}
        self._worker_at: list[str | None] = []  # slot -> worker
        self._next_seq: dict[str, int] = {}

    # ------------------------------------------------------------------ workers and sequence numbers

    def workers(self) -> list[str]:
        """Workers with an event stream or a replay installed, in order of arrival."""
        return list(self._next_seq)

    def expected_seq(self, worker: str) -> int:
        """The number of the next batch `apply` accepts from this worker."""
        return self._next_seq.get(worker, FIRST_EVENT_SEQ)

    def num_keys(self, worker: str) -> int:
        return len(self._keys.get(worker, ()))

    def __len__(self) -> int:
        """Distinct keys held by at least one worker (claims not counted)."""
        return len(self._holders)

    def holders(self, key: K) -> list[str]:
        """Workers holding the key (claims not counted)."""
        return self._workers_in(self._holders.get(key, 0))

    def remove_worker(self, worker: str) -> None:
        """Forget the worker and everything it held (it left or died)."""
        if worker not in self._bit_of:
            return
        self._clear(worker)
        slot = self._bit_of.pop(worker).bit_length() - 1
        self._worker_at[slot] = None
        del self._keys[worker]
        self._next_seq.pop(worker, None)

    def _accepts(self, worker: str, seq: int) -> bool:
        return seq == self._next_seq.get(worker, FIRST_EVENT_SEQ)

    def _advance(self, worker: str, seq: int) -> None:
        self._next_seq[worker] = seq + 1

    def _bit(self, worker: str) -> int:
        bit = self._bit_of.get(worker)
        if bit is None:
            try:
                slot = self._worker_at.index(None)
                self._worker_at[slot] = worker
            except ValueError:
                slot = len(self._worker_at)
                self._worker_at.append(worker)
            bit = self._bit_of[worker] = 1 << slot
            self._keys[worker] = set()
        return bit

    def _workers_in(self, mask: int) -> list[str]:
        workers: list[str] = []
        while mask:
            low = mask & -mask
            worker = self._worker_at[low.bit_length() - 1]
            assert worker is not None
            workers.append(worker)
            mask ^= low
        return workers

    # ------------------------------------------------------------------ key sets

    def _add(self, worker: str, keys: Iterable[K]) -> None:
        bit = self._bit(worker)
        held = self._keys[worker]
        holders = self._holders
        for key in keys:
            held.add(key)
            holders[key] = holders.get(key, 0) | bit

    def _remove(self, worker: str, keys: Iterable[K]) -> None:
        bit = self._bit(worker)
        held = self._keys[worker]
        for key in keys:
            if key in held:
                held.discard(key)
                self._drop_bit(key, bit)

    def _clear(self, worker: str) -> None:
        bit = self._bit(worker)
        for key in self._keys[worker]:
            self._drop_bit(key, bit)
        self._keys[worker] = set()

    def _replace(self, worker: str, seq: int, keys: Iterable[K]) -> None:
        bit = self._bit(worker)
        new = set(keys)
        old = self._keys[worker]
        for key in old - new:
            self._drop_bit(key, bit)
        for key in new - old:
            self._holders[key] = self._holders.get(key, 0) | bit
        self._keys[worker] = new
        self._advance(worker, seq)

    def _drop_bit(self, key: K, bit: int) -> None:
        mask = self._holders[key] & ~bit
        if mask:
            self._holders[key] = mask
        else:
            del self._holders[key]


class _TierHolders:
    """One extra cache tier: block hash -> bitmask of its holders there, worker -> blocks it holds there.

    The workers' bits are the owning index's (_HolderSets._bit); the caller passes them.
    """

    __slots__ = ("holders", "keys")

    def __init__(self) -> None:
        self.holders: dict[int, int] = {}
        self.keys: dict[str, set[int]] = {}

    def add(self, worker: str, bit: int, block_hashes: Iterable[int]) -> None:
        held = self.keys.setdefault(worker, set())
        holders = self.holders
        for block_hash in block_hashes:
            held.add(block_hash)
            holders[block_hash] = holders.get(block_hash, 0) | bit

    def remove(self, worker: str, bit: int, block_hashes: Iterable[int]) -> None:
        held = self.keys.get(worker)
        if not held:
            return
        for block_hash in block_hashes:
            if block_hash in held:
                held.discard(block_hash)
                self._drop_bit(block_hash, bit)

    def clear(self, worker: str, bit: int) -> None:
        for block_hash in self.keys.pop(worker, ()):
            self._drop_bit(block_hash, bit)

    def _drop_bit(self, block_hash: int, bit: int) -> None:
        mask = self.holders[block_hash] & ~bit
        if mask:
            self.holders[block_hash] = mask
        else:
            del self.holders[block_hash]


@dataclass(slots=True)
class _PendingPlacement:
    """One placement's claims: every full block of its prompt, on its worker."""

    request_id: str
    worker: str
    serial: int  # placements numbered in order: which runs of claims this one joined
    block_hashes: Sequence[int]  # the request's, all claimed
    placed_at: float
    ended: bool = False


class PrefixIndex(_HolderSets[int]):
    """Which worker holds which KV block, from BlockStored / BlockRemoved / AllBlocksCleared,
    plus the blocks the router's own recent placements claim (pending claims, in the module doc),
    and, apart, the blocks each worker holds on its host tier (host tier, in the module doc)."""

    def __init__(self, pending_block_ttl_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.pending_block_ttl_s = pending_block_ttl_s
        self._clock = clock
        self._pending_holders: dict[int, int] = {}  # block hash -> bits of the workers with a claim on it
        self._pending: dict[str, dict[int, int]] = {}  # worker -> block hash -> run << 32 | count
        self._placements: dict[str, _PendingPlacement] = {}  # request id -> its claims
        self._placements_by_age: deque[_PendingPlacement] = deque()
        self._num_placements = 0
        self._host = _TierHolders()  # the host tier: medium HOST_MEDIUM

    def apply(self, worker: str, seq: int, events: Sequence[KVEvent]) -> bool:
        """Apply one numbered batch; False (nothing applied) when `seq` is not the one expected."""
        if not self._accepts(worker, seq):
            return False
        for event in events:
            if isinstance(event, BlockStored):
                if event.medium in DEVICE_MEDIA:
                    self._add(worker, event.block_hashes)
                    self._settle(worker, event.block_hashes)
                elif event.medium == HOST_MEDIUM:
                    self._host.add(worker, self._bit(worker), event.block_hashes)
            elif isinstance(event, BlockRemoved):
                if event.medium in DEVICE_MEDIA:
                    if worker in self._pending:  # a removal settles a claim only on a block the worker held
                        held = self._keys[worker]
                        self._settle(worker, [block_hash for block_hash in event.block_hashes if block_hash in held])
                    self._remove(worker, event.block_hashes)
                elif event.medium == HOST_MEDIUM:
                    self._host.remove(worker, self._bit(worker), event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self._settle(worker, self._keys.get(worker, ()))
                self._clear(worker)
                self._host.clear(worker, self._bit(worker))
            else:
                raise TypeError(f"not a KV event: {event!r}")
        self._bit(worker)  # an empty first batch still registers the worker
        self._advance(worker, seq)
        return True

    def replace_worker(
        self,
        worker: str,
        seq: int,
        stored_hashes_with_parents: Iterable[tuple[int, int | None]],
        host_block_hashes: Iterable[int] = (),
    ) -> None:
        """Install a replay: exactly these (block hash, parent hash) pairs on the device, and these
        blocks on the host tier, as of the worker's batch `seq`.

        Parents are accepted to match the BlockStored shape but not needed: the chain is inside
        each hash, and a block whose parent is absent is unreachable by `match`, as after eviction.
        Every pending claim on the worker ends; its host blocks are exactly `host_block_hashes`.
        """
        self._drop_pending(worker)
        self._replace(worker, seq, (block_hash for block_hash, _ in stored_hashes_with_parents))
        bit = self._bit(worker)
        self._host.clear(worker, bit)
        self._host.add(worker, bit, host_block_hashes)

    def remove_worker(self, worker: str) -> None:
        """Forget the worker, everything it held on either tier and every claim on it (it left or died)."""
        self._drop_pending(worker)
        bit = self._bit_of.get(worker)
        if bit is not None:
            self._host.clear(worker, bit)
        super().remove_worker(worker)

    def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """worker -> the number of leading blocks of `block_hashes` it holds or claims (absent: none)."""
        self._expire_pending(self._clock())
        matched: dict[str, int] = {}
        holders = self._holders
        pending = self._pending_holders
        alive = -1  # every worker, until block 0 says otherwise
        for i, block_hash in enumerate(block_hashes):
            mask = alive & (holders.get(block_hash, 0) | pending.get(block_hash, 0))
            if mask != alive:
                if i > 0:
                    self._record(alive & ~mask, i, matched)
                if not mask:
                    return matched
                alive = mask
        if block_hashes:
            self._record(alive, len(block_hashes), matched)
        return matched

    def match_tiers(self, block_hashes: Sequence[int]) -> tuple[dict[str, int], dict[str, int]]:
        """(match(block_hashes), host): host maps worker -> how many further leading blocks of
        `block_hashes` it holds on its host tier right after its device match (absent: none).

        One walk over the blocks for both (the module doc's host tier); while no worker holds a host
        block it is `match` itself.
        """
        host_holders = self._host.holders
        if not host_holders:
            return self.match(block_hashes), {}
        self._expire_pending(self._clock())
        device_matched: dict[str, int] = {}
        chain_matched: dict[str, int] = {}
        holders = self._holders
        pending = self._pending_holders
        device_alive = chain_alive = -1  # every worker, until block 0 says otherwise
        for i, block_hash in enumerate(block_hashes):
            device = device_alive & (holders.get(block_hash, 0) | pending.get(block_hash, 0))
            chain = device | (chain_alive & host_holders.get(block_hash, 0))
            if device != device_alive:
                if i > 0:
                    self._record(device_alive & ~device, i, device_matched)
                device_alive = device
            if chain != chain_alive:
                if i > 0:
                    self._record(chain_alive & ~chain, i, chain_matched)
                if not chain:  # device_alive is 0 too (device <= chain), and recorded above
                    break
                chain_alive = chain
        else:
            if block_hashes:
                self._record(device_alive, len(block_hashes), device_matched)
                self._record(chain_alive, len(block_hashes), chain_matched)
        host: dict[str, int] = {}
        for worker, num_blocks in chain_matched.items():
            num_host_blocks = num_blocks - device_matched.get(worker, 0)
            if num_host_blocks:
                host[worker] = num_host_blocks
        return device_matched, host

    def host_blocks(self, worker: str) -> frozenset[int]:
        """The block hashes the worker holds on its host tier (a copy; for tests and replay checks)."""
        return frozenset(self._host.keys.get(worker, ()))

    def num_host_keys(self, worker: str) -> int:
        return len(self._host.keys.get(worker, ()))

    def host_holders(self, block_hash: int) -> list[str]:
        """Workers holding the block on their host tier."""
        return self._workers_in(self._host.holders.get(block_hash, 0))

    def holds(self, worker: str, block_hash: int) -> bool:
        """Whether `worker` holds the block or has a live claim on it (what `match` counts). O(1)."""
        bit = self._bit_of.get(worker)
        if bit is None:
            return False
        return bool((self._holders.get(block_hash, 0) | self._pending_holders.get(block_hash, 0)) & bit)

    def blocks(self, worker: str) -> frozenset[int]:
        """The block hashes the worker holds, confirmed by its events (a copy; for tests and replay checks)."""
        return frozenset(self._keys.get(worker, ()))

    # ------------------------------------------------------------------ pending claims

    def add_pending(self, request_id: str, worker: str, block_hashes: Sequence[int]) -> None:
        """The router placed `request_id` on `worker`: claim every block of `block_hashes` there.

        `block_hashes` is kept, not copied: the caller does not change it afterwards. A request
        placed again (a retry) gives up its earlier claims first. Nothing is recorded while
        pending_block_ttl_s <= 0.
        """
        self.release_pending(request_id)
        if self.pending_block_ttl_s <= 0 or not block_hashes:
            return
        now = self._clock()
        self._expire_pending(now)
        bit = self._bit(worker)
        serial = self._num_placements
        self._num_placements += 1
        opened = serial << _RUN_SHIFT | 1
        claims = self._pending.setdefault(worker, {})
        pending = self._pending_holders
        for block_hash in block_hashes:  # mostly two dict operations a block: this loop is the cost of a claim
            claim = claims.setdefault(block_hash, opened)
            if claim == opened:  # a new run (only this placement's serial makes this value)
                mask = pending.setdefault(block_hash, bit)
                if not mask & bit:
                    pending[block_hash] = mask | bit
            else:
                claims[block_hash] = claim + 1
        placement = _PendingPlacement(request_id, worker, serial, block_hashes, now)
        self._placements[request_id] = placement
        self._placements_by_age.append(placement)

    def release_pending(self, request_id: str) -> None:
        """The placement was abandoned: its claims still open end now (blocks the worker stored stay)."""
        placement = self._placements.get(request_id)
        if placement is not None:
            self._end(placement)

    def pending_blocks(self, worker: str) -> dict[int, int]:
        """block hash -> live placements claiming it on `worker`, unsettled (a copy; for tests)."""
        self._expire_pending(self._clock())
        return {block_hash: claim & _COUNT_MASK for block_hash, claim in self._pending.get(worker, {}).items()}

    def num_pending_placements(self) -> int:
        """Placements made within the TTL and not released (their claims may all be settled)."""
        self._expire_pending(self._clock())
        return len(self._placements)

    def _settle(self, worker: str, block_hashes: Iterable[int]) -> None:
        """The worker's events now tell these blocks' state: the runs of claims on them end."""
        claims = self._pending.get(worker)
        if not claims:
            return
        bit = self._bit_of[worker]
        for block_hash in block_hashes:
            if claims.pop(block_hash, None) is not None:
                self._drop_pending_bit(block_hash, bit)
        if not claims:
            del self._pending[worker]

    def _expire_pending(self, now: float) -> None:
        by_age = self._placements_by_age
        if not by_age:
            return
        horizon = now - self.pending_block_ttl_s
        while by_age and (by_age[0].ended or by_age[0].placed_at < horizon):
            placement = by_age.popleft()
            if not placement.ended:
                self._end(placement)

    def _end(self, placement: _PendingPlacement) -> None:
        placement.ended = True
        del self._placements[placement.request_id]
        claims = self._pending.get(placement.worker)
        if claims is None:
            return
        bit = self._bit_of[placement.worker]
        for block_hash in placement.block_hashes:
            claim = claims.get(block_hash)
            if claim is None or claim >> _RUN_SHIFT > placement.serial:
                continue  # settled since, or a later run this placement is not part of
            if claim & _COUNT_MASK > 1:
                claims[block_hash] = claim - 1
            else:
                del claims[block_hash]
                self._drop_pending_bit(block_hash, bit)
        if not claims:
            del self._pending[placement.worker]

    def _drop_pending(self, worker: str) -> None:
        for placement in [p for p in self._placements.values() if p.worker == worker]:
            placement.ended = True
            del self._placements[placement.request_id]
        claims = self._pending.pop(worker, None)
        if claims:
            bit = self._bit_of[worker]
            for block_hash in claims:
                self._drop_pending_bit(block_hash, bit)

    def _drop_pending_bit(self, block_hash: int, bit: int) -> None:
        mask = self._pending_holders[block_hash] & ~bit
        if mask:
            self._pending_holders[block_hash] = mask
        else:
            del self._pending_holders[block_hash]

    def _record(self, mask: int, num_blocks: int, matched: dict[str, int]) -> None:
        worker_at = self._worker_at
        while mask:
            low = mask & -mask
            worker = worker_at[low.bit_length() - 1]
            assert worker is not None
            matched[worker] = num_blocks
            mask ^= low


class ContentIndex(_HolderSets[str]):
    """Which encode worker holds which image embedding, from the embedding events (services.router.events)."""

    def apply(self, worker: str, seq: int, events: Sequence[EmbeddingEvent]) -> bool:
        """Apply one numbered batch; False (nothing applied) when `seq` is not the one expected."""
        if not self._accepts(worker, seq):
            return False
        for event in events:
            if isinstance(event, EmbeddingStored):
                self._add(worker, event.content_hashes)
            elif isinstance(event, EmbeddingRemoved):
                self._remove(worker, event.content_hashes)
            elif isinstance(event, AllEmbeddingsCleared):
                self._clear(worker)
            else:
                raise TypeError(f"not an embedding event: {event!r}")
        self._bit(worker)
        self._advance(worker, seq)
        return True

    def replace_worker(self, worker: str, seq: int, content_hashes: Iterable[str]) -> None:
        """Install a replay: exactly these embeddings, as of the worker's batch `seq`."""
        self._replace(worker, seq, content_hashes)

    def match(self, content_hashes: Sequence[str]) -> dict[str, int]:
        """worker -> how many of `content_hashes` it holds (workers with none are absent)."""
        held: dict[str, int] = {}
        for content_hash in content_hashes:
            for worker in self._workers_in(self._holders.get(content_hash, 0)):
                held[worker] = held.get(worker, 0) + 1
        return held

    def contents(self, worker: str) -> frozenset[str]:
        return frozenset(self._keys.get(worker, ()))
