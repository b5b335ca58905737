"""The writer behind both front doors: its parts, its lifecycle, and the writer task.

::

    front door ─ request() ─ queue.reserve ─ snapshots.take ─ queue.submit ─▶ (returns)
                                                                   │
    writer task  ◀── queue.jobs() ─────────────────────────────────┘
      ├ pipelined: wait until the background copy completed
      ├ folder.announce(name)          pending deletion until committed; a re-save unlisted
      ├ writer.write(name, snapshot)   serialize + store durably (retried on transient errors)
      ├ queue.release(job)             slot and arena back
      ├ folder.commit(entry)  [shielded]   one new index: entry, latest, best, rotation
      ├ folder.write_pointer()             last_checkpoint
      ├ emit Written / Committed / BestUpdated / Rotated; resolve the handle
      └ folder.delete_pending()            what the published index no longer names

A failure anywhere in a job fails that job only; the writer goes on with the next one (a full
disk that is cleared lets saving resume). The front doors (``AsyncCheckpointer``,
``Checkpointer``) own nothing but this object and the thread they call it from.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup

from .._errors import CheckpointError, WriterClosedError
from .._format.index import IndexEntry
from .._format.naming import LAST_CHECKPOINT_NAME, validate_name
from .._format.retention import Retention
from .._snapshot.pool import BufferPool
from .._snapshot.snapshot import Snapshotter
from ..storage import Storage
from .config import CheckpointerConfig
from .events import (
    BestUpdated,
    CheckpointInfo,
    CheckpointStats,
    Committed,
    DeleteFailed,
    Failed,
    Rotated,
    Written,
)
from .folder import CheckpointFolder, retrying
from .queue import Job, Request, SaveQueue
from .reporting import Observer, Reporter
from .validate import build_request
from .write import CheckpointWriter

__all__ = ["Engine", "EngineViews", "UntrackedBestWarning"]

logger = logging.getLogger("asyncckpt")

Lifecycle = Literal["new", "open", "closing", "closed"]


class UntrackedBestWarning(UserWarning):
    """A folder kept a best pointer for a metric the writer opening it does not track (its
    ``best=`` leaves it out): that checkpoint is no longer protected from rotation."""


class Engine:
    """Queue, snapshots, folder and writer of one checkpointer, and the task that drives them.

    Every method runs on the writer's event loop unless it says otherwise.
    """

    def __init__(
        self,
        storage: Storage,
        config: CheckpointerConfig,
        *,
        observers: Iterable[Observer] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not callable(clock):
            raise TypeError("clock must be a callable returning seconds")
        self.config = config
        self.storage = storage
        self.reporter = Reporter(observers)
        self._clock = clock
        self._template = config.template
        self._retention = Retention(
            config.keep_last, config.keep_every_n_minutes, config.keep_period
        )
        self.folder = CheckpointFolder(
            storage, best=config.best, retries=config.max_retries, backoff=config.retry_backoff
        )
        self.snapshots = Snapshotter(
            BufferPool(config.queue_size + 1),
            extra_types=[cls for cls, _ in config.extra_types],
            check=config.check_snapshot,
            on_guard=self.reporter.stats.record_guard,
        )
        self.queue = SaveQueue(
            config.queue_size, config.when_full, self.snapshots, self.reporter.emit, storage.uri
        )
        self.writer = CheckpointWriter(
            storage,
            encryption=config.encryption,
            torch_crc32=config.torch_crc32,
            reducers={cls: fn for cls, fn in config.extra_types if fn is not None},
            cpu_locations=config.cpu_locations,
            writer_nice=config.writer_nice,
        )
        self.lifecycle: Lifecycle = "new"
        self._tg: TaskGroup

    @property
    def uri(self) -> str:
        return self.storage.uri

    def check_open(self) -> None:
        """Raise :class:`WriterClosedError` unless open (any thread)."""
        if self.lifecycle != "open":
            state = "not open yet" if self.lifecycle == "new" else "closed"
            raise WriterClosedError(f"the checkpointer for {self.uri} is {state}")

    # -- lifecycle -------------------------------------------------------------------------------
    async def open(self) -> None:
        """Open the folder (resume its index, clean leftovers) and start the writer task.

        Raises:
            CorruptIndexError: the folder's index cannot be read; nothing is overwritten.
            ValueError: the index tracks a best metric with the opposite rule.
            StorageError: the folder cannot be created or read.
        """
        if self.lifecycle != "new":
            raise CheckpointError(f"the checkpointer for {self.uri} was already opened; "
                                  "create a new checkpointer")
        self.lifecycle = "open"
        try:
            await self.storage.open(writer=True)
            self.storage.writer_token = anyio.lowlevel.current_token()
            await self.folder.open_for_writing()
            await self.folder.delete_pending(self._delete_failed)
            self.queue.open()
            self.snapshots.open()
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
        except BaseException:
            self.lifecycle = "closed"
            self.storage.writer_token = None
            with anyio.CancelScope(shield=True):
                await self.storage.aclose()
            raise
        self._tg.start_soon(self._run)

    def warn_untracked_best(self, stacklevel: int) -> None:
        """Warn (on the caller's thread) when opening dropped best pointers the index kept."""
        names = self.folder.untracked_best
        if names:
            listed = ", ".join(repr(n) for n in names)
            warnings.warn(
                f"{self.uri} kept the best checkpoint for {listed}, which this writer does not "
                "track (best=): it is now an ordinary rotation candidate. Name the metric in "
                "best= to keep protecting it.",
                UntrackedBestWarning,
                stacklevel=stacklevel + 1,
            )

    async def close(self, *, abandon: bool) -> None:
        """Drain the queue (or abandon it), finish deletions, release the folder; then raise
        the writer failures not raised yet."""
        if self.lifecycle in ("closing", "closed"):
            if self.lifecycle == "closed":
                self.reporter.raise_pending()
            return
        if self.lifecycle == "new":
            self.lifecycle = "closed"
            return
        self.lifecycle = "closing"
        self.queue.close()
        if abandon:
            self._tg.cancel_scope.cancel()
        try:
            await self._tg.__aexit__(None, None, None)
        finally:
            with anyio.CancelScope(shield=True):
                await self.queue.drop_unwritten()
                try:
                    await self.snapshots.close()
                    if not abandon:
                        await self.folder.delete_pending(self._delete_failed)
                    await self.folder.flush_index()
                except Exception as exc:
                    self.reporter.record_error("updating the index at close", exc)
                finally:
                    await self.writer.aclose()
                    self.storage.writer_token = None
                    await self.storage.aclose()
                    self.lifecycle = "closed"
        self.reporter.raise_pending()

    async def close_after(self, exc: BaseException | None) -> None:
        """Close at the end of a ``with`` block that raised ``exc`` (None: it did not).

        After an error the queue is drained or abandoned as ``on_exception`` says (always
        abandoned on cancellation), and a writer failure is attached to ``exc`` as a note
        instead of replacing it.
        """
        if exc is None:
            await self.close(abandon=False)
            return
        abandon = self.config.on_exception == "abandon" or isinstance(
            exc, anyio.get_cancelled_exc_class()
        )
        try:
            await self.close(abandon=abandon)
        except CheckpointError as err:
            logger.error("checkpoint writer failed while closing after an error: %s", err)
            if hasattr(exc, "add_note"):
                exc.add_note(f"asyncckpt: while closing, the writer also failed: {err}")

    async def __aenter__(self) -> Engine:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close_after(exc)

    async def flush(self) -> None:
        """Wait until every queued save is resolved, then raise any writer failure."""
        self.check_open()
        await self.queue.wait_idle()
        self.reporter.raise_pending()

    # -- requests --------------------------------------------------------------------------------
    def request(
        self,
        step: object,
        epoch: object = None,
        metrics: object = None,
        name: object = None,
        t0: float | None = None,
        *,
        keep: object = False,
        supersedes: object = (),
    ) -> Request:
        """Validate a save and make its request (no slot yet).

        Raises:
            WriterError: an earlier background save failed (raised once).
            WriterClosedError: the checkpointer is closed.
            TypeError, ValueError: an argument is invalid, or the name collides with another
                step's.
        """
        self.check_open()
        self.reporter.raise_pending()
        return build_request(
            step, epoch, metrics, name, t0, keep, supersedes,
            template=self._template,
            step_of=self._step_named,
            wall=self._clock(),
            on_raised=self.reporter.forget_error,
        )

    async def remove(self, names: object) -> None:
        """Drain the queue, then unlist ``names`` (one published index) and delete their files.

        Raises:
            TypeError, ValueError: ``names`` is not a list of valid checkpoint names.
            WriterError: a background save failed.
            WriterClosedError: the checkpointer is closed.
        """
        if isinstance(names, str) or not isinstance(names, Iterable):
            raise TypeError("remove() takes a list of checkpoint names")
        victims = tuple(validate_name(n, where="remove(...)") for n in names)
        await self.flush()
        if not victims:
            return
        with anyio.CancelScope(shield=True):
            dropped = await self.folder.unlist_many(victims)
        self.reporter.emit(Rotated(tuple(dropped)))
        await self.folder.delete_pending(self._delete_failed)

    def _step_named(self, name: str) -> int | None:
        """The step of the committed, queued or running checkpoint called ``name``, if any.

        The sync front door asks from the training thread while the writer commits: the writer
        lists a name in the index before the name leaves the queue, so reading the queue first
        sees a save that commits meanwhile in one place or the other.
        """
        flying = self.queue.in_flight(name)
        committed = self.folder.index.get(name)
        return committed.step if committed is not None else flying

    # -- the writer task -------------------------------------------------------------------------
    async def _run(self) -> None:
        jobs = self.queue.jobs()
        async with jobs:
            async for job in jobs:
                try:
                    await self._process(job)
                finally:
                    self.queue.finish(job)

    async def _process(self, job: Job) -> None:
        req = job.request
        folder = self.folder
        prior = folder.index
        replaced = prior.get(req.name)
        try:
            if job.snapshot.pending is not None:
                await job.snapshot.pending.finished()  # raises what the copy failed with
            # Before any byte can become visible under this name, the published index records
            # it as pending deletion (and unlists a re-saved name: no published index may name
            # a file whose bytes are replaced). A crash between the file's publication and the
            # commit then leaves a file the next writer deletes at open, never an unlisted one.
            await folder.announce(req.name)
            started = time.perf_counter()
            try:
                size, checksum = await retrying(
                    lambda: self.writer.write(req.name, job.snapshot),
                    retries=self.config.max_retries,
                    backoff=self.config.retry_backoff,
                    what=f"writing {req.name}",
                )
            except BaseException:  # also cancelled (abandon at close, Ctrl-C): relist first
                if replaced is not None:
                    with anyio.CancelScope(shield=True):
                        await folder.relist_if_intact(replaced, prior)
                raise
            seconds = time.perf_counter() - started
            numpy_paths = tuple(job.snapshot.numpy_paths)
            self.queue.release(job)
            self.reporter.emit(Written(req.step, req.name, size, seconds))
            encryption = self.config.encryption
            entry = IndexEntry(req.name, req.step, req.handle.epoch, req.wall, size, checksum,
                               req.metrics, numpy_paths, req.keep,
                               None if encryption is None else encryption.mode,
                               self.config.series)
            with anyio.CancelScope(shield=True):
                before, victims = await folder.commit(
                    entry, supersedes=req.supersedes, retention=self._retention,
                    series=self.config.series,
                )
        except Exception as exc:
            self._failed(req, exc)
            return
        await self._committed(req, entry, before.best, victims)

    def _failed(self, req: Request, exc: Exception) -> None:
        """A save failed: keep the error for the caller, resolve its handle, tell observers."""
        self.reporter.record_error(f"saving {req.name!r} (step {req.step})", exc)
        req.handle.resolve("failed", error=exc)
        self.reporter.emit(Failed(req.step, req.name, exc))

    async def _committed(self, req: Request, entry: IndexEntry, best_before: Mapping[str, Any],
                         victims: list[str]) -> None:
        """After the index listed ``entry``: the pointer, the handle, the events, deletions."""
        if self.config.last_checkpoint:
            try:
                with anyio.CancelScope(shield=True):
                    await self.folder.write_pointer()
            except Exception as exc:  # the checkpoint is committed; the pointer is stale
                self.reporter.record_error(
                    f"updating {LAST_CHECKPOINT_NAME} after {req.name!r}", exc
                )
        info = self.folder.info(entry)
        req.handle.resolve("committed", info=info)
        self.reporter.emit(Committed(info, time.perf_counter() - req.t0))
        self._emit_best(best_before)
        if victims:
            self.reporter.emit(Rotated(tuple(victims)))
        await self.folder.delete_pending(self._delete_failed)

    def _emit_best(self, before: Mapping[str, Any]) -> None:
        for metric, record in self.folder.index.best.items():
            previous = before.get(metric)
            if previous is None or previous.name != record.name or previous.value != record.value:
                self.reporter.emit(
                    BestUpdated(metric, record.value, record.name,
                                None if previous is None else previous.name)
                )

    def _delete_failed(self, name: str, exc: Exception) -> None:
        self.reporter.emit(DeleteFailed(name, exc))


class EngineViews:
    """What both front doors show of their engine: configuration, folder, counters.

    The front doors differ only in how they reach the writer's loop (an ``await``, or a call
    across threads); what they read is this.
    """

    _engine: Engine

    @property
    def config(self) -> CheckpointerConfig:
        """The validated configuration."""
        return self._engine.config

    @property
    def storage(self) -> Storage:
        """The backend this writer writes to."""
        return self._engine.storage

    @property
    def uri(self) -> str:
        """The folder path / URI checkpoints go to."""
        return self._engine.uri

    @property
    def stats(self) -> CheckpointStats:
        """Counters and timings so far (see :class:`~asyncckpt.events.CheckpointStats`)."""
        return self._engine.reporter.snapshot()

    @property
    def buffer_pool(self) -> BufferPool:
        """The pool of host buffers snapshots are copied into."""
        return self._engine.snapshots.pool

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        return self._engine.folder.checkpoints()

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint, or None."""
        return self._engine.folder.latest()

    def best(self, metric: str) -> CheckpointInfo | None:
        """The checkpoint with the best value of ``metric`` so far, or None before the first.

        Raises:
            ValueError: ``metric`` has no best pointer (it was not passed as ``best=``).
        """
        return self._engine.folder.best(metric)
