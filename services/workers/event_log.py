"""A worker's numbered log of KV cache events, read by its state publisher and by routers.

The worker loop appends one batch per turn that changed the cache. The state publisher
(services.workers.state_publisher) streams each new batch under its number; a router that missed
one asks, over Ray, for the batches after the last one it applied (`read(next_seq)`). If those have
left the bounded log (or the reader is new), it gets a snapshot instead (every cached block hash, on
the device and on the host tier, and the batch number the snapshot is as of) and goes on from there:
the router's index never depends on having seen every batch.

    batches:  [seq 40][seq 41] ... [seq 40 + MAX_BATCHES - 1]     (older ones dropped)

Bounded twice: by batches (MAX_BATCHES) and by what they hold (MAX_ENTRIES block hashes and token ids
in all), because a batch's size follows the prompts: 4,096 batches of long prompts' BlockStored
events held tens of MiB of Python ints, and a worker's memory grew for minutes before the batch
bound stopped it. An entry costs about 36 bytes (an int and its list slot), so MAX_ENTRIES is
about 9 MiB; a router that falls further behind than that reads a snapshot instead.

Thread safety: the loop thread appends and publishes; Ray's threads read. One lock guards the deque
and the next number.

A snapshot's seq and hashes: both tiers are copied under the lock, so no batch is appended meanwhile.
The loop thread changes the cache before it appends the batch that says so, so the copies may already
hold changes of batches after seq (and a block moving between tiers between the two copies may show in
both or neither); the reader applies those batches next, and as each event sets its block's state on
its tier (stored or not), the last one wins: the index ends as the worker's cache is.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from services.common.control import KVEventReplay, KVEventSnapshot, KVEventsReply
from services.common.kv_events import KVEvent, KVEventBatch

MAX_BATCHES = 4096
MAX_ENTRIES = 262_144  # block hashes plus token ids held by all retained batches


def _num_entries(batch: KVEventBatch) -> int:
    return sum(len(getattr(e, "block_hashes", ())) + len(getattr(e, "token_ids", ())) for e in batch.events)


class KVEventLog:
    def __init__(
        self,
        snapshot: Callable[[], list[int]],
        max_batches: int = MAX_BATCHES,
        clock: Callable[[], float] = time.time,
        max_entries: int = MAX_ENTRIES,
        host_snapshot: Callable[[], list[int]] = list,
    ) -> None:
        self._snapshot = snapshot  # the device's cached block hashes, as of now
        self._host_snapshot = host_snapshot  # the host tier's (default: no host tier)
        self._clock = clock  # a batch's `ts`: seconds since the epoch, as vLLM stamps it
        self._max_batches, self._max_entries = max_batches, max_entries
        self._batches: deque[KVEventBatch] = deque()  # numbered _next_seq - len .. _next_seq - 1
        self._entries: deque[int] = deque()  # _num_entries of each batch, in step with _batches
        self.num_entries = 0  # their sum: invariant <= max_entries unless one batch alone is larger
        self._next_seq = 0
        self._lock = threading.Lock()

    @property
    def next_seq(self) -> int:
        """The number the next appended batch will get."""
        return self._next_seq

    def append(self, events: list[KVEvent]) -> None:
        if not events:
            return
        batch = KVEventBatch(ts=self._clock(), events=events)
        entries = _num_entries(batch)
        with self._lock:
            self._batches.append(batch)
            self._entries.append(entries)
            self.num_entries += entries
            self._next_seq += 1
            # drop the oldest until both bounds hold; the newest batch always stays
            while len(self._batches) > 1 and (
                len(self._batches) > self._max_batches or self.num_entries > self._max_entries
            ):
                self._batches.popleft()
                self.num_entries -= self._entries.popleft()

    def read(self, next_seq: int | None) -> KVEventsReply:
        """The batches from `next_seq` on (none when the reader is up to date), or a snapshot when the
        reader is new (None) or asks for a batch the log no longer holds (or never numbered)."""
        with self._lock:
            first = self._next_seq - len(self._batches)
            if next_seq is not None and first <= next_seq <= self._next_seq:
                return KVEventReplay(first_seq=next_seq, batches=self._since(next_seq))
            return KVEventSnapshot(
                seq=self._next_seq - 1, block_hashes=self._snapshot(), host_block_hashes=self._host_snapshot()
            )

    def batches_from(self, next_seq: int) -> tuple[int, list[KVEventBatch]]:
        """(first, the batches numbered first, first + 1, ...): first is `next_seq`, or the oldest batch
        the log still holds when it has dropped next_seq. Never a snapshot (the publisher's read)."""
        with self._lock:
            first = max(next_seq, self._next_seq - len(self._batches))
            return first, self._since(first)

    def _since(self, seq: int) -> list[KVEventBatch]:
        # newest at the right: a reader that is nearly up to date (the publisher) walks a few entries
        offset = seq - (self._next_seq - len(self._batches))
        return [self._batches[i] for i in range(offset, len(self._batches))]
