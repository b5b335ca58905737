"""Writer core: bounded queue, background writer task, commit, rotation, best/latest pointers.

::

    save()   validate ─ reserve a slot ─────────── snapshot into a pooled ─ enqueue ─ return handle
                        block | skip | coalesce     arena (worker thread,    │ pipelined: start the
                        (queue_size + 1 slots)      or the sync caller's)    │ background copy and
                                                                             │ hook its guards
                                                                              │ anyio memory stream
    writer   ┌────────────────────────────────────────────────────────────────┘
    task     ├ pipelined: wait until the background copy completed (a worker thread waits)
             ├ serialize in a worker thread ──chunks──▶ storage.write (tmp, fsync, rename, fsync)
             │ (─▶ encrypt, same thread, if encryption) (retried on TransientStorageError)
             ├ release slot + arena
             ├ commit [shielded]: publish the index (entry, latest, best, rotation), then
             │                    last_checkpoint; resolve the handle
             ├ emit Written / Committed / BestUpdated / Rotated
             └ delete what the published index no longer names (failures: retried next time)

A failure anywhere in a job fails that job only: the error is raised once in the caller, by the
save's handle if the caller waits on it, otherwise at the next ``save()`` / ``flush()`` /
``close()``; the writer goes on with the next job (a full disk that is cleared lets saving
resume). Nothing a published index names is ever deleted or overwritten in place: re-saving a
listed name first publishes an index without it.
"""

from __future__ import annotations

import logging
import operator
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Literal, TypeVar, get_args

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._config import BestMetric, CheckpointerConfig, SnapshotMode
from ._errors import (
    CheckpointError,
    StorageError,
    TransientStorageError,
    WriterClosedError,
    WriterError,
)
from ._events import (
    BestUpdated,
    CheckpointInfo,
    CheckpointStats,
    Committed,
    DeleteFailed,
    Event,
    Failed,
    Rotated,
    Skipped,
    SnapshotTaken,
    StatsCollector,
    Written,
)
from ._index import IndexEntry, IndexState
from ._jobthread import JobThread
from ._naming import INDEX_NAME, LAST_CHECKPOINT_NAME, validate_name
from ._pipelined import CopyMonitor, PendingCopy, ProbeEvent
from ._pool import BufferPool
from ._retention import Retention
from ._serialize import Hasher, serialize
from ._snapshot import CudaCopier, Snapshot, caller_streams, plan_snapshot, take_snapshot
from .storage import BlockingWrite, Storage, storage_for
from .storage._base import hold_for_writer

__all__ = ["AsyncCheckpointer", "SaveHandle", "SaveStatus"]

logger = logging.getLogger("asyncckpt")

SaveStatus = Literal["pending", "committed", "skipped", "coalesced", "failed", "cancelled"]
Observer = Callable[[Event], object]
T = TypeVar("T")

_CHANNEL_DEPTH = 8  # chunks in flight between the serializer thread and storage.write
_END = object()  # the serializer finished; anything else ending the stream is an abort


class _JobCancelled(Exception):
    """The blocking job stopped because its task was cancelled (the cancellation is raised)."""


class _ProducerStopped(Exception):
    """The serializer stopped before the end of the stream (its own error is raised instead)."""


