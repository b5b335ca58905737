"""Sync front door: the async writer core driven from an ordinary training loop.

The core runs on an event loop in one background thread for the checkpointer's whole life, and
the training thread talks to it through one ``anyio.from_thread.BlockingPortal``. The snapshot
copy runs on the training thread itself (the caller waits for it anyway). A save validates its
arguments and takes a free queue slot on this thread too, so it costs only one one-way message
to the loop after the copy (enqueue), which the loop runs before any later call from the caller.
Only when the queue is full does it ask the loop, which applies ``when_full`` (skip; or wait
for a slot, in a second call, when the policy blocks or coalesces).
A pipelined snapshot copies only the unguarded part here; the guards of the rest are hooked on
this thread too, and ``wait_snapshot()`` blocks this thread without involving the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

from .._errors import WriterClosedError
from .._snapshot.copy import caller_streams
from .._snapshot.snapshot import SnapshotMode
from ..storage import Storage, storage_for
from .config import CheckpointerConfig
from .engine import EngineViews
from .engines import make_engine
from .events import CheckpointInfo, CheckpointStats, Event
from .handle import SaveHandle, SaveStatus
from .queue import Request
from .validate import snapshot_mode

__all__ = ["Checkpointer", "SyncSaveHandle"]

T = TypeVar("T")


class _PortalThread:
    """An event loop in a daemon thread, reachable through a BlockingPortal."""

    def __init__(self, name: str) -> None:
        ready: concurrent.futures.Future[BlockingPortal] = concurrent.futures.Future()
        self.loop: asyncio.AbstractEventLoop | None = None

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            async with BlockingPortal() as portal:
                ready.set_result(portal)
                await portal.sleep_until_stopped()

        def run() -> None:
            try:
                anyio.run(main, backend="asyncio")
            except BaseException as exc:  # surfaces in the constructor below
                if not ready.done():
                    ready.set_exception(exc)

        # Daemon: a checkpointer the user forgot to close must not hang interpreter exit; the
        # finalizer below drains it while the thread is still alive.
        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()
        self.portal = ready.result()

    def stop(self) -> None:
        self.portal.call(self.portal.stop)
        self.thread.join()


def _shutdown(portal_thread: _PortalThread, cm: AbstractContextManager[Any], warn: bool) -> None:
    """Close a checkpointer that was garbage-collected or left open at interpreter exit."""
    if warn:
        warnings.warn(
            "asyncckpt.Checkpointer was not closed; draining it now. Use `with Checkpointer(...)`"
            " or call close().",
            ResourceWarning,
            stacklevel=2,
        )
    try:
        cm.__exit__(None, None, None)
    finally:
        portal_thread.stop()


def _run_into(done: concurrent.futures.Future[T], func: Callable[..., T], *args: object) -> None:
    """On the loop: ``func(*args)``, its outcome into ``done``."""
    try:
        done.set_result(func(*args))
    except BaseException as exc:
        done.set_exception(exc)


def _nothing() -> None:
    """On the loop: nothing (a round trip that runs every message queued before it)."""


async def _await_into(done: concurrent.futures.Future[T], func: Callable[..., Any],
                      *args: object) -> None:
    """On the loop: ``await func(*args)``, its outcome into ``done``."""
    try:
        done.set_result(await func(*args))
    except Exception as exc:
        done.set_exception(exc)
    except BaseException as exc:  # cancelled (the portal is stopping): say so, and go on
        done.set_exception(exc)
        raise


class SyncSaveHandle:
    """The outcome of one sync ``save()``; ``wait()`` blocks until it is durable."""

    def __init__(self, portal: BlockingPortal, handle: SaveHandle) -> None:
        self._portal = portal
        self._handle = handle

    def __repr__(self) -> str:
        return f"<SyncSaveHandle {self.name!r} step={self.step} {self.status}>"

    @property
    def step(self) -> int:
        return self._handle.step

    @property
    def epoch(self) -> int | None:
        return self._handle.epoch

    @property
    def name(self) -> str:
        return self._handle.name

    @property
    def status(self) -> SaveStatus:
        return self._handle.status

    @property
    def info(self) -> CheckpointInfo | None:
        return self._handle.info

    @property
    def error(self) -> BaseException | None:
        return self._handle.error

    def done(self) -> bool:
        return self._handle.done()

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """Block until the save is resolved.

        Returns:
            The committed checkpoint, or None if it was skipped or coalesced.

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
            WriterError: the save failed or was abandoned.
        """
        return self._portal.call(self._wait_at_most, timeout)

    async def _wait_at_most(self, seconds: float | None) -> CheckpointInfo | None:
        with anyio.fail_after(seconds):
            return await self._handle.committed()


class Checkpointer(EngineViews):
    """Asynchronous checkpoint writer for ordinary (synchronous) training loops.

    ::

        with asyncckpt.Checkpointer("runs/exp1", keep_last=3, best={"loss": "less"}) as ckpt:
            for step in range(1, n + 1):
                ...
                if step % 100 == 0:
                    ckpt.save({"model": model, "optim": opt}, step=step, metrics={"loss": loss})
        # leaving the block drains the queue; writer errors are raised here

    ``save()`` returns once the state is copied; writing happens on a background event-loop
    thread. Arguments are those of :class:`AsyncCheckpointer`; the checkpointer opens (and
    resumes the folder) in the constructor.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | Storage,
        *,
        config: CheckpointerConfig | None = None,
        observers: Iterable[Callable[[Event], object]] = (),
        storage_options: Mapping[str, Any] | None = None,
        clock: Callable[[], float] | None = None,
        **options: Any,
    ) -> None:
        config = CheckpointerConfig.from_options(config, options)
        storage = storage_for(directory, storage_options=storage_options)
        extra = {} if clock is None else {"clock": clock}
        self._engine = make_engine(storage, config, observers=observers, **extra)
        self._thread = _PortalThread(name=f"asyncckpt-writer[{self._engine.uri}]")
        self._portal = self._thread.portal
        self._saving = threading.Lock()
        cm = self._portal.wrap_async_context_manager(self._engine)
        try:
            cm.__enter__()
        except BaseException:
            self._thread.stop()
            raise
        self._cm = cm
        self._engine.warn_untracked_best(stacklevel=2)
        self._finalizer = weakref.finalize(self, _shutdown, self._thread, cm, True)
        # At interpreter exit, concurrent.futures shuts its executors down (aiofiles and
        # anyio need them) before atexit handlers run; threading's own exit hooks run earlier,
        # newest first, so an unclosed checkpointer still drains with working thread pools.
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            register(self._finalizer)

    def subscribe(self, observer: Callable[[Event], object]) -> None:
        """Call ``observer(event)`` for every event (on the writer's thread)."""
        self._check_open()
        self._portal.call(self._engine.reporter.subscribe, observer)

    def save(
        self,
        state: object,
        *,
        step: int,
        epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
        name: str | None = None,
        keep: bool = False,
        supersedes: Iterable[str] = (),
        snapshot: SnapshotMode | None = None,
    ) -> SyncSaveHandle:
        """Snapshot ``state`` on this thread and queue it; see :meth:`AsyncCheckpointer.save`."""
        t0 = time.perf_counter()
        self._check_open()
        engine = self._engine
        mode = snapshot_mode(snapshot, engine.config.snapshot)
        engine.snapshots.guards.remove_stopped()
        request: Request | None = None
        try:
            with self._saving:  # validation and reservation are one step for concurrent saves
                request = engine.request(step, epoch, metrics, name, t0, keep=keep,
                                         supersedes=supersedes)
                reserved = engine.queue.try_reserve(request)  # no round trip when a slot is free
            if not reserved:  # queue full: skip, or wait (block, coalesce) on the loop
                request = self._reserve_on_loop(request)
                if not request.reserved:
                    return SyncSaveHandle(self._portal, request.handle)
            snap = engine.snapshots.take(state, mode, caller_streams())
        except BaseException:
            # Also Ctrl-C as or right after the slot was taken: give it back, never leak it.
            if request is not None and engine.queue.holds(request):
                self._portal.call(engine.queue.unreserve, request)
            raise
        # Guards first: once queued, a pipelined copy may run, and it must never run unguarded.
        engine.snapshots.guards.install(snap.pending)
        handle = SyncSaveHandle(self._portal, request.handle)
        request.stall = time.perf_counter() - t0  # what the caller waits, up to the hand-off
        # One-way: the loop runs callbacks in order, so this is queued before anything the
        # caller asks through the portal next (wait, flush, close).
        self._loop().call_soon_threadsafe(engine.queue.submit_or_cancel, request, snap)
        return handle

    def _reserve_on_loop(self, request: Request) -> Request:
        """The queue is full: let the loop apply ``when_full`` (skip, or wait for a slot)."""
        queue = self._engine.queue
        request = self._reservation(
            lambda done: self._loop().call_soon_threadsafe(
                _run_into, done, queue.reserve_nowait, request)
        )
        if request.waiting:  # block or coalesce
            request = self._reservation(
                lambda done: self._portal.start_task_soon(
                    _await_into, done, queue.wait_for_slot, request)
            )
        return request

    def _loop(self) -> asyncio.AbstractEventLoop:
        loop = self._thread.loop
        if loop is None:  # pragma: no cover - set before the portal exists
            raise RuntimeError("the writer's event loop is not running")
        return loop

    def _reservation(
        self, start: Callable[[concurrent.futures.Future[Request]], object]
    ) -> Request:
        """Start a reservation on the loop with ``start(done)`` and wait for ``done``.

        If the caller is interrupted meanwhile (Ctrl-C while the queue is full), the slot
        the loop hands out anyway is given back as soon as it does, instead of being lost.
        The future exists before the loop is asked, so no interruption point escapes that.
        """
        done: concurrent.futures.Future[Request] = concurrent.futures.Future()
        try:
            start(done)
            return done.result()
        except BaseException:
            done.add_done_callback(self._give_back)
            raise

    def _give_back(self, done: concurrent.futures.Future[Request]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        request = done.result()
        if request.reserved:
            try:
                self._loop().call_soon_threadsafe(self._engine.queue.unreserve, request)
            except RuntimeError:  # the loop is closed: the checkpointer is gone with its slots
                pass

    def wait_snapshot(self) -> None:
        """Block until every pipelined snapshot is completely copied.

        Call it before changing in place, other than through the optimizer's ``step()``, a
        tensor that an optimizer in a pipelined ``save()``'s state updates (see
        :meth:`AsyncCheckpointer.wait_snapshot`). It waits on this thread, not on the writer.
        """
        self._engine.snapshots.guards.wait()

    def flush(self) -> None:
        """Block until every queued save is resolved; raise any writer failure."""
        self._check_open()
        try:
            self._portal.call(self._engine.flush)
        finally:
            self._engine.snapshots.guards.remove_stopped()

    def remove(self, names: Iterable[str]) -> None:
        """Drop checkpoints from the index and delete their files; see
        :meth:`AsyncCheckpointer.remove` (this blocks until queued saves are resolved)."""
        self._check_open()
        try:
            self._portal.call(self._engine.remove, names)
        finally:
            self._engine.snapshots.guards.remove_stopped()

    def close(self) -> None:
        """Drain the queue, release the folder and the writer thread; raise writer failures."""
        self._exit(None, None, None)

    @property
    def stats(self) -> CheckpointStats:
        """Counters and timings so far (see :class:`~asyncckpt.events.CheckpointStats`); every
        ``save()`` that returned on this thread is counted."""
        # A save's last message to the loop is one-way: one round trip through the portal runs
        # it (the loop runs callbacks in order) before the counters are read. Not from the
        # loop's own thread (an observer reading stats), where the message already ran.
        if not self.closed and threading.current_thread() is not self._thread.thread:
            try:
                self._portal.call(_nothing)
            except RuntimeError:  # closed meanwhile: every message ran before the loop stopped
                pass
        return self._engine.reporter.snapshot()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _check_open(self) -> None:
        if self.closed:
            raise WriterClosedError(f"the checkpointer for {self.uri} is closed")

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit(exc_type, exc, tb)

    def _exit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._finalizer.detach():
            return  # already closed
        try:
            self._cm.__exit__(exc_type, exc, tb)
        finally:
            self._thread.stop()

    def __repr__(self) -> str:
        return f"<Checkpointer {self.uri!r}{' closed' if self.closed else ''}>"
