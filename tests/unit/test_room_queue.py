"""The gateway's queue for decode KV room: strict FIFO, woken by worker state, bounded wait, clean leaving."""

import asyncio

import pytest

from services.gateway.room_queue import RoomQueue, RoomWaitTimeout
from services.router import NoRoomNow


class Room:
    """A decode pool with `free` blocks: place(need) takes them or raises NoRoomNow, as the router does."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.placed: list[str] = []

    def placer(self, name: str, need: int):
        def place() -> str:
            if self.free < need:
                raise NoRoomNow(f"{need} blocks")
            self.free -= need
            self.placed.append(name)
            return name

        return place


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_request_that_fits_is_placed_at_once():
    async def main():
        queue, room = RoomQueue(), Room(free=10)
        assert await queue.place(room.placer("a", 4)) == "a"
        assert (len(queue), queue.num_waited, room.free) == (0, 0, 6)

    asyncio.run(main())


def test_waiters_are_placed_in_arrival_order_when_room_is_reported():
    async def main():
        queue, room = RoomQueue(), Room(free=0)
        big = asyncio.create_task(queue.place(room.placer("big", 8)))
        await settle()
        small = asyncio.create_task(queue.place(room.placer("small", 1)))  # joins behind, does not try
        await settle()
        room.free = 4
        queue.notify()  # room for small, not for big: small still waits its turn
        await settle()
        assert room.placed == [] and len(queue) == 2
        room.free = 9
        queue.notify()  # big fits; its leaving wakes small, which fits too
        assert await big == "big" and await small == "small"
        assert room.placed == ["big", "small"] and (len(queue), queue.num_waited, room.free) == (0, 2, 0)

    asyncio.run(main())


def test_a_newcomer_waits_behind_the_queue_even_when_it_would_fit():
    async def main():
        queue, room = RoomQueue(), Room(free=2)
        big = asyncio.create_task(queue.place(room.placer("big", 8)))
        await settle()
        newcomer = asyncio.create_task(queue.place(room.placer("newcomer", 1)))
        await settle()
        assert room.placed == [] and len(queue) == 2
        room.free = 9
        queue.notify()
        assert (await big, await newcomer) == ("big", "newcomer")

    asyncio.run(main())


def test_a_cancelled_head_leaves_and_wakes_the_next():
    async def main():
        queue, room = RoomQueue(), Room(free=2)
        head = asyncio.create_task(queue.place(room.placer("head", 8)))
        await settle()
        second = asyncio.create_task(queue.place(room.placer("second", 2)))
        await settle()
        head.cancel()  # the client went away
        assert await second == "second"
        with pytest.raises(asyncio.CancelledError):
            await head
        assert len(queue) == 0 and room.placed == ["second"]

    asyncio.run(main())


def test_a_wait_past_the_timeout_fails_and_frees_its_place():
    async def main():
        queue, room = RoomQueue(), Room(free=0)
        with pytest.raises(RoomWaitTimeout):
            await queue.place(room.placer("a", 1), timeout_s=0.05)
        assert len(queue) == 0
        room.free = 1
        assert await queue.place(room.placer("b", 1)) == "b"

    asyncio.run(main())


def test_other_placement_errors_pass_through_and_leave_the_queue():
    async def main():
        queue = RoomQueue()

        def broken() -> str:
            raise ValueError("no KV address")

        with pytest.raises(ValueError):
            await queue.place(broken)
        assert len(queue) == 0

    asyncio.run(main())
