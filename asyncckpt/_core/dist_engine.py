"""The multi-rank engine: the same front doors, queue and index, with collective saves.

Under ``torch.distributed`` every rank opens a checkpointer on the same folder and calls
``save()`` with the same step in the same order. What differs from the single-process engine::

    open      rank 0: lock + resume the folder, remove leftovers of unfinished saves
              (S3: every rank opens its own client session)
              every rank: create the checkpoint group (gloo; collective), receive rank 0's index
    save()    training thread: plan + copy this rank's share (PartSnapshots.take), queue it
    writer    DistSaver.commit (worker thread): write this rank's file, agree with every rank,
                rank 0 renames the directory into place (S3: nothing to rename) and, before
                telling the others, commits the index entry (latest, best, rotation) on the
                loop: on S3 that entry is what makes the checkpoint exist
              every rank: the same entry, from rank 0, applied to its own view of the index
              rank 0: pointer, deletions (a rotated directory is moved aside, then removed)
    close     drain the queue, then release the group

Only rank 0 writes the index; the other ranks keep an in-memory mirror of it
(:class:`MirrorFolder`), updated with exactly the entries rank 0 committed, so ``latest()``,
``checkpoints()``, best pointers and handles agree on every rank.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable

import anyio
import torch.distributed as dist

from .._dist import CheckpointGroup, CommitResult, DistSaver
from .._dist.files import MANIFEST_NAME
from .._dist.snapshots import PartSnapshot, PartSnapshots
from .._dist.targets import layout_for
from .._errors import CheckpointError
from .._format.index import IndexEntry, IndexState
from .._format.naming import FilenameTemplate
from ..storage import S3Storage, Storage
from .config import CheckpointerConfig
from .engine import Engine
from .events import Written
from .folder import CheckpointFolder
from .queue import Job, Request, SaveQueue
from .reporting import Observer

__all__ = ["DistEngine", "MirrorFolder", "directory_template"]


def directory_template(filename: str) -> str:
    """The name template of multi-rank checkpoints: the file template without ``.pt``/``.pth``
    (a checkpoint is a directory)."""
    for suffix in (".pt", ".pth"):
        if filename.endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)]
    return filename


def _refuse_unsupported(storage: Storage, config: CheckpointerConfig) -> None:
    """ValueError for what multi-rank checkpoints do not support."""
    problems = []
    if config.when_full != "block":
        problems.append(
            f"when_full={config.when_full!r} (ranks would drop different saves; use 'block')")
    if config.snapshot != "eager":
        problems.append(f"snapshot={config.snapshot!r} (every rank copies its share eagerly)")
    if config.encryption is not None:
        problems.append("encryption (DCP's readers need the plain layout)")
    if config.extra_types:
        problems.append("extra_types (values are saved the way DCP saves them)")
    if not isinstance(storage, S3Storage) and storage.local_path("probe") is None:
        problems.append(
            f"the store {storage.uri} (multi-rank checkpoints need a store every rank "
            "reaches: a path on a shared filesystem, or s3://)")
    if problems:
        raise ValueError("multi-rank checkpoints (torch.distributed with several ranks) do not "
                         "support " + "; ".join(problems)
                         + ". Pass distributed=False for one independent writer per rank.")


class MirrorFolder(CheckpointFolder):
    """Rank > 0's view of the folder: rank 0's index, changed in memory only.

    Every transition is the one rank 0 made (the same entries, in the same order), so the view
    equals rank 0's published index; nothing is written or deleted from here.
    """

    def adopt(self, index: IndexState) -> None:
        """Start from rank 0's index as it was when the folder was opened."""
        self.index = self._published = index

    async def publish(self, state: IndexState) -> None:
        self.index = self._published = state.with_generation(self._published.generation + 1)

    async def write_pointer(self) -> None:
        return None

    async def delete_pending(self, on_failure: Callable[[str, Exception], None]) -> None:
        self.index = self.index.forget_deleted(self.index.pending_deletes)

    async def flush_index(self) -> None:
        return None


