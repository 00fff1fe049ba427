"""A least-recently-used map bounded by the bytes of its values (the encoders' embedding cache, the
gateway's images named by uuid).

Invariant: `num_bytes` is the sum of `size_of(value)` over the entries, and at most `capacity_bytes`
after every call. `put` replaces the key's entry, then evicts from the least recently used end until
the new value fits; a value larger than the whole budget is not kept (and the key's old entry is
gone). Not thread-safe: owners that share one across threads lock around it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BytesLRU(Generic[K, V]):
    def __init__(self, capacity_bytes: int, size_of: Callable[[V], int]) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity_bytes = capacity_bytes
        self.num_bytes = 0
        self._size_of = size_of
        self._entries: OrderedDict[K, V] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        """A peek: leaves the recency order alone."""
        return key in self._entries

    def keys(self) -> list[K]:
        """Least recently used first."""
        return list(self._entries)

    def get(self, key: K) -> V | None:
        """The value, made the most recently used; None if absent."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> list[K]:
        """Keep `value` under `key`; returns the keys evicted for room, least recently used first."""
        self.pop(key)
        size = self._size_of(value)
        if size > self.capacity_bytes:
            return []
        evicted = []
        while self.num_bytes + size > self.capacity_bytes:
            oldest = next(iter(self._entries))
            self.pop(oldest)
            evicted.append(oldest)
        self._entries[key] = value
        self.num_bytes += size
        return evicted

    def pop(self, key: K) -> V | None:
        value = self._entries.pop(key, None)
        if value is not None:
            self.num_bytes -= self._size_of(value)
        return value
