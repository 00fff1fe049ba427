"""The waiting queue: the order in which the scheduler offers waiting requests for admission.

The scheduler admits `peek()` and then `pop()`s it, and stops at the first request that does not fit
(no KV room); the queue decides only the order (EngineConfig.scheduling_policy):

  fcfs    arrival order.
  preble  Preble's local scheduler (Srivatsa et al., "Preble: Efficient Distributed Prompt Scheduling
          for LLM Serving", ICLR 2025, §4, local scheduler): priority groups by prefix-cache hit ratio,
          visited round-robin with quotas that favour high hits and starve nobody.

Both put preempted requests ahead of every other, the latest preempted first, as a deque's appendleft.

With a TTFT SLO the scheduler passes a `priority_key` (services/engine/slo_admission.py: a request's
TTFT slack plus now, fixed at arrival), and requests never preempted go by least key, arrival order
breaking ties: fcfs becomes KeyedQueue (preempted first, then least slack first), and inside each of
Preble's groups the least key comes first instead of the oldest (groups, quotas and the cursor are
unchanged). Without one (the default) nothing here changes.

Preble's priority groups, over the requests waiting that were never preempted:

    hit(r)   = tokens of r's prefix found in the cache / tokens of r (its prompt, plus any output it was
               resumed with); 0 for a request computing prompt logprobs (it adopts no cached blocks)
    group(r) = ceil(NUM_GROUPS * hit(r)) - 1, and 0 for hit 0

        hit    0   (0, .1]  (.1, .2]  ...  (.8, .9]  (.9, 1)
        group  0      0        1      ...      8        9

    The groups are visited round-robin from the highest: 9, 8, ..., 0, 9, 8, ... A visit to group g
    admits up to (g + 1) * K of its requests, oldest first, while the step's token budget and
    max_num_seqs last. The cursor (the group being visited, what is left of its quota) outlives the
    step: a step that runs out of budget or KV mid-visit resumes there, with the request that did not
    fit first. A round (one visit to each group) admits at most K * (1 + ... + NUM_GROUPS) = 55 K
    requests and visits every non-empty group, and inside a group only older requests come first, so
    no request waits for ever. An empty queue restarts the round at the highest group.

Tunables (PriorityGroupQueue's arguments):
    NUM_GROUPS = 10            priority groups (the paper's)
    K = 10                     a visit to group g admits up to (g + 1) * K requests (the paper's)
    MAX_PROBES_PER_STEP = 32   re-probes of hit ratios per step (ours: below)

Probe cost. A probe is `KVCacheManager.num_cached_prefix_tokens`: the walk of `get_computed_blocks`
over the request's block hashes (kept on the request, computed once), matching hashes without
re-checking tokens, adopting nothing and not counted in the prefix-cache metrics. It costs one dict
lookup per cached block: about 7 us for a 2000-token prompt with a 1024-token hit (block size 16, CPU
Python), where the token-checking lookup takes 23 us. The cache changes nearly every step (new full
blocks, evictions), so invalidating on change would re-probe the whole queue every step, and probing
a queue of 1000 such requests costs about 7 ms a step. Instead:
  * a request is probed when it arrives (computing its hashes, which admission needs anyway);
  * `refresh()`, once per step, re-probes at most MAX_PROBES_PER_STEP requests (about 0.2 ms), the
    longest unprobed first, cycling through the queue; the others keep their last hit ratio.
A stale ratio only misorders; admission itself adopts exactly what a fresh `get_computed_blocks` finds.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from services.engine.request import Request

SCHEDULING_POLICIES = ("fcfs", "preble")
NUM_GROUPS = 10
K = 10
MAX_PROBES_PER_STEP = 32


class WaitingQueue(Protocol):
    """Owned and mutated by the scheduler's thread; `len` and `iter` (a copy) may be read from others."""

    def append(self, request: Request) -> None:
        """A new request."""

    def push_front(self, request: Request) -> None:
        """A preempted request: ahead of every other."""

    def peek(self) -> Request:
        """The request to admit next (IndexError when empty)."""

    def pop(self) -> Request:
        """Take out the request `peek()` returns."""

    def remove(self, request: Request) -> None:
        """Take out any request (finished or aborted while waiting)."""

    def refresh(self) -> None:
        """Once per step, before the first `peek()`."""

    def __contains__(self, request: object) -> bool: ...

    def __iter__(self) -> Iterator[Request]: ...

    def __len__(self) -> int: ...


