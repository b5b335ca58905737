"""Async front door: :class:`AsyncCheckpointer`, for training loops that run on an event loop.

Everything it does goes through its :class:`~asyncckpt._core.engine.Engine` (queue, snapshots,
folder, writer); the snapshot copy runs in a worker thread so the loop is never blocked.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

import anyio

from .._snapshot.copy import caller_streams
from .._snapshot.snapshot import SnapshotMode
from ..storage import Storage, storage_for
from .config import CheckpointerConfig
from .engine import EngineViews
from .engines import make_engine
from .handle import SaveHandle, SaveStatus
from .reporting import Observer
from .validate import snapshot_mode

__all__ = ["AsyncCheckpointer", "SaveHandle", "SaveStatus"]


class AsyncCheckpointer(EngineViews):
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
        config = CheckpointerConfig.from_options(config, options)
        storage = storage_for(directory, storage_options=storage_options)
        self._engine = make_engine(storage, config, observers=observers, clock=clock)

    def subscribe(self, observer: Observer) -> None:
        """Call ``observer(event)`` for every event from now on (on the writer's loop thread)."""
        self._engine.reporter.subscribe(observer)

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> AsyncCheckpointer:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._engine.close_after(exc)

    async def open(self) -> None:
        """Open the folder: read (resume) its index, clean leftovers, start the writer task.

        Raises:
            CorruptIndexError: the folder's index cannot be read; nothing is overwritten.
            ValueError: the index tracks a best metric with the opposite rule.
            StorageError: the folder cannot be created or read.
        """
        await self._engine.open()
        self._engine.warn_untracked_best(stacklevel=2)

    async def aclose(self) -> None:
        """Drain the queue, finish pending deletions, release the folder; raise writer failures."""
        await self._engine.close(abandon=False)

    # -- saving ----------------------------------------------------------------------------------
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
                too, e.g. a file another tool wrote into the folder. This save's own name may be
                listed: it then replaces the checkpoint listed (or queued) under that name even
                if that one has another step (e.g. a ``last.pt`` rewritten at every save).
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
        engine = self._engine
        mode = snapshot_mode(snapshot, self.config.snapshot)
        engine.snapshots.guards.remove_stopped()
        request = engine.request(step, epoch, metrics, name, t0, keep=keep, supersedes=supersedes)
        await engine.queue.reserve(request)
        if not request.reserved:
            return request.handle
        streams = caller_streams()  # this thread's CUDA streams, not the worker's
        try:
            snap = await anyio.to_thread.run_sync(engine.snapshots.take, state, mode, streams)
        except BaseException:
            engine.queue.unreserve(request)
            raise
        engine.snapshots.guards.install(snap.pending)
        request.stall = time.perf_counter() - t0  # what the caller waits, up to the hand-off
        return engine.queue.submit(request, snap)

    async def wait_snapshot(self) -> None:
        """Wait until every pipelined snapshot is completely copied.

        Needed only before changing in place, other than through the optimizer's ``step()``,
        a tensor that an optimizer in a pipelined ``save()``'s state updates (its parameters or
        its state) -- e.g. a manual ``p.data.mul_()``, or loading weights into the model --
        before that optimizer's next ``step()``. Errors of the copy are not raised here but like
        writer errors (the save's handle, the next ``save()`` / ``flush()`` / ``close()``).
        """
        await self._engine.snapshots.guards.wait_async()

    async def flush(self) -> None:
        """Wait until every queued save is resolved, then raise any writer failure.

        Raises:
            WriterError: a background save failed.
            WriterClosedError: the checkpointer is closed.
        """
        try:
            await self._engine.flush()
        finally:
            self._engine.snapshots.guards.remove_stopped()

    async def remove(self, names: Iterable[str]) -> None:
        """Drop checkpoints from the index and delete their files, without saving anything.

        Waits first until every queued save is resolved (as :meth:`flush`), so a name that is
        still being written is removed once committed. The index that no longer lists the
        names is published before their files are deleted; a name the index does not list is
        deleted as well (as with ``save(supersedes=...)``). Best pointers that named a removed
        checkpoint fall back to the best remaining one. Call it from the task (or thread) that
        saves, not concurrently with ``save()``.

        Raises:
            TypeError, ValueError: ``names`` is not a list of valid checkpoint names.
            WriterError: a background save failed.
            WriterClosedError: the checkpointer is closed.
        """
        try:
            await self._engine.remove(names)
        finally:
            self._engine.snapshots.guards.remove_stopped()

    def __repr__(self) -> str:
        return f"<AsyncCheckpointer {self.uri!r} {self._engine.lifecycle}>"
