"""A worker's numbered log of KV cache events, read by routers through the control plane.

The worker loop appends one batch per step that changed the cache. A reader asks for the batches
after the last one it applied; if those have left the bounded log (or the reader is new), it gets
a snapshot instead (every cached block hash, and the batch number the snapshot is as of) and
replays from there: the router's index never depends on having seen every batch.

    batches:  [seq 40][seq 41] ... [seq 40 + MAX_BATCHES - 1]     (older ones dropped)
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from services.common.kv_events import KVEvent

MAX_BATCHES = 4096


class KVEventLog:
    def __init__(self, snapshot: Callable[[], list[int]], max_batches: int = MAX_BATCHES) -> None:
        self._snapshot = snapshot  # the cached block hashes, as of now
        self._batches: deque[tuple[int, list[KVEvent]]] = deque(maxlen=max_batches)
        self._next_seq = 0
        self._lock = threading.Lock()

    def append(self, events: list[KVEvent]) -> None:
        if not events:
            return
        with self._lock:
            self._batches.append((self._next_seq, events))
            self._next_seq += 1

    def read(self, next_seq: int | None) -> dict:
        """{"batches": [(seq, events)]} from `next_seq` on, or {"snapshot": hashes, "seq": last seq} when
        the reader is new or fell behind the log."""
        with self._lock:
            first = self._batches[0][0] if self._batches else self._next_seq
            if next_seq is not None and first <= next_seq <= self._next_seq:
                return {"batches": [(seq, ev) for seq, ev in self._batches if seq >= next_seq]}
            return {"snapshot": self._snapshot(), "seq": self._next_seq - 1}
