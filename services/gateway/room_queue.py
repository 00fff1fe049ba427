"""Requests waiting for decode KV room, in arrival order.

A disaggregated cluster whose decode workers are all short of a request's KV blocks (the router's
NoRoomNow) queues the request here instead of refusing it: a full decode pool costs clients time,
never an error.

Strict FIFO. Only the head of the queue tries placement again, each time it is woken:
  - a worker reported its state (`notify`: its KV room may have grown, or a worker came or went),
  - the request ahead of it left the queue (placed, cancelled or timed out: this one may fit too).
A request arriving while others wait joins the tail without trying, so a large request is never
passed over forever by smaller ones that fit sooner.

No bound of its own: a waiting request is still queued in admission (services.gateway.admission: queued
until its first token), so admission's budgets bound this queue and a full queue answers 429 with
Retry-After before any work is done.

Tunable: ROOM_WAIT_TIMEOUT_S (300 s), the longest a request waits for room before it fails with a
503 the client may retry (a decode pool that frees nothing for that long is stuck, not busy).

Everything runs on the event loop thread; `place` callables never await, so try-and-take is atomic.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from services.router import NoRoomNow

ROOM_WAIT_TIMEOUT_S = 300.0

T = TypeVar("T")


class RoomWaitTimeout(Exception):
    """The request waited `timeout_s` at the head of the queue or behind it, and no decode worker had room."""


class RoomQueue:
    def __init__(self) -> None:
        self._waiters: deque[asyncio.Event] = deque()  # one per waiting request; the head may try placement
        self.num_waited = 0  # requests that had to wait (for the metrics), ever

    def __len__(self) -> int:
        return len(self._waiters)

    def notify(self) -> None:
        """Room may have changed: the head tries again."""
        if self._waiters:
            self._waiters[0].set()

    async def place(self, place: Callable[[], T], timeout_s: float = ROOM_WAIT_TIMEOUT_S) -> T:
        """`place()`'s result, at once when nobody waits and it fits; else once this request's turn has come
        and it fits. Raises RoomWaitTimeout after `timeout_s`; any other exception of `place` at once."""
        if not self._waiters:
            with contextlib.suppress(NoRoomNow):
                return place()
        turn = asyncio.Event()
        self._waiters.append(turn)
        self.num_waited += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while True:
                turn.clear()
                if self._waiters[0] is turn:
                    with contextlib.suppress(NoRoomNow):
                        return place()
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise RoomWaitTimeout(f"no decode worker had room for {timeout_s:g} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(turn.wait(), remaining)
        finally:
            was_head = self._waiters[0] is turn
            self._waiters.remove(turn)
            if was_head:
                self.notify()