def make_waiting_queue(
    policy: str,
    num_cached_prefix_tokens: Callable[[Request], int],
    priority_key: Callable[[Request], float] | None = None,
) -> WaitingQueue:
    if policy == "fcfs":
        return FCFSQueue() if priority_key is None else KeyedQueue(priority_key)
    if policy == "preble":
        return PriorityGroupQueue(num_cached_prefix_tokens, priority_key=priority_key)
    raise ValueError(f"scheduling policy {policy!r} is not one of {SCHEDULING_POLICIES}")


def priority_group(num_cached_tokens: int, num_tokens: int, num_groups: int = NUM_GROUPS) -> int:
    """ceil(num_groups * hit) - 1 in integers (no float rounding at the edges), 0 for no hit."""
    return max(0, -(-num_groups * num_cached_tokens // num_tokens) - 1)


class FCFSQueue:
    """Arrival order, preempted requests in front."""

    def __init__(self) -> None:
        self._requests: deque[Request] = deque()

    def append(self, request: Request) -> None:
        self._requests.append(request)

    def push_front(self, request: Request) -> None:
        self._requests.appendleft(request)

    def peek(self) -> Request:
        return self._requests[0]

    def pop(self) -> Request:
        return self._requests.popleft()

    def remove(self, request: Request) -> None:
        self._requests.remove(request)

    def refresh(self) -> None:
        pass

    def __contains__(self, request: object) -> bool:
        return request in self._requests

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._requests))

    def __len__(self) -> int:
        return len(self._requests)


class KeyedQueue:
    """Preempted requests in front (latest preempted first), then the others by least key, then arrival."""

    def __init__(self, priority_key: Callable[[Request], float]) -> None:
        self._priority_key = priority_key
        self._preempted: deque[Request] = deque()
        self._heap: list[tuple[float, int, Request]] = []  # (key, arrival seq, request)
        self._seq = itertools.count()

    def append(self, request: Request) -> None:
        heapq.heappush(self._heap, (self._priority_key(request), next(self._seq), request))

    def push_front(self, request: Request) -> None:
        self._preempted.appendleft(request)

    def peek(self) -> Request:
        return self._preempted[0] if self._preempted else self._heap[0][2]

    def pop(self) -> Request:
        return self._preempted.popleft() if self._preempted else heapq.heappop(self._heap)[2]

    def remove(self, request: Request) -> None:
        if request in self._preempted:
            self._preempted.remove(request)
            return
        self._heap = [item for item in self._heap if item[2] is not request]  # aborts are rare: O(n)
        heapq.heapify(self._heap)

    def refresh(self) -> None:
        pass

    def __contains__(self, request: object) -> bool:
        return request in self._preempted or any(item[2] is request for item in self._heap)

    def __iter__(self) -> Iterator[Request]:
        return iter([*self._preempted, *(item[2] for item in list(self._heap))])

    def __len__(self) -> int:
        return len(self._preempted) + len(self._heap)


@dataclass(eq=False)
class _Entry:
    seq: int  # arrival order
    group: int  # from the last probe
    key: float  # the priority key (the seq without one): least first inside a group