class DistEngine(Engine):
    """The engine of a checkpointer that saves collectively over several ranks."""

    def __init__(
        self,
        storage: Storage,
        config: CheckpointerConfig,
        *,
        observers: Iterable[Observer] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        _refuse_unsupported(storage, config)
        super().__init__(storage, config, observers=observers, clock=clock)
        self._pg = config.distributed if isinstance(config.distributed, dist.ProcessGroup) \
            else None
        self.rank = dist.get_rank(self._pg) if self._pg is not None else dist.get_rank()
        self._template = FilenameTemplate(directory_template(config.filename))
        if self.rank != 0:
            self.folder = MirrorFolder(storage, best=config.best)
        self.snapshots: PartSnapshots = PartSnapshots(self.snapshots.pool,
                                       on_guard=self.reporter.stats.record_guard)
        self.queue = SaveQueue(config.queue_size, config.when_full, self.snapshots,
                               self.reporter.emit, storage.uri)
        self.group: CheckpointGroup | None = None
        self.saver: DistSaver | None = None
        self._recorded: tuple[IndexState, list[str]] | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def open(self) -> None:
        """Open collectively: rank 0 opens the folder, every rank joins the checkpoint group
        and learns rank 0's index (or why some rank could not open it).

        Raises:
            CheckpointError: some rank could not open the folder (on that rank: its own error).
            CheckpointGroupError: the group could not be formed within ``dist_timeout``.
        """
        if self.lifecycle != "new":
            raise CheckpointError(f"the checkpointer for {self.uri} was already opened; "
                                  "create a new checkpointer")
        self.lifecycle = "open"
        try:
            failure: Exception | None = None
            token = anyio.lowlevel.current_token()
            layout = layout_for(self.storage, token)
            if layout is None:  # _refuse_unsupported let it through
                raise RuntimeError(f"no multi-rank layout for {self.uri}")
            try:
                if self.rank == 0:
                    await self.storage.open(writer=True)
                    self.storage.writer_token = token
                    await self.folder.open_for_writing()
                    index = self.folder.index
                    await layout.remove_leftovers({*index.names, *index.pending_deletes})
                    await self.folder.delete_pending(self._delete_failed)
                elif isinstance(self.storage, S3Storage):  # every rank uploads its own file
                    await self.storage.open(writer=False)
                    self.storage.writer_token = token  # readers given it must not close it
            except Exception as exc:  # the other ranks must hear of it, not wait
                failure = exc
            group = self.group = await anyio.to_thread.run_sync(
                functools.partial(CheckpointGroup, self.config.dist_timeout, ranks_of=self._pg))
            what = f"open the checkpoint folder {self.uri}"
            gathered = await anyio.to_thread.run_sync(functools.partial(
                group.all_gather, None if failure is None else
                f"{type(failure).__name__}: {failure}", what=what))
            if failure is not None:
                raise failure
            errors = [f"rank {r}: {e}" for r, e in enumerate(gathered) if e is not None]
            if errors:
                raise CheckpointError("could not open the checkpoint folder on every rank: "
                                      + "; ".join(errors))
            index = await anyio.to_thread.run_sync(functools.partial(
                group.broadcast, self.folder.index if self.rank == 0 else None, what=what))
            if isinstance(self.folder, MirrorFolder):
                self.folder.adopt(index)
            self.saver = self.snapshots.saver = DistSaver(layout, group,
                                                          pool=self.snapshots.pool)
            self.queue.open()
            self.snapshots.open()
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
        except BaseException:
            self.lifecycle = "closed"
            self.storage.writer_token = None
            with anyio.CancelScope(shield=True):
                await self._release_group()
                await self.storage.aclose()
            raise
        self._tg.start_soon(self._run)

    async def close(self, *, abandon: bool) -> None:
        """Drain (or abandon) the queue as a single-process engine does, then release the
        checkpoint group."""
        try:
            await super().close(abandon=abandon)
        finally:
            if self.lifecycle == "closed":
                with anyio.CancelScope(shield=True):
                    await self._release_group()

    async def _release_group(self) -> None:
        group, self.group = self.group, None
        if group is not None and group.broken is None:
            await anyio.to_thread.run_sync(group.destroy)

    # -- the writer task -------------------------------------------------------------------------
    async def _process(self, job: Job) -> None:
        req = job.request
        folder = self.folder
        before = folder.index
        saver = self.saver
        snapshot = job.snapshot
        if saver is None or not isinstance(snapshot, PartSnapshot) or snapshot.part is None:
            raise RuntimeError("a multi-rank save reached the writer without its part")
        self._recorded = None
        started = time.perf_counter()
        try:
            def record(result: CommitResult) -> IndexEntry:  # on the commit's thread
                return anyio.from_thread.run(self._record, req, result)

            result: CommitResult = await anyio.to_thread.run_sync(functools.partial(
                saver.commit, snapshot.part, name=req.name, on_published=record))
            seconds = time.perf_counter() - started
            self.queue.release(job)
            self.reporter.emit(Written(req.step, req.name, result.nbytes, seconds))
            entry: IndexEntry = result.published
            if self._recorded is not None:  # rank 0 committed the index inside the commit
                before, victims = self._recorded
            else:
                with anyio.CancelScope(shield=True):
                    before, victims = await folder.commit(
                        entry, supersedes=req.supersedes, retention=self._retention,
                        series=self.config.series)
        except Exception as exc:
            self._failed(req, exc)
            return
        await self._committed(req, entry, before.best, victims)

    async def _record(self, req: Request, result: CommitResult) -> IndexEntry:
        """Rank 0, once the directory is in place: list it in the index (latest, best,
        rotation). What this raises fails the save on every rank."""
        manifest = next(f for f in result.files if f.name == MANIFEST_NAME)
        entry = IndexEntry(
            req.name, req.step, req.handle.epoch, req.wall, result.nbytes, manifest.checksum,
            req.metrics, (), req.keep, None, self.config.series,
            kind="dcp", world_size=result.world_size,
            files=tuple((f.name, f.size, f.checksum) for f in result.files),
        )
        with anyio.CancelScope(shield=True):
            self._recorded = await self.folder.commit(
                entry, supersedes=req.supersedes, retention=self._retention,
                series=self.config.series)
        return entry
