"""The bounded save queue: slots, the ``when_full`` policies, and the jobs the writer takes.

::

    reserve ─ a free slot? ──yes──▶ reserved ─ (the front door takes the snapshot) ─ submit ─┐
               │ no                  ▲                                                       │
               ├ skip: resolved "skipped"                                                     │
               ├ block: wait for a slot                                         jobs() ◀──────┘
               └ coalesce: drop the oldest waiting job ("coalesced"), take its slot     │
                                                                                writer: release
                                                                                 (slot, arena)
                                                                                 then finish

There are ``queue_size + 1`` slots: the snapshots waiting plus the one being written. A slot is
given back when its snapshot's bytes are durable (or it is dropped), and its arena with it.
:meth:`SaveQueue.try_reserve` and :meth:`SaveQueue.in_flight` may be called from any thread (the
sync front door takes a free slot on the training thread, without a round trip to the loop);
every other method runs on the writer's event loop. The queue knows which requests hold a slot
(taken, under a lock, by storing the request itself: one step that a KeyboardInterrupt on the
training thread either precedes or follows, so :meth:`SaveQueue.unreserve` always knows whether
there is a slot to give back). A save that waits for a slot (``block``, ``coalesce``) waits on
the loop, first come first served: a freed slot goes to the oldest waiter before anyone may
take it without waiting.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .._errors import WriterClosedError
from .._snapshot.snapshot import Snapshot, Snapshotter
from .config import WhenFull
from .events import Event, Skipped, SnapshotTaken
from .handle import SaveHandle

__all__ = ["Job", "Request", "SaveQueue"]


@dataclass(eq=False)
class Request:
    """A save that passed validation and may hold a queue slot."""

    handle: SaveHandle
    metrics: dict[str, float]
    wall: float
    t0: float
    keep: bool = False
    supersedes: tuple[str, ...] = ()
    reserved: bool = False
    stall: float | None = None  # set by a caller that measured it on its own thread

    @property
    def step(self) -> int:
        return self.handle.step

    @property
    def name(self) -> str:
        return self.handle.name

    @property
    def waiting(self) -> bool:
        """Neither reserved nor resolved: the caller must go on to ``wait_for_slot``."""
        return not self.reserved and not self.handle.done()


@dataclass(eq=False)
class Job:
    """A taken snapshot in the queue, and the request it answers."""

    request: Request
    snapshot: Snapshot
    released: bool = field(default=False)


@dataclass(eq=False)
class _Waiter:
    """A save waiting on the loop for a slot; ``granted`` once a freed slot was handed to it."""

    request: Request
    event: anyio.Event
    granted: bool = False


class SaveQueue:
    """The bounded queue between the front doors and the writer task.

    Args:
        size: ``queue_size`` (snapshots that may wait while one is written).
        when_full: the policy when every slot is taken.
        snapshots: gives arenas back and stops the copies of dropped jobs.
        emit: where ``SnapshotTaken`` / ``Skipped`` events go.
        uri: the folder, for error messages.
    """

    def __init__(
        self,
        size: int,
        when_full: WhenFull,
        snapshots: Snapshotter,
        emit: Callable[[Event], None],
        uri: str,
    ) -> None:
        self._slots_total = size + 1
        self._lock = threading.Lock()  # guards _holders, _waiters and _flying
        # requests holding a slot (from reservation to release), and those in flight (from
        # reservation until they leave the queue: a name stays taken until its commit)
        self._holders: dict[Request, None] = {}
        self._flying: dict[Request, None] = {}
        self._waiters: deque[_Waiter] = deque()
        self._when_full = when_full
        self._snapshots = snapshots
        self._emit = emit
        self._uri = uri
        self._closed = False
        self._unfinished = 0
        # Created in open(): anyio primitives belong to the event loop that runs the writer.
        self._idle: anyio.Event
        self._send: MemoryObjectSendStream[Job]
        self._recv: MemoryObjectReceiveStream[Job]
        self._evict: MemoryObjectReceiveStream[Job]

    def open(self) -> None:
        """Create the stream (on the writer's loop)."""
        self._idle = anyio.Event()
        self._idle.set()
        self._send, self._recv = anyio.create_memory_object_stream[Job](self._slots_total)
        self._evict = self._recv.clone()

    @property
    def free_slots(self) -> int:
        return self._slots_total - len(self._holders)

    def in_flight(self, name: str) -> int | None:
        """The step of a queued or running save named ``name``, if there is one (any thread)."""
        with self._lock:  # (at most a few requests: the slots, and the one being committed)
            for request in self._flying:
                if request.name == name:
                    return request.step
        return None

    def holds(self, request: Request) -> bool:
        """Whether ``request`` holds a slot or a name (any thread): it needs :meth:`unreserve`
        if its save stops before :meth:`submit`."""
        return request in self._holders or request in self._flying

    # -- the front doors' side -------------------------------------------------------------------
    async def reserve(self, request: Request) -> Request:
        """Take a slot for ``request`` according to ``when_full`` (may wait)."""
        self.reserve_nowait(request)
        if request.waiting:
            await self.wait_for_slot(request)
        return request

    def try_reserve(self, request: Request) -> bool:
        """Take a free slot for ``request`` if one is free and nobody waits for one (any thread).

        Returns whether ``request`` now holds a slot. A caller interrupted in or right after
        this call asks :meth:`holds` whether it must :meth:`unreserve`. False: the caller goes
        on to :meth:`reserve_nowait` on the loop, which applies ``when_full``.

        Raises:
            WriterClosedError: the queue is closed.
        """
        with self._lock:
            if self._closed:
                raise WriterClosedError(f"the checkpointer for {self._uri} closed during save()")
            if len(self._holders) == self._slots_total or self._waiters:
                return False
            self._holders[request] = None  # the slot is taken by this one store
            self._flying[request] = None
            request.reserved = True
            return True

    def reserve_nowait(self, request: Request) -> Request:
        """Take a free slot, or skip; never waits. The request comes back unreserved and
        unresolved (``request.waiting``) when the caller must go on to :meth:`wait_for_slot`
        (block, or coalesce: evicting may have to wait for a copy to stop)."""
        if self.try_reserve(request):
            return request
        if self._when_full == "skip":
            request.handle.resolve("skipped")
            self._emit(Skipped(request.step, request.name, "queue_full"))
        return request

    async def wait_for_slot(self, request: Request) -> Request:
        """Every slot is taken and the policy blocks or coalesces (then the oldest waiting
        snapshot is dropped, if one is waiting)."""
        if self._when_full == "coalesce" and await self._evict_oldest(request):
            return self._reserved(request)  # _evict_oldest took the slot it freed
        # block; or coalesce while every slot is held by a snapshot still being taken
        # (concurrent saves from several tasks), so nothing waits to be replaced
        await self._acquire(request)
        return self._reserved(request)

    def unreserve(self, request: Request) -> None:
        """Give back the slot and name of a save that stopped before :meth:`submit` (on the
        loop); nothing if it holds neither."""
        with self._lock:
            request.reserved = False
            self._flying.pop(request, None)
        self._give(request)

    def submit(self, request: Request, snapshot: Snapshot) -> SaveHandle:
        """Queue a taken snapshot and start its background copy, if it has one."""
        job = Job(request, snapshot)
        if self._closed:
            self.release(job)
            raise WriterClosedError(f"the checkpointer for {self._uri} closed during save()")
        self._snapshots.start(snapshot)
        if self._unfinished == 0:
            self._idle = anyio.Event()
        self._unfinished += 1
        self._send.send_nowait(job)  # never full: the stream holds as many items as slots
        stall = request.stall if request.stall is not None else time.perf_counter() - request.t0
        self._emit(SnapshotTaken(request.step, request.name, snapshot.nbytes, stall))
        return request.handle

    def submit_or_cancel(self, request: Request, snapshot: Snapshot) -> None:
        """:meth:`submit` for a caller that does not wait for it: a queue that closed
        meanwhile resolves the handle as cancelled instead of raising."""
        try:
            self.submit(request, snapshot)
        except WriterClosedError:
            with self._lock:
                self._flying.pop(request, None)
            request.handle.resolve("cancelled")

    async def wait_idle(self) -> None:
        """Return once every submitted job has finished."""
        while self._unfinished:
            await self._idle.wait()

    # -- the writer's side -----------------------------------------------------------------------
    def jobs(self) -> MemoryObjectReceiveStream[Job]:
        """The stream the writer task takes jobs from, oldest first (it ends at close)."""
        return self._recv

    def release(self, job: Job) -> None:
        """Give back a job's arena and slot: its bytes are durable, or it is dropped."""
        if not job.released:
            job.released = True
            job.snapshot = self._snapshots.release(job.snapshot)
            self._give(job.request)

    def finish(self, job: Job) -> None:
        """Bookkeeping when a job leaves the writer, whatever its outcome."""
        self.release(job)
        with self._lock:
            self._flying.pop(job.request, None)
        job.request.handle.resolve("cancelled")  # no-op unless still pending
        self._unfinished -= 1
        if self._unfinished == 0:
            self._idle.set()

    # -- closing ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Accept no more jobs; the writer's stream ends after those queued."""
        self._closed = True
        self._send.close()

    async def drop_unwritten(self) -> None:
        """At close: finish the jobs that never reached the writer (abandoned)."""
        with anyio.CancelScope(shield=True):
            while True:
                try:
                    job = self._evict.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                    break
                await self._snapshots.stop(job.snapshot)
                self.finish(job)
            self._evict.close()

    # -- internals -------------------------------------------------------------------------------
    def _acquire_nowait(self, request: Request) -> bool:
        """Take a free slot for ``request`` unless there is none or someone waits for one."""
        with self._lock:
            if len(self._holders) == self._slots_total or self._waiters:
                return False
            self._holders[request] = None
            return True

    async def _acquire(self, request: Request) -> None:
        """Wait for a slot for ``request``, after every save that waited before (on the loop)."""
        waiter = _Waiter(request, anyio.Event())
        with self._lock:
            if len(self._holders) < self._slots_total and not self._waiters:
                self._holders[request] = None
                return
            self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            with self._lock:
                granted = waiter.granted
                if not granted:
                    self._waiters.remove(waiter)
            if granted:  # handed a slot just as it was cancelled: pass it on
                self._give(request)
            raise

    def _give(self, holder: Request) -> None:
        """Free ``holder``'s slot, if it has one: to the oldest waiter if there is one."""
        with self._lock:
            if holder not in self._holders:
                return
            del self._holders[holder]
            if not self._waiters:
                return
            waiter = self._waiters.popleft()
            waiter.granted = True
            self._holders[waiter.request] = None
        waiter.event.set()

    def _reserved(self, request: Request) -> Request:
        """Mark ``request``, which holds the slot its caller just took, as in flight."""
        with self._lock:
            if not self._closed:
                self._flying[request] = None
                request.reserved = True
                return request
        self._give(request)
        raise WriterClosedError(f"the checkpointer for {self._uri} closed during save()")

    async def _evict_oldest(self, request: Request) -> bool:
        """Coalesce: drop the oldest waiting snapshot to make room for ``request``."""
        try:
            job = self._evict.receive_nowait()
        except anyio.WouldBlock:
            return False
        job.request.handle.resolve("coalesced")
        self._emit(Skipped(job.request.step, job.request.name, "coalesced"))
        await self._snapshots.stop(job.snapshot)  # its arena is reused next: nothing may write it
        self.finish(job)
        # the slot the evicted job just gave back, unless a save that waited before was
        # handed it first
        if not self._acquire_nowait(request):
            await self._acquire(request)
        return True