class PriorityGroupQueue:
    """Preble's priority groups (module docstring): one heap per group, oldest first.

    Inside a group the least `priority_key` comes first (without one, the oldest).
    A request whose group changes is pushed on its new group's heap; the entry left on the old heap
    is stale (its request's group or presence says so) and dropped when it reaches the top, or when
    stale entries outnumber live ones.
    """

    def __init__(
        self,
        num_cached_prefix_tokens: Callable[[Request], int],
        num_groups: int = NUM_GROUPS,
        k: int = K,
        max_probes_per_step: int = MAX_PROBES_PER_STEP,
        priority_key: Callable[[Request], float] | None = None,
    ) -> None:
        self._num_cached_prefix_tokens = num_cached_prefix_tokens
        self._priority_key = priority_key
        self.num_groups = num_groups
        self.k = k
        self.max_probes_per_step = max_probes_per_step
        self._preempted: deque[Request] = deque()
        self._entries: dict[Request, _Entry] = {}  # the others, in arrival order
        self._heaps: list[list[tuple[float, int, Request]]] = [[] for _ in range(num_groups)]  # (key, seq, request)
        self._num_heap_entries = 0  # live and stale
        self._probe_order: deque[Request] = deque()  # longest unprobed first (may hold departed ones)
        self._seq = itertools.count()
        self._restart_round()

    @property
    def group(self) -> int:
        """The group being visited."""
        return self._group

    def group_of(self, request: Request) -> int:
        """Its group as of its last probe."""
        return self._entries[request].group

    # ------------------------------------------------------------------ WaitingQueue

    def append(self, request: Request) -> None:
        seq = next(self._seq)
        key = float(seq) if self._priority_key is None else self._priority_key(request)
        entry = _Entry(seq, self._probe(request), key)
        self._entries[request] = entry
        self._push(entry, request)
        self._probe_order.append(request)

    def push_front(self, request: Request) -> None:
        self._preempted.appendleft(request)

    def peek(self) -> Request:
        if self._preempted:
            return self._preempted[0]
        return self._visit()[0][2]

    def pop(self) -> Request:
        if self._preempted:
            return self._preempted.popleft()
        heap = self._visit()
        _, _, request = heapq.heappop(heap)
        self._num_heap_entries -= 1
        del self._entries[request]
        self._quota -= 1
        if not self._entries:
            self._restart_round()
        return request

    def remove(self, request: Request) -> None:
        if request in self._entries:
            del self._entries[request]  # its heap entry goes stale
            if not self._entries:
                self._restart_round()
        else:
            self._preempted.remove(request)

    def refresh(self) -> None:
        num_probes = 0
        for _ in range(len(self._probe_order)):
            if num_probes == self.max_probes_per_step:
                break
            request = self._probe_order.popleft()
            entry = self._entries.get(request)
            if entry is None:
                continue  # admitted or removed since its last probe
            self._probe_order.append(request)
            num_probes += 1
            group = self._probe(request)
            if group != entry.group:
                entry.group = group
                self._push(entry, request)
        if self._num_heap_entries > 2 * len(self._entries) + 64:
            self._rebuild_heaps()

    def __contains__(self, request: object) -> bool:
        return request in self._entries or request in self._preempted

    def __iter__(self) -> Iterator[Request]:
        return iter([*self._preempted, *self._entries])

    def __len__(self) -> int:
        return len(self._preempted) + len(self._entries)

    # ------------------------------------------------------------------ internals

    def _probe(self, request: Request) -> int:
        return priority_group(self._num_cached_prefix_tokens(request), request.num_tokens, self.num_groups)

    def _push(self, entry: _Entry, request: Request) -> None:
        heapq.heappush(self._heaps[entry.group], (entry.key, entry.seq, request))
        self._num_heap_entries += 1

    def _restart_round(self) -> None:
        self._group = self.num_groups - 1
        self._quota = self.num_groups * self.k

    def _visit(self) -> list[tuple[float, int, Request]]:
        """The heap of the group to take from: the cursor's, or the next non-empty one with its quota."""
        for _ in range(self.num_groups + 1):
            heap = self._live_heap(self._group)
            if heap and self._quota > 0:
                return heap
            self._group = (self._group - 1) % self.num_groups
            self._quota = (self._group + 1) * self.k
        raise IndexError("peek from an empty waiting queue")

    def _live_heap(self, group: int) -> list[tuple[float, int, Request]]:
        """The group's heap with its stale top entries dropped."""
        heap = self._heaps[group]
        while heap:
            _, seq, request = heap[0]
            entry = self._entries.get(request)
            if entry is not None and entry.seq == seq and entry.group == group:
                break
            heapq.heappop(heap)
            self._num_heap_entries -= 1
        return heap

    def _rebuild_heaps(self) -> None:
        self._heaps = [[] for _ in range(self.num_groups)]
        for request, entry in self._entries.items():
            self._heaps[entry.group].append((entry.key, entry.seq, request))
        for heap in self._heaps:
            heapq.heapify(heap)  # without a priority key, ascending seq: already a heap
        self._num_heap_entries = len(self._entries)
