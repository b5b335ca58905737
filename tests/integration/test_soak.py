"""Load: many saves against slow storage, concurrent writers, interrupts and cancellation."""

from __future__ import annotations

import dis
import os
import signal
import subprocess
import sys
import textwrap
import threading
import tracemalloc

import anyio
import psutil
import pytest
import torch
from support.helpers import WrappedStorage, folder_files

import asyncckpt
from asyncckpt import AsyncCheckpointer, Checkpointer
from asyncckpt._core.queue import SaveQueue
from asyncckpt.storage import LocalStorage

MIB = 1 << 20


def soak(folder, policy: str, saves: int) -> None:
    storage = WrappedStorage(LocalStorage(folder, fsync=False))
    storage.latency = 0.0005  # a slow device: the queue fills up and the policy matters
    state = {"w": torch.randn(64 * 1024), "b": torch.zeros(7)}  # 256 KiB
    proc = psutil.Process()
    warmup = saves // 4
    tracemalloc.start()
    try:
        with Checkpointer(storage, queue_size=2, when_full=policy, keep_last=2) as ckpt:
            for step in range(saves):
                state["b"].fill_(step)
                ckpt.save(state, step=step)
                if step == warmup:
                    ckpt.flush()
                    rss0 = proc.memory_info().rss
                    traced0 = tracemalloc.get_traced_memory()[0]
            ckpt.flush()
            rss1 = proc.memory_info().rss
            traced1 = tracemalloc.get_traced_memory()[0]
            stats = ckpt.stats
            allocations = ckpt.buffer_pool.allocations
    finally:
        tracemalloc.stop()
    assert stats.saves == saves and stats.failed == 0
    assert stats.committed + stats.skipped + stats.coalesced == saves  # nothing unaccounted
    if policy == "block":
        assert stats.committed == saves
    assert allocations <= 3  # queue_size + 1 arenas, reused ever after
    # Flat after warm-up: a leaked snapshot per save would add 256 KiB x saves to the RSS.
    assert rss1 - rss0 < 32 * MIB, f"RSS grew by {(rss1 - rss0) / MIB:.1f} MiB"
    assert traced1 - traced0 < 2 * MIB, f"Python heap grew by {(traced1 - traced0) / MIB:.1f} MiB"
    last = asyncckpt.checkpoints(folder)[-1].step
    if policy != "skip":  # "skip" drops the newest save when full; the others never do
        assert last == saves - 1
    assert asyncckpt.load(folder)["b"][0] == last


@pytest.mark.parametrize("policy", ["block", "skip", "coalesce"])
def test_soak(tmp_path, policy):
    soak(tmp_path, policy, saves=400)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 10,000 saves per policy
@pytest.mark.parametrize("policy", ["block", "skip", "coalesce"])
def test_soak_long(tmp_path, policy):
    soak(tmp_path, policy, saves=10_000)


