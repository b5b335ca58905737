"""SaveQueue slots: taken from any thread without the loop, waited for on the loop, in order."""

from __future__ import annotations

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


def test_try_reserve_refuses_once_closed():
    async def main() -> None:
        queue, _ = _queue(size=1)
        queue.open()
        await _shut(queue)
        with pytest.raises(WriterClosedError, match="closed during save"):
            queue.try_reserve(_request(1))
        assert queue.free_slots == 2

    anyio.run(main)
