"""The router's global cache indexes, fed only by the workers' own events.

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

The indexes are plain single-threaded objects: one owner (the router) calls them.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Generic, TypeVar

from services.common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from services.router.events import AllEmbeddingsCleared, EmbeddingEvent, EmbeddingRemoved, EmbeddingStored

# The number of a worker's first event batch.
FIRST_EVENT_SEQ = 0

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
        """Distinct keys held by at least one worker."""
        return len(self._holders)

    def holders(self, key: K) -> list[str]:
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


class PrefixIndex(_HolderSets[int]):
    """Which worker holds which KV block, from BlockStored / BlockRemoved / AllBlocksCleared."""

    def apply(self, worker: str, seq: int, events: Sequence[KVEvent]) -> bool:
        """Apply one numbered batch; False (nothing applied) when `seq` is not the one expected."""
        if not self._accepts(worker, seq):
            return False
        for event in events:
            if isinstance(event, BlockStored):
                self._add(worker, event.block_hashes)
            elif isinstance(event, BlockRemoved):
                self._remove(worker, event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self._clear(worker)
            else:
                raise TypeError(f"not a KV event: {event!r}")
        self._bit(worker)  # an empty first batch still registers the worker
        self._advance(worker, seq)
        return True

    def replace_worker(self, worker: str, seq: int,
                       stored_hashes_with_parents: Iterable[tuple[int, int | None]]) -> None:
        """Install a replay: exactly these (block hash, parent hash) pairs, as of the worker's batch `seq`.

        Parents are accepted to match the BlockStored shape but not needed: the chain is inside
        each hash, and a block whose parent is absent is unreachable by `match`, as after eviction.
        """
        self._replace(worker, seq, (block_hash for block_hash, _ in stored_hashes_with_parents))

    def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """worker -> the number of leading blocks of `block_hashes` it holds (workers with none are absent)."""
        matched: dict[str, int] = {}
        holders = self._holders
        alive = -1  # every worker, until block 0 says otherwise
        for i, block_hash in enumerate(block_hashes):
            mask = alive & holders.get(block_hash, 0)
            if mask != alive:
                if i > 0:
                    self._record(alive & ~mask, i, matched)
                if not mask:
                    return matched
                alive = mask
        if block_hashes:
            self._record(alive, len(block_hashes), matched)
        return matched

    def blocks(self, worker: str) -> frozenset[int]:
        """The block hashes the worker holds (a copy; for tests and replay checks)."""
        return frozenset(self._keys.get(worker, ()))

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