def test_concurrent_writers_in_one_process(tmp_path):
    """Four sync writers in four threads and two async writers on one loop, each its own folder."""
    errors: list[BaseException] = []

    def sync_writer(index: int) -> None:
        try:
            with Checkpointer(tmp_path / f"sync{index}", keep_last=3, queue_size=2) as ckpt:
                for step in range(40):
                    ckpt.save({"w": torch.full((1000,), float(index * 1000 + step))}, step=step)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    async def async_writers() -> None:
        async def one(index: int) -> None:
            async with AsyncCheckpointer(tmp_path / f"async{index}", keep_last=3) as ckpt:
                for step in range(40):
                    await ckpt.save({"w": torch.full((1000,), float(step))}, step=step)

        async with anyio.create_task_group() as tg:
            for index in range(2):
                tg.start_soon(one, index)

    threads = [threading.Thread(target=sync_writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    anyio.run(async_writers)
    for t in threads:
        t.join()
    assert not errors
    for name in [f"sync{i}" for i in range(4)] + [f"async{i}" for i in range(2)]:
        listing = asyncckpt.checkpoints(tmp_path / name)
        assert [c.step for c in listing] == [37, 38, 39]
        assert asyncckpt.verify(tmp_path / name).ok


def writer_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("asyncckpt-")}


def test_keyboard_interrupt_in_the_loop_drains_and_leaks_nothing(tmp_path):
    before = set(threading.enumerate())
    with pytest.raises(KeyboardInterrupt):
        with Checkpointer(tmp_path) as ckpt:
            ckpt.save({"w": torch.randn(512, 1024)}, step=1)  # in flight when interrupted
            raise KeyboardInterrupt
    # (before reading the folder: a reader's own worker threads linger a moment after it)
    leaked = set(threading.enumerate()) - before
    for thread in leaked:  # an event loop's idle worker threads end just after the loop
        thread.join(timeout=30)
    assert not [t for t in leaked if t.is_alive()], leaked
    assert [c.step for c in asyncckpt.checkpoints(tmp_path)] == [1]
    assert folder_files(tmp_path) == {"step_1.pt"}  # no temporary file


SIGINT_CHILD = textwrap.dedent(
    """
    import signal, sys, torch, asyncckpt
    from asyncckpt.events import Committed
    # Python's own Ctrl-C handling even when started with SIGINT ignored (a shell's background
    # job inherits SIG_IGN, and Python then installs no handler): the test sends a real SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    def report(event):
        if isinstance(event, Committed):
            print(event.info.step, flush=True)
    with asyncckpt.Checkpointer(sys.argv[1], keep_last=2, observers=[report]) as ckpt:
        step = 0
        while True:
            step += 1
            ckpt.save({"w": torch.full((512, 1024), float(step)), "step": step}, step=step)
    """
)


def test_sigint_leaves_old_or_new_never_half(tmp_path):
    """A real Ctrl-C to a training process: it exits, and the folder is consistent."""
    folder = tmp_path / "run"
    with subprocess.Popen([sys.executable, "-c", SIGINT_CHILD, str(folder)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        seen = [int(child.stdout.readline()) for _ in range(3)]
        os.kill(child.pid, signal.SIGINT)
        _, err = child.communicate(timeout=120)
    assert child.returncode != 0 and "KeyboardInterrupt" in err
    listing = asyncckpt.checkpoints(folder)
    assert listing and listing[-1].step >= seen[-1]
    assert folder_files(folder) == {c.name for c in listing}  # nothing half-written, no temp file
    for info in listing:
        assert asyncckpt.load(folder, info.step)["step"] == info.step


async def test_cancelling_a_save_mid_copy_releases_its_slot(tmp_path):
    """Task cancellation while save() is copying: no slot or buffer leaks, the writer goes on."""
    big = {"w": torch.randn(2048, 1024)}
    async with AsyncCheckpointer(tmp_path, queue_size=1) as ckpt:
        for _ in range(5):
            with anyio.CancelScope() as scope:
                scope.cancel()  # cancelled at its first checkpoint: during the copy
                await ckpt.save(big, step=1)
            assert ckpt.buffer_pool.in_use == 0
        handle = await ckpt.save(big, step=2)
        assert (await handle.committed()).step == 2
    assert [c.step for c in asyncckpt.checkpoints(tmp_path)] == [2]


def _ctrl_c_on_the_loop(monkeypatch, queue, method):
    """Patch ``queue.<method>`` so that, when it runs, the training thread gets a real SIGINT:
    on the writer's loop the training thread is then blocked waiting for that very call;
    ``try_reserve`` runs on the training thread itself, which is interrupted just after it
    took the slot."""
    main = threading.main_thread().ident
    # Python's handler even when SIGINT was inherited ignored; the caller restores ``previous``
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    original = getattr(queue, method)
    fired = threading.Event()

    def interrupt() -> None:
        if not fired.is_set():
            fired.set()
            signal.pthread_kill(main, signal.SIGINT)

    if method == "wait_for_slot":
        async def patched(*args, **kwargs):
            interrupt()
            return await original(*args, **kwargs)
    elif method == "try_reserve":
        def patched(*args, **kwargs):  # type: ignore[misc]
            taken = original(*args, **kwargs)
            assert taken  # a slot was free: the interrupt lands while this save holds it
            interrupt()
            return taken
    else:
        def patched(*args, **kwargs):  # type: ignore[misc]
            interrupt()
            return original(*args, **kwargs)

    monkeypatch.setattr(queue, method, patched)
    return fired, previous


@pytest.mark.parametrize("where", ["try_reserve", "reserve_nowait", "wait_for_slot"])
def test_ctrl_c_while_save_waits_for_the_writer_loses_no_queue_slot(wrapped, monkeypatch,
                                                                     where):
    """Ctrl-C while save() holds or waits for a slot (just after taking a free one on the
    training thread; asking the loop about a full queue; waiting in it with
    when_full='block'): the slot taken, or handed out by the loop anyway, is given back."""
    state = {"w": torch.ones(1000)}
    wrapped.gate = threading.Event()
    with Checkpointer(wrapped, queue_size=1, when_full="block") as ckpt:
        queue = ckpt._engine.queue
        if where != "try_reserve":  # fill the queue: one save writing, one waiting
            ckpt.save(state, step=1)
            assert wrapped.entered.wait(timeout=60)
            ckpt.save(state, step=2)
        fired, previous = _ctrl_c_on_the_loop(monkeypatch, queue, where)
        try:
            with pytest.raises(KeyboardInterrupt):
                ckpt.save(state, step=3)
        finally:
            signal.signal(signal.SIGINT, previous)
        assert fired.is_set()
        monkeypatch.undo()
        wrapped.gate.set()
        ckpt.flush()
        assert ckpt._portal.call(lambda: queue.free_slots) == 2  # queue_size + 1: all free
        assert queue.in_flight("step_3.pt") is None
        ckpt.save(state, step=4).wait()  # and saving goes on
    assert [c.step for c in asyncckpt.checkpoints(wrapped.inner.path)][-1] == 4


_CALLS = {dis.opmap[name] for name in ("CALL", "CALL_FUNCTION_EX") if name in dis.opmap}


def _interrupt_at_signal_point(code, n: int):
    """A trace function that raises KeyboardInterrupt at the ``n``-th point, while ``code``
    runs on the calling thread, where CPython may run a pending SIGINT handler: on entering a
    Python function (``code`` itself or one it calls) and right after a call in ``code``
    returns. (Not between any two bytecodes: CPython never runs handlers there, and a
    ``with`` block's exit is not protected at those points.)"""
    count = 0
    active = False

    def tick() -> None:
        nonlocal count
        count += 1
        if count == n:
            raise KeyboardInterrupt

    def local(frame, event, arg):
        nonlocal active
        if event == "opcode":
            if frame.f_lasti > 0 and last[0] in _CALLS:
                tick()
            last[0] = frame.f_code.co_code[frame.f_lasti]
        elif event == "return":
            active = False
        return local

    last = [0]

    def calls(frame, event, arg):
        nonlocal active
        if frame.f_code is code:
            active = True
            last[0] = 0
            frame.f_trace_opcodes = True
            tick()
            return local
        if active:  # a function the reservation calls
            tick()
        return None

    return calls


@pytest.mark.timeout(120)  # a lock left held would hang the next save
def test_ctrl_c_at_any_point_of_the_in_thread_reservation_loses_no_slot(tmp_path):
    """The sync save() takes a free slot on the training thread: Ctrl-C at any point of that
    where a signal handler can run leaves the slot either untaken or given back by save()."""
    code = SaveQueue.try_reserve.__code__
    state = {"w": torch.ones(10)}
    previous = sys.gettrace()
    with Checkpointer(tmp_path, queue_size=1) as ckpt:
        queue = ckpt._engine.queue
        n = 0
        while True:
            n += 1
            sys.settrace(_interrupt_at_signal_point(code, n))
            try:
                handle = ckpt.save(state, step=n)
            except KeyboardInterrupt:
                pass
            else:
                break  # try_reserve ran to the end: every point in it was tried
            finally:
                sys.settrace(previous)
            assert ckpt._portal.call(lambda: queue.free_slots) == 2, f"interrupted at point {n}"
            assert queue.in_flight(f"step_{n}.pt") is None
        assert n > 3  # entry, and after the calls in it
        assert handle.wait().step == n
        ckpt.flush()
        assert ckpt._portal.call(lambda: queue.free_slots) == 2
    assert [c.step for c in asyncckpt.checkpoints(tmp_path)] == [n]