class SaveHandle:
    """The outcome of one ``save()``.

    Attributes:
        step: the step given to ``save()``.
        epoch: the epoch given to ``save()``.
        name: the checkpoint's file name.
        status: ``"pending"`` until it is resolved as ``"committed"``, ``"skipped"`` (queue full),
            ``"coalesced"`` (replaced by a newer save while waiting), ``"failed"`` or
            ``"cancelled"`` (abandoned at close).
        info: the committed checkpoint, once committed.
        error: the exception, once failed.
    """

    def __init__(
        self,
        step: int,
        name: str,
        epoch: int | None,
        on_raised: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.step = step
        self.name = name
        self.epoch = epoch
        self.status: SaveStatus = "pending"
        self.info: CheckpointInfo | None = None
        self.error: BaseException | None = None
        self._done = anyio.Event()
        self._on_raised = on_raised

    def __repr__(self) -> str:
        return f"<SaveHandle {self.name!r} step={self.step} {self.status}>"

    def done(self) -> bool:
        """Whether the save is resolved (committed, skipped, coalesced, failed or cancelled)."""
        return self.status != "pending"

    async def committed(self) -> CheckpointInfo | None:
        """Wait until this save is resolved.

        When it returns, the index lists the checkpoint and ``last_checkpoint`` names it; files
        that rotation dropped may still be being deleted (``flush()`` waits for that too).

        Returns:
            The committed checkpoint, or None if the save was skipped or coalesced.

        Raises:
            WriterError: the save failed or was abandoned at close (``__cause__``: the error).
                A failure raised here counts as reported: the checkpointer does not raise it
                again at the next ``save()`` / ``flush()`` / ``close()``.
        """
        await self._done.wait()
        if self.status == "failed":
            if self._on_raised is not None and self.error is not None:
                self._on_raised(self.error)
            raise WriterError(
                f"saving {self.name!r} (step {self.step}) failed: {self.error!r}",
                (self.error,) if self.error else (),
            ) from self.error
        if self.status == "cancelled":
            raise WriterError(
                f"saving {self.name!r} (step {self.step}) was abandoned when the checkpointer "
                "closed"
            )
        return self.info

    def _resolve(self, status: SaveStatus, *, info: CheckpointInfo | None = None,
                 error: BaseException | None = None) -> None:
        if self.status != "pending":
            return
        self.status, self.info, self.error = status, info, error
        self._done.set()


@dataclass(eq=False)
class _Request:
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


@dataclass(eq=False)
class _Job:
    request: _Request
    snapshot: Snapshot
    released: bool = field(default=False)


def _as_count(value: object, what: str) -> int:
    """An int >= 0 (Python, numpy or 0-dim tensor integers are accepted; bools are not)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got a bool")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        kind = type(value).__name__
        raise TypeError(f"{what} must be an int, got {kind} {value!r:.40}") from None
    if number < 0:
        raise ValueError(f"{what} must be >= 0, got {number}")
    return number


def _as_metrics(metrics: object) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        kind = type(metrics).__name__
        raise TypeError(f"metrics must be a mapping of name to number, got {kind}")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metrics keys must be non-empty str, got {key!r}")
        raw = value
        if hasattr(value, "item") and callable(value.item):  # 0-dim tensors, numpy scalars
            try:
                value = value.item()
            except (RuntimeError, ValueError):
                raise TypeError(
                    f"metrics[{key!r}] must be a number; got a tensor/array with "
                    f"{getattr(raw, 'numel', lambda: '?')()} elements"
                ) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"metrics[{key!r}] must be a real number, got {type(raw).__name__}")
        try:
            out[key] = float(value)
        except OverflowError:  # an int beyond float range
            raise ValueError(f"metrics[{key!r}] is too large for a float") from None
    return out


async def _retrying(
    action: Callable[[], Awaitable[T]], *, retries: int, backoff: float, what: str
) -> T:
    """Run ``action``; retry TransientStorageError with exponential backoff and jitter."""
    attempt = 0
    while True:
        try:
            return await action()
        except TransientStorageError as exc:
            if attempt >= retries:
                raise
            attempt += 1
            delay = backoff * 2 ** (attempt - 1) * (0.5 + random.random())
            logger.warning("%s failed (%s); retry %d/%d in %.2fs", what, exc, attempt, retries,
                           delay)
            await anyio.sleep(delay)


class AsyncCheckpointer:
    """Asynchronous checkpoint writer for async training loops.

    ``save()`` returns as soon as the snapshot is taken; a background task serializes it in
    torch.save format, writes it durably and atomically, updates the index (latest, best, rotation)
    and deletes what rotation dropped::

        async with AsyncCheckpointer("runs/exp1", keep_last=3, best={"acc": "greater"}) as ckpt:
            for step in range(1, n + 1):
                ...
                handle = await ckpt.save(state, step=step, metrics={"acc": acc})
            # leaving the block drains the queue; writer errors are raised here

    Use it as an async context manager (or ``await open()`` / ``await aclose()`` from the same
    task). Opening a folder that holds an index resumes it. See :class:`CheckpointerConfig` for
    the options (``keep_last=``, ``best=``, ``queue_size=``, ``when_full=``, ...).

    Args:
        directory: local folder (created if missing), ``file://`` URI, or a
            :class:`~asyncckpt.storage.Storage` instance.
        config: a :class:`CheckpointerConfig` (alternatively pass its fields as keywords).
        observers: callables receiving every :class:`~asyncckpt.events.Event`.
        storage_options: backend options, see :func:`asyncckpt.storage.storage_for`.
        clock: wall clock for entry times and retention windows (tests replay time with it).
        **options: fields of :class:`CheckpointerConfig`.

    Raises:
        TypeError, ValueError: an option is invalid.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | Storage,
        *,
        config: CheckpointerConfig | None = None,
        observers: Iterable[Observer] = (),
        storage_options: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        **options: Any,
    ) -> None:
        self.config = CheckpointerConfig.from_options(config, options)
        self._storage = storage_for(directory, storage_options=storage_options)
        self._template = self.config.template
        self._retention = Retention(
            self.config.keep_last, self.config.keep_every_n_minutes, self.config.keep_period
        )
        self._best: tuple[BestMetric, ...] = self.config.best
        self._extra_types = frozenset(cls for cls, _ in self.config.extra_types)
        self._reducers = {cls: fn for cls, fn in self.config.extra_types if fn is not None}
        self._observers: list[Observer] = []
        for observer in observers:
            self.subscribe(observer)
        if not callable(clock):
            raise TypeError("clock must be a callable returning seconds")
        self._clock = clock
        self._stats = StatsCollector()
        self._index = IndexState()
        self._published = self._index
        self._pool = BufferPool(self.config.queue_size + 1)
        self._copier = CudaCopier()
        self._copy_thread: ThreadPoolExecutor | None = None  # runs pipelined copies; in open()
        # Pipelined copies whose guard hooks may still be installed. Only touched on the thread
        # that calls save()/wait_snapshot()/flush()/close() -- never from the copy thread, which
        # could otherwise remove a hook while torch iterates the hooks inside step().
        self._guarded: list[PendingCopy] = []
        #: test seam: called by pipelined copies, see ``_pipelined.ProbeEvent``
        self._probe: Callable[[ProbeEvent, int], None] | None = None
        self._jobs = JobThread(self.config.writer_nice)
        self._errors: list[tuple[str, BaseException]] = []
        self._lifecycle: Literal["new", "open", "closing", "closed"] = "new"
        self._names: dict[str, list[int]] = {}  # in-flight name -> [step, count]
        self._unfinished = 0
        # Created in open(): anyio primitives belong to the event loop that runs the writer.
        self._slots: anyio.Semaphore
        self._idle: anyio.Event
        self._send: MemoryObjectSendStream[_Job]
        self._recv: MemoryObjectReceiveStream[_Job]
        self._evict: MemoryObjectReceiveStream[_Job]
        self._tg: TaskGroup

    # -- public API ------------------------------------------------------------------------------
    @property
    def storage(self) -> Storage:
        """The backend this writer writes to."""
        return self._storage

    @property
    def uri(self) -> str:
        """The folder path / URI checkpoints go to."""
        return self._storage.uri

    @property
    def stats(self) -> CheckpointStats:
        """Counters and timings so far (see :class:`~asyncckpt.events.CheckpointStats`)."""
        return self._stats.snapshot()

    @property
    def buffer_pool(self) -> BufferPool:
        """The pool of host buffers snapshots are copied into."""
        return self._pool

    def subscribe(self, observer: Observer) -> None:
        """Call ``observer(event)`` for every event from now on (on the writer's loop thread)."""
        if not callable(observer):
            raise TypeError(f"an observer must be callable, got {type(observer).__name__}")
        self._observers.append(observer)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        return [self._info(e) for e in self._index.entries]

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint, or None."""
        entry = self._index.latest
        return None if entry is None else self._info(entry)

    def best(self, metric: str) -> CheckpointInfo | None:
        """The checkpoint with the best value of ``metric`` so far, or None before the first.

        Raises:
            ValueError: ``metric`` has no best pointer (it was not passed as ``best=``).
        """
        if metric not in {m.name for m in self._best}:
            tracked = ", ".join(repr(m.name) for m in self._best) or "none"
            raise ValueError(f"no best pointer for {metric!r}; tracked metrics: {tracked}")
        record = self._index.best.get(metric)
        if record is None:
            return None
        entry = self._index.get(record.name)
        return None if entry is None else self._info(entry)

    async def __aenter__(self) -> AsyncCheckpointer:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self._close(abandon=False)
            return
        abandon = self.config.on_exception == "abandon" or isinstance(
            exc, anyio.get_cancelled_exc_class()
        )
        try:
            await self._close(abandon=abandon)
        except CheckpointError as err:
            # The body's exception wins; the writer's failure is logged and attached to it.
            logger.error("checkpoint writer failed while closing after an error: %s", err)
            if hasattr(exc, "add_note"):
                exc.add_note(f"asyncckpt: while closing, the writer also failed: {err}")

    async def open(self) -> None:
        """Open the folder: read (resume) its index, clean leftovers, start the writer task.

        Raises:
            CorruptIndexError: the folder's index cannot be read; nothing is overwritten.
            ValueError: the index tracks a best metric with the opposite rule.
            StorageError: the folder cannot be created or read.
        """
        if self._lifecycle != "new":
            raise CheckpointError(f"{self!r} was already opened; create a new checkpointer")
        self._lifecycle = "open"
        try:
            await self._storage.open(writer=True)
            hold_for_writer(self._storage, True)
            index = await self._read_index()
            if index is None:  # a new folder: make it recognizable (and listable) at once
                index = IndexState()
                await self._publish(index)
            self._published = index
            self._index = index.with_best_metrics(self._best, source=self._index_uri)
            leftovers = await self._storage.cleanup_temporaries()
            if leftovers:
                logger.info("removed %d temporary leftovers in %s", len(leftovers), self.uri)
            await self._delete_pending()
            size = self.config.queue_size + 1
            self._slots = anyio.Semaphore(size)
            self._idle = anyio.Event()
            self._idle.set()
            self._send, self._recv = anyio.create_memory_object_stream[_Job](size)
            self._evict = self._recv.clone()
            self._copy_thread = ThreadPoolExecutor(1, thread_name_prefix="asyncckpt-copy")
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
        except BaseException:
            self._lifecycle = "closed"
            hold_for_writer(self._storage, False)
            with anyio.CancelScope(shield=True):
                await self._storage.aclose()
            raise
        self._tg.start_soon(self._writer_loop)

    async def save(
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
    ) -> SaveHandle:
        """Snapshot ``state`` and queue it; return once the snapshot is taken.

        Args:
            state: nested dict/list/tuple of tensors (any device), numpy arrays, Python scalars,
                str/bytes/None, and objects with ``state_dict()`` (modules, optimizers,
                schedulers), which are snapshotted through it.
            step: the training step (int >= 0); names the file through the template.
            epoch: the epoch, if the template or the caller wants it recorded.
            metrics: numbers recorded with the checkpoint; best pointers read them.
            name: file name to use instead of the template's.
            keep: exempt this checkpoint from retention (it stays until superseded).
            supersedes: names of checkpoints this one replaces: once it commits they are dropped
                from the index in the same update and their files deleted (nothing happens if this
                save is skipped, coalesced or fails). A name the index does not list is deleted
                too, e.g. a file another tool wrote into the folder.
            snapshot: ``"eager"`` or ``"pipelined"`` for this save (default: the
                ``snapshot`` option). Pipelined: the tensors an optimizer in ``state`` updates
                are copied in the background, and that optimizer's next ``step()`` waits for
                them; change them in place any other way only after :meth:`wait_snapshot`.

        Returns:
            A :class:`SaveHandle`; ``await handle.committed()`` waits for durability.

        Raises:
            WriterError: an earlier background save failed (raised once).
            WriterClosedError: the checkpointer is closed.
            TypeError: ``state`` holds something that cannot be checkpointed (the message
                names its path), or an argument has the wrong type.
            ValueError: an argument is invalid, or the name collides with another step's.
        """
        t0 = time.perf_counter()
        mode = self._snapshot_mode(snapshot)
        self._unhook()
        request = await self._reserve(
            step, epoch, metrics, name, t0, keep=keep, supersedes=supersedes
        )
        if not request.reserved:
            return request.handle
        streams = caller_streams()  # this thread's CUDA streams, not the worker's
        try:
            snap = await anyio.to_thread.run_sync(self._take_snapshot, state, mode, streams)
        except BaseException:
            self._unreserve(request)
            raise
        handle = self._submit(request, snap)
        self._hook(snap)
        return handle

    async def wait_snapshot(self) -> None:
        """Wait until every pipelined snapshot is completely copied.

        Needed only before changing in place, other than through the optimizer's ``step()``,
        a tensor that an optimizer in a pipelined ``save()``'s state updates (its parameters or
        its state) -- e.g. a manual ``p.data.mul_()``, or loading weights into the model --
        before that optimizer's next ``step()``. Errors of the copy are not raised here but like
        writer errors (the save's handle, the next ``save()`` / ``flush()`` / ``close()``).
        """
        for pending in list(self._guarded):
            await pending.wait_all_async()
        self._unhook()

    async def flush(self) -> None:
        """Wait until every queued save is resolved, then raise any writer failure.

        Raises:
            WriterError: a background save failed.
            WriterClosedError: the checkpointer is closed.
        """
        self._check_open()
        while self._unfinished:
            await self._idle.wait()
        self._unhook()
        self._raise_pending()

    async def aclose(self) -> None:
        """Drain the queue, finish pending deletions, release the folder; raise writer failures."""
        await self._close(abandon=False)

    # -- the save path, shared with the sync front door ------------------------------------------
    def _check_open(self) -> None:
        if self._lifecycle != "open":
            state = "not open yet" if self._lifecycle == "new" else "closed"
            raise WriterClosedError(f"the checkpointer for {self.uri} is {state}")

    async def _reserve(
        self,
        step: object,
        epoch: object,
        metrics: object,
        name: object,
        t0: float,
        *,
        keep: object = False,
        supersedes: object = (),
    ) -> _Request:
        """Validate a save and take a queue slot according to ``when_full`` (on the loop)."""
        request = self._reserve_nowait(step, epoch, metrics, name, t0, keep=keep,
                                       supersedes=supersedes)
        if request.reserved or request.handle.done():
            return request
        return await self._wait_for_slot(request)

    async def _wait_for_slot(self, request: _Request) -> _Request:
        """The slow half of ``_reserve``: every slot is taken and the policy blocks or
        coalesces (then the oldest waiting snapshot is dropped, if one is waiting)."""
        if self.config.when_full == "coalesce" and await self._evict_oldest():
            return self._reserved(request)  # _evict_oldest took the slot it freed
        # block; or coalesce while every slot is held by a snapshot still being taken
        # (concurrent saves from several tasks), so nothing waits to be replaced
        await self._slots.acquire()
        return self._reserved(request)

    def _reserve_nowait(
        self,
        step: object,
        epoch: object,
        metrics: object,
        name: object,
        t0: float,
        *,
        keep: object = False,
        supersedes: object = (),
    ) -> _Request:
        """The fast half of ``_reserve`` (on the loop, never waits): validate, then take a free
        slot or skip. The request comes back unreserved and unresolved when the caller must go
        on to ``_wait_for_slot`` (block, or coalesce: evicting may have to wait for a copy)."""
        self._check_open()
        self._raise_pending()
        step_ = _as_count(step, "step")
        epoch_ = None if epoch is None else _as_count(epoch, "epoch")
        metrics_ = _as_metrics(metrics)
        if name is None:
            name_ = self._template.render(step_, epoch_)
        else:
            name_ = validate_name(name, where="save(name=...)")
        self._check_collision(name_, step_)
        if not isinstance(keep, bool):
            raise TypeError(f"keep must be a bool, got {keep!r}")
        if isinstance(supersedes, str) or not isinstance(supersedes, Iterable):
            raise TypeError("supersedes must be a list of checkpoint names")
        superseded = tuple(validate_name(n, where="save(supersedes=...)") for n in supersedes)
        if name_ in superseded:
            raise ValueError(f"a checkpoint cannot supersede itself ({name_!r})")
        handle = SaveHandle(step_, name_, epoch_, on_raised=self._forget_error)
        request = _Request(handle, metrics_, self._clock(), t0,
                           keep, superseded)
        policy = self.config.when_full
        try:
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            if policy == "skip":
                request.handle._resolve("skipped")
                self._emit(Skipped(step_, name_, "queue_full"))
                return request
            # block, or coalesce: the slow half waits (coalescing may have to wait for the
            # evicted snapshot's background copy to stop before its buffer is reused)
            return request
        return self._reserved(request)

    def _reserved(self, request: _Request) -> _Request:
        """Record that ``request`` holds a slot (on the loop)."""
        if self._lifecycle != "open":
            self._slots.release()
            raise WriterClosedError(f"the checkpointer for {self.uri} closed during save()")
        entry = self._names.setdefault(request.name, [request.step, 0])
        entry[1] += 1
        request.reserved = True
        return request

    def _check_collision(self, name: str, step: int) -> None:
        committed = self._index.get(name)
        other = committed.step if committed is not None else None
        if other is None and name in self._names:
            other = self._names[name][0]
        if other is not None and other != step:
            raise ValueError(
                f"checkpoint name {name!r} for step {step} is already used by step {other}; "
                f"the filename template {self._template.template!r} must tell them apart "
                "(include {step}), or pass a distinct name="
            )

    def _snapshot_mode(self, snapshot: object) -> SnapshotMode:
        if snapshot is None:
            return self.config.snapshot
        if not isinstance(snapshot, str) or snapshot not in get_args(SnapshotMode):
            choices = ", ".join(repr(m) for m in get_args(SnapshotMode))
            raise ValueError(f"save(snapshot=...) must be one of {choices}, got {snapshot!r}")
        return snapshot  # type: ignore[return-value]

    def _take_snapshot(
        self,
        state: object,
        mode: SnapshotMode = "eager",
        streams: dict[int, Any] | None = None,
    ) -> Snapshot:
        """Plan and copy ``state`` (blocking; caller thread or worker thread).

        A pipelined snapshot's background copy is not started yet: :meth:`_submit` starts it.
        """
        plan = plan_snapshot(state, self._extra_types)
        arena = self._pool.acquire(plan.nbytes)
        try:
            return take_snapshot(
                plan, arena, self._copier,
                pipelined=mode == "pipelined",
                streams=streams,
                check=self.config.check_snapshot,
                monitor=CopyMonitor(self._stats.record_guard, self._probe),
                helper=self._copy_thread,
            )
        except BaseException:
            self._pool.release(arena)
            raise

    def _hook(self, snapshot: Snapshot) -> None:
        """Install the guards of a submitted pipelined snapshot (on the caller's thread)."""
        if snapshot.pending is not None:
            snapshot.pending.install()
            self._guarded.append(snapshot.pending)

    def _unhook(self, *, everything: bool = False) -> None:
        """Remove the guard hooks of copies that stopped (on the caller's thread, or at close)."""
        keep: list[PendingCopy] = []
        for pending in self._guarded:
            if everything or pending.stopped:
                pending.remove()
            else:
                keep.append(pending)
        self._guarded = keep

    def _unreserve(self, request: _Request) -> None:
        """Give back the slot of a save whose snapshot failed (on the loop)."""
        if request.reserved:
            request.reserved = False
            self._slots.release()
            self._drop_name(request.name)

    def _submit(self, request: _Request, snapshot: Snapshot) -> SaveHandle:
        """Queue a taken snapshot (on the loop)."""
        job = _Job(request, snapshot)
        if self._lifecycle != "open":
            self._release(job)
            raise WriterClosedError(f"the checkpointer for {self.uri} closed during save()")
        if snapshot.pending is not None and self._copy_thread is not None:
            snapshot.pending.start(self._copy_thread)
        if self._unfinished == 0:
            self._idle = anyio.Event()
        self._unfinished += 1
        self._send.send_nowait(job)  # never full: the stream holds as many items as there are slots
        stall = request.stall if request.stall is not None else time.perf_counter() - request.t0
        self._emit(SnapshotTaken(request.step, request.name, snapshot.nbytes, stall))
        return request.handle

    def _submit_or_cancel(self, request: _Request, snapshot: Snapshot) -> None:
        """``_submit`` for a caller that does not wait for it (on the loop): a checkpointer
        that closed meanwhile resolves the handle as cancelled instead of raising."""
        try:
            self._submit(request, snapshot)
        except WriterClosedError:
            self._drop_name(request.name)
            request.handle._resolve("cancelled")

    async def _evict_oldest(self) -> bool:
        """Coalesce: drop the oldest waiting snapshot to make room (on the loop)."""
        try:
            job = self._evict.receive_nowait()
        except anyio.WouldBlock:
            return False
        job.request.handle._resolve("coalesced")
        self._emit(Skipped(job.request.step, job.request.name, "coalesced"))
        await self._stop_copy(job)  # its arena is reused next: nothing may write it any more
        self._finish(job)
        try:
            self._slots.acquire_nowait()  # the slot the evicted job just gave back ...
        except anyio.WouldBlock:  # ... unless a concurrently blocked save() was handed it first
            await self._slots.acquire()
        return True

    @staticmethod
    async def _stop_copy(job: _Job) -> None:
        """Cancel a dropped job's background copy and wait until it no longer writes its arena."""
        pending = job.snapshot.pending
        if pending is not None and not pending.stopped:
            pending.cancel()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(pending.wait_stopped)

    def _release(self, job: _Job) -> None:
        """Return a job's arena and slot: its bytes are durable or it is dropped (on the loop)."""
        if not job.released:
            job.released = True
            arena, pending = job.snapshot.arena, job.snapshot.pending
            if pending is not None and not pending.stopped:
                pending.cancel()  # only when abandoning: the writer was cancelled mid-wait
            if arena is not None:
                if pending is None or pending.stopped:
                    self._pool.release(arena)
                else:  # still being written: never hand it out again; freed with the copy
                    self._pool.discard(arena)
            job.snapshot = replace(job.snapshot, tree=None, arena=None, _keepalive=[])
            self._slots.release()

    def _drop_name(self, name: str) -> None:
        entry = self._names.get(name)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self._names[name]

    def _finish(self, job: _Job) -> None:
        """Bookkeeping when a job leaves the writer, whatever its outcome (on the loop)."""
        self._release(job)
        self._drop_name(job.request.name)
        job.request.handle._resolve("cancelled")  # no-op unless still pending
        self._unfinished -= 1
        if self._unfinished == 0:
            self._idle.set()

    # -- the writer task -------------------------------------------------------------------------
    async def _writer_loop(self) -> None:
        async with self._recv:
            async for job in self._recv:
                try:
                    await self._process(job)
                finally:
                    self._finish(job)

    async def _process(self, job: _Job) -> None:
        req = job.request
        prior = self._index
        replaced = prior.get(req.name)
        try:
            if job.snapshot.pending is not None:
                await job.snapshot.pending.finished()  # raises what the copy failed with
            if replaced is not None:
                # Unlist it first: no published index may name a file whose bytes are replaced.
                await self._publish(self._index.without_entry(req.name, self._best))
            started = time.perf_counter()
            try:
                size, checksum = await _retrying(
                    lambda: self._write_data(req.name, job.snapshot),
                    retries=self.config.max_retries,
                    backoff=self.config.retry_backoff,
                    what=f"writing {req.name}",
                )
            except BaseException:  # also cancelled (abandon at close, Ctrl-C): relist first
                if replaced is not None:
                    with anyio.CancelScope(shield=True):
                        await self._relist_if_intact(replaced, prior)
                raise
            seconds = time.perf_counter() - started
            numpy_paths = tuple(job.snapshot.numpy_paths)
            self._release(job)
            self._emit(Written(req.step, req.name, size, seconds))
            encryption = self.config.encryption
            entry = IndexEntry(req.name, req.step, req.handle.epoch, req.wall, size, checksum,
                               req.metrics, numpy_paths, req.keep,
                               None if encryption is None else encryption.mode,
                               self.config.series)
            before = self._index
            with anyio.CancelScope(shield=True):
                state, dropped = before.with_entry(entry, self._best).superseding(
                    req.supersedes, self._best
                )
                state, victims = state.rotated(self._retention, self.config.series)
                victims = dropped + victims
                await self._publish(state)
        except Exception as exc:
            self._record_error(f"saving {req.name!r} (step {req.step})", exc)
            req.handle._resolve("failed", error=exc)
            self._emit(Failed(req.step, req.name, exc))
            return
        if self.config.last_checkpoint:
            try:
                with anyio.CancelScope(shield=True):
                    await self._write_pointer()
            except Exception as exc:  # the checkpoint is committed; the pointer is stale
                self._record_error(f"updating {LAST_CHECKPOINT_NAME} after {req.name!r}", exc)
        info = self._info(entry)
        req.handle._resolve("committed", info=info)
        self._emit(Committed(info, time.perf_counter() - req.t0))
        for metric, record in self._index.best.items():
            previous = before.best.get(metric)
            if previous is None or previous.name != record.name or previous.value != record.value:
                self._emit(
                    BestUpdated(metric, record.value, record.name,
                                None if previous is None else previous.name)
                )
        if victims:
            self._emit(Rotated(tuple(victims)))
        await self._delete_pending()

    async def _write_data(self, name: str, snapshot: Snapshot) -> tuple[int, str]:
        """One attempt: serialize in a worker thread, streaming chunks into storage.write, or
        through the backend's blocking path when it has one (:meth:`_write_blocking`).

        With ``encryption`` the serializer writes into a sealer in the same thread, and the size
        and checksum returned (for the index) are those of the stored, encrypted bytes.
        """
        sink = self._storage.blocking_write(name, size_hint=snapshot.nbytes)
        if sink is not None:
            return await self._write_blocking(name, snapshot, sink)
        send, recv = anyio.create_memory_object_stream[object](_CHANNEL_DEPTH)
        outcome: dict[str, Any] = {}
        options = self._serialize_options()
        encryption = self.config.encryption

        def produce() -> tuple[int, str]:
            def emit(chunk: object) -> None:
                anyio.from_thread.run(send.send, chunk)

            if encryption is None:
                result = serialize(snapshot, emit, **options)
            else:
                sealer = encryption.sealer(emit)
                serialize(snapshot, sealer.write, **options)
                result = sealer.finish()
            anyio.from_thread.run(send.send, _END)
            return result

        async def producer() -> None:
            with send:
                try:
                    outcome["result"] = await anyio.to_thread.run_sync(produce)
                except Exception as exc:
                    outcome["error"] = exc

        async def chunks() -> Any:
            async for item in recv:
                if item is _END:
                    return
                yield item
            raise _ProducerStopped

        storage_error: Exception | None = None
        written = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(producer)
            with recv:  # closing it unblocks a producer waiting to send, whatever happens here
                stream = chunks()
                try:
                    written = await self._storage.write(name, stream)
                except Exception as exc:
                    storage_error = exc
                finally:
                    await stream.aclose()
        if storage_error is not None and not isinstance(storage_error, _ProducerStopped):
            raise storage_error  # the root cause; the serializer only saw the stream close
        if "error" in outcome:
            raise outcome["error"]
        size, checksum = outcome["result"]
        await self._check_written(name, written, size)
        return size, checksum

    async def _write_blocking(
        self, name: str, snapshot: Snapshot, sink: BlockingWrite
    ) -> tuple[int, str]:
        """One attempt through the backend's blocking path: the writer's low-priority job
        thread serializes (and encrypts) and writes the file itself, so no chunk crosses
        threads. Cancellation (abandon at close) is noticed between chunks; the sink is then
        aborted and leaves nothing behind."""
        options = self._serialize_options()
        encryption = self.config.encryption

        def run(cancelled: threading.Event) -> tuple[int, str, int]:
            def store(chunk: Any) -> None:
                if cancelled.is_set():
                    raise _JobCancelled
                sink.write(chunk)

            sink.cancelled = cancelled
            try:
                if encryption is None:
                    size, checksum = serialize(snapshot, store, borrowed=True, **options)
                else:  # the sealer encrypts or copies each piece before it returns
                    sealer = encryption.sealer(store)
                    serialize(snapshot, sealer.write, borrowed=True, **options)
                    size, checksum = sealer.finish()
                if cancelled.is_set():
                    raise _JobCancelled
                return size, checksum, sink.commit()
            except BaseException:
                sink.abort()
                raise

        size, checksum, written = await self._jobs.run(run)
        await self._check_written(name, written, size)
        return size, checksum

    def _serialize_options(self) -> dict[str, Any]:
        return {
            "torch_crc32": self.config.torch_crc32,
            "reducers": self._reducers,
            "cpu_locations": self.config.cpu_locations,
        }

    async def _check_written(self, name: str, written: int, size: int) -> None:
        """Raise if the backend published other than the ``size`` bytes serialized."""
        if written == size:
            return
        # The backend published something other than what was serialized. No index names it (a
        # listed name is unlisted before it is rewritten), so it can go.
        with anyio.CancelScope(shield=True):
            try:
                await self._storage.delete(name)
            except Exception as exc:
                logger.warning("could not remove the short write %s: %s", name, exc)
        raise StorageError(
            f"storage accepted {written} of {size} bytes for {name}", self._storage.uri_of(name)
        )

    async def _relist_if_intact(self, entry: IndexEntry, prior: IndexState) -> None:
        """After a failed re-save, list the previous file again if its bytes are unchanged:
        back to the index as it was before (``prior``: its place in the order, the best
        pointers), not appended as if it were the newest."""
        try:
            if await self._verify(entry):
                await self._publish(replace(prior, pending_deletes=self._index.pending_deletes))
        except Exception as exc:  # the write failure being raised matters more
            logger.warning("could not re-list %s after a failed re-save: %s", entry.name, exc)

    async def _verify(self, entry: IndexEntry) -> bool:
        hasher, size = Hasher(), 0
        async for chunk in self._storage.read_stream(entry.name):
            hasher.update(chunk)
            size += len(chunk)
        return size == entry.size and hasher.hexdigest() == entry.checksum

    # -- index, pointer, deletions ---------------------------------------------------------------
    @property
    def _index_uri(self) -> str:
        return self._storage.uri_of(INDEX_NAME)

    async def _read_index(self) -> IndexState | None:
        try:
            data = await self._storage.read_bytes(INDEX_NAME)
        except FileNotFoundError:
            return None
        return IndexState.from_json(data, self._index_uri)

    async def _publish(self, state: IndexState) -> None:
        state = replace(state, generation=self._published.generation + 1)
        data = state.to_json()
        await _retrying(
            lambda: self._storage.write_bytes(INDEX_NAME, data),
            retries=self.config.max_retries,
            backoff=self.config.retry_backoff,
            what="writing the index",
        )
        self._index = self._published = state

    async def _write_pointer(self) -> None:
        latest = self._index.latest
        if latest is None:
            return
        data = self._storage.uri_of(latest.name).encode("utf-8")
        await _retrying(
            lambda: self._storage.write_bytes(LAST_CHECKPOINT_NAME, data),
            retries=self.config.max_retries,
            backoff=self.config.retry_backoff,
            what=f"writing {LAST_CHECKPOINT_NAME}",
        )

    async def _delete_pending(self) -> None:
        """Delete files the published index no longer names; failures stay pending."""
        listed = self._index.names | self._published.names
        deleted: list[str] = []
        for name in self._index.pending_deletes:
            if name in listed:  # never delete a file an index names (belt and braces)
                continue
            try:
                await _retrying(
                    lambda name=name: self._storage.delete(name),  # type: ignore[misc]
                    retries=self.config.max_retries,
                    backoff=self.config.retry_backoff,
                    what=f"deleting {name}",
                )
            except Exception as exc:
                logger.warning("could not delete %s (will retry): %s", name, exc)
                self._emit(DeleteFailed(name, exc))
            else:
                deleted.append(name)
        if deleted:
            self._index = self._index.forget_deleted(deleted)

    # -- closing ---------------------------------------------------------------------------------
    async def _close(self, *, abandon: bool) -> None:
        if self._lifecycle in ("closing", "closed"):
            if self._lifecycle == "closed":
                self._raise_pending()
            return
        if self._lifecycle == "new":
            self._lifecycle = "closed"
            return
        self._lifecycle = "closing"
        self._send.close()
        if abandon:
            self._tg.cancel_scope.cancel()
        try:
            await self._tg.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                while True:  # abandoned snapshots that never reached the writer
                    try:
                        job = self._evict.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                        break
                    await self._stop_copy(job)
                    self._finish(job)
                self._evict.close()
                if self._copy_thread is not None:
                    await anyio.to_thread.run_sync(self._copy_thread.shutdown)
                self._unhook(everything=True)
                try:
                    if not abandon:
                        await self._delete_pending()
                    if self._index != self._published:
                        await self._publish(self._index)
                except Exception as exc:
                    self._record_error("updating the index at close", exc)
                finally:
                    self._pool.close()
                    await self._jobs.aclose()
                    hold_for_writer(self._storage, False)
                    await self._storage.aclose()
                    self._lifecycle = "closed"
        self._raise_pending()

    # -- errors and events -----------------------------------------------------------------------
    def _record_error(self, what: str, exc: BaseException) -> None:
        logger.error("asyncckpt: %s failed: %r", what, exc)
        self._errors.append((what, exc))

    def _forget_error(self, exc: BaseException) -> None:
        """A handle raised ``exc`` to its caller: it is reported, do not raise it again."""
        self._errors = [(what, e) for what, e in self._errors if e is not exc]

    def _raise_pending(self) -> None:
        if not self._errors:
            return
        errors, self._errors = self._errors, []
        what, first = errors[0]
        more = f" (and {len(errors) - 1} more failure(s), see .errors)" if len(errors) > 1 else ""
        raise WriterError(
            f"background checkpoint writer: {what} failed: {first!r}{more}",
            tuple(e for _, e in errors),
        ) from first

    def _emit(self, event: Event) -> None:
        self._stats(event)
        for observer in self._observers:
            try:
                observer(event)
            except Exception as exc:
                self._record_error(f"observer {observer!r} on {type(event).__name__}", exc)

    def _info(self, entry: IndexEntry) -> CheckpointInfo:
        return CheckpointInfo(
            name=entry.name,
            uri=self._storage.uri_of(entry.name),
            step=entry.step,
            epoch=entry.epoch,
            time=entry.time,
            size=entry.size,
            checksum=entry.checksum,
            metrics=dict(entry.metrics),
        )

    def __repr__(self) -> str:
        return f"<AsyncCheckpointer {self.uri!r} {self._lifecycle}>"

