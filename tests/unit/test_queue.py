"""SaveQueue slots: taken from any thread without the loop, waited for on the loop, in order."""

from __future__ import annotations

import asyncio
import threading

import anyio
import pytest

from asyncckpt._core.events import Event, Skipped
from asyncckpt._core.handle import SaveHandle
from asyncckpt._core.queue import Request, SaveQueue
from asyncckpt._errors import WriterClosedError
from asyncckpt._snapshot.pool import BufferPool
from asyncckpt._snapshot.snapshot import Snapshotter


def _request(step: int, name: str | None = None) -> Request:
    handle = SaveHandle(step, name or f"step_{step}.pt", None)
    return Request(handle, {}, 0.0, 0.0)


def _queue(size: int, when_full: str = "block") -> tuple[SaveQueue, list[Event]]:
    events: list[Event] = []
    queue = SaveQueue(size, when_full, Snapshotter(BufferPool(size + 1)),  # type: ignore[arg-type]
                      events.append, "mem://q")
    return queue, events


async def _shut(queue: SaveQueue) -> None:
    queue.close()
    await queue.drop_unwritten()
    queue.jobs().close()


def test_try_reserve_from_many_threads_hands_out_each_slot_once():
    queue, _ = _queue(size=7)  # 8 slots
    barrier = threading.Barrier(16)
    taken: list[Request] = []
    lock = threading.Lock()

    def contend(i: int) -> None:
        request = _request(i)
        barrier.wait()
        if queue.try_reserve(request):
            with lock:
                taken.append(request)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(taken) == 8 and all(r.reserved for r in taken)
    assert queue.free_slots == 0
    assert {queue.in_flight(r.name) for r in taken} == {r.step for r in taken}


def test_a_full_queue_says_so_and_skip_resolves_on_the_loop():
    async def main() -> None:
        queue, events = _queue(size=0, when_full="skip")
        queue.open()
        first, second = _request(1), _request(2)
        assert queue.try_reserve(first)
        assert not queue.try_reserve(second) and not second.reserved
        queue.reserve_nowait(second)
        assert second.handle.status == "skipped"
        assert events == [Skipped(2, "step_2.pt", "queue_full", at=events[0].at)]
        await _shut(queue)

    anyio.run(main)


def test_a_freed_slot_goes_to_the_oldest_waiter_before_any_new_save():
    async def main() -> None:
        queue, _ = _queue(size=0)
        queue.open()
        holder, waiter = _request(1), _request(2)
        assert queue.try_reserve(holder)
        got: list[Request] = []
        async with anyio.create_task_group() as tg:
            async def wait() -> None:
                got.append(await queue.wait_for_slot(waiter))

            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            queue.unreserve(holder)  # freed while one waits: it is the waiter's
            late = _request(3)
            assert not queue.try_reserve(late)  # no barging past the waiter
        assert got == [waiter] and waiter.reserved and queue.free_slots == 0
        queue.unreserve(waiter)
        assert queue.free_slots == 1 and queue.in_flight("step_2.pt") is None
        await _shut(queue)

    anyio.run(main)


def test_a_cancelled_waiter_leaves_the_line_and_the_next_one_gets_the_slot():
    async def main() -> None:
        queue, _ = _queue(size=0)
        queue.open()
        holder = _request(1)
        assert queue.try_reserve(holder)
        first, second = _request(2), _request(3)
        got: list[Request] = []
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def wait_first() -> None:
                with scope:
                    await queue.wait_for_slot(first)

            async def wait_second() -> None:
                got.append(await queue.wait_for_slot(second))

            tg.start_soon(wait_first)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(wait_second)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()  # the first waiter gives up ...
            await anyio.wait_all_tasks_blocked()
            queue.unreserve(holder)  # ... so the freed slot goes to the second
        assert not first.reserved and got == [second] and queue.free_slots == 0
        assert queue.in_flight("step_2.pt") is None
        await _shut(queue)

    anyio.run(main)


def test_a_waiter_cancelled_after_it_was_handed_a_slot_passes_it_on():
    """Native asyncio cancellation (a caller's ``wait_for``) can land after the event was set:
    the slot handed to the cancelled waiter goes to the next one."""
    async def main() -> None:
        queue, _ = _queue(size=0)
        queue.open()
        holder, first, second = _request(1), _request(2), _request(3)
        assert queue.try_reserve(holder)
        one = asyncio.create_task(queue.wait_for_slot(first))
        await anyio.wait_all_tasks_blocked()
        two = asyncio.create_task(queue.wait_for_slot(second))
        await anyio.wait_all_tasks_blocked()
        queue.unreserve(holder)  # granted to the first waiter ...
        one.cancel()  # ... cancelled before it runs again
        assert await two is second and second.reserved
        with pytest.raises(asyncio.CancelledError):
            await one
        assert not first.reserved and not queue.holds(first) and queue.free_slots == 0
        queue.unreserve(second)
        assert queue.free_slots == 1 and queue.in_flight("step_3.pt") is None
        await _shut(queue)

    asyncio.run(main())


def test_thread_reservations_racing_the_loop_never_exceed_the_slots_nor_lose_one():
    """Training threads take free slots themselves, or wait on the loop when none is free,
    while the loop gives slots back (and hands them to waiters) at the same time."""
    async def main() -> None:
        queue, _ = _queue(size=1)  # 2 slots
        queue.open()
        lock = threading.Lock()
        held = most = 0
        requests: list[Request] = []

        def train(worker: int) -> None:
            nonlocal held, most
            for i in range(150):
                request = _request(worker * 1000 + i)
                requests.append(request)
                if not queue.try_reserve(request):
                    anyio.from_thread.run(queue.reserve, request)  # full: block on the loop
                with lock:
                    held += 1
                    most = max(most, held)
                with lock:
                    held -= 1
                anyio.from_thread.run_sync(queue.unreserve, request)

        async with anyio.create_task_group() as tg:
            for worker in range(4):
                tg.start_soon(anyio.to_thread.run_sync, train, worker)
        assert len(requests) == 600 and most <= 2
        assert queue.free_slots == 2
        assert not any(queue.holds(r) or r.reserved for r in requests)
        await _shut(queue)

    anyio.run(main)


def test_try_reserve_refuses_once_closed():
    async def main() -> None:
        queue, _ = _queue(size=1)
        queue.open()
        await _shut(queue)
        with pytest.raises(WriterClosedError, match="closed during save"):
            queue.try_reserve(_request(1))
        assert queue.free_slots == 2

    anyio.run(main)
