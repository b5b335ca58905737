"""``asyncckpt prune``: drop old checkpoints of a folder through its index, crash-safely.

A writer rotates only when it commits a new checkpoint, so pruning cannot borrow a
:class:`~asyncckpt.Checkpointer`; it follows the writer's own commit protocol instead::

    take the folder's writer lock ──▶ read the index ──▶ retention (keep_last per series)
        ──▶ publish the index without the victims, which move to ``pending_deletes``
        ──▶ delete their files ──▶ publish the index again, without ``pending_deletes``

A crash at any instant leaves either the old index (nothing deleted) or the new one, whose
``pending_deletes`` the next writer (or prune) finishes: a file is deleted only after the
published index stopped listing it, and every file the surviving index lists is still there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._core.folder import CheckpointFolder
from ._core.reading import run_sync
from ._errors import CheckpointError, CheckpointNotFoundError, StorageError
from ._format.best import BestMetric
from ._format.index import IndexState
from ._format.naming import INDEX_NAME
from ._format.retention import Retention
from .storage import Storage, storage_for

__all__ = ["PrunePlan", "plan_prune", "prune", "read_index"]

logger = logging.getLogger("asyncckpt")


@dataclass(frozen=True)
class PrunePlan:
    """What pruning a folder drops: the index after pruning and the names it no longer lists."""

    uri: str
    before: IndexState
    after: IndexState
    dropped: tuple[str, ...]


def _check_keep_last(keep_last: object) -> int:
    if isinstance(keep_last, bool) or not isinstance(keep_last, int):
        raise TypeError(f"keep_last must be an int, got {keep_last!r}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (the newest checkpoint is always kept), "
                         f"got {keep_last}")
    return keep_last


def _plan(index: IndexState, keep_last: int, uri: str) -> PrunePlan:
    """Apply ``keep_last`` to every series of ``index`` (rotation's own rule: the newest, the
    checkpoints best pointers name and those saved with ``keep=True`` are never dropped)."""
    retention = Retention(keep_last=keep_last)
    state, dropped = index, []
    for series in dict.fromkeys(e.series for e in index.entries):
        state, victims = state.rotated(retention, series)
        dropped.extend(victims)
    return PrunePlan(uri, index, state, tuple(dropped))


async def _read_index(storage: Storage) -> IndexState | None:
    return await CheckpointFolder(storage).read_index()


def _storage(source: Any, storage_options: Mapping[str, Any] | None) -> Storage:
    storage = storage_for(source, storage_options=storage_options)
    if storage.writer_token is not None:
        raise CheckpointError(
            f"{storage.uri} is the storage of an open checkpointer; prune the folder after "
            "closing it (a writer rotates its own folder with keep_last=)"
        )
    return storage


def read_index(
    source: str | os.PathLike[str] | Storage,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[str, IndexState]:
    """The folder's URI and its index, read without a lock.

    Raises:
        CheckpointNotFoundError: ``source`` is not a checkpoint folder.
        CorruptIndexError: its index cannot be read.
    """
    storage = _storage(source, storage_options)

    async def run() -> IndexState | None:
        await storage.open(writer=False)
        try:
            return await _read_index(storage)
        finally:
            await storage.aclose()

    index = run_sync(run)
    if index is None:
        raise CheckpointNotFoundError(f"{storage.uri} has no {INDEX_NAME}")
    return storage.uri, index


def plan_prune(
    source: str | os.PathLike[str] | Storage,
    keep_last: int,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> PrunePlan:
    """What :func:`prune` would drop now, without the lock and without changing anything.

    Raises:
        CheckpointNotFoundError: ``source`` is not a checkpoint folder.
        CorruptIndexError: its index cannot be read.
        TypeError, ValueError: ``keep_last`` is not an int >= 1.
    """
    keep_last = _check_keep_last(keep_last)
    uri, index = read_index(source, storage_options=storage_options)
    return _plan(index, keep_last, uri)


def prune(
    source: str | os.PathLike[str] | Storage,
    keep_last: int,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Keep the newest ``keep_last`` checkpoints of each series of a folder; delete the others.

    Checkpoints a best pointer names and those saved with ``keep=True`` are kept as well (as
    rotation keeps them). The index is published without the dropped entries before any file
    is deleted, so a crash leaves a consistent folder; deletions it did not finish are recorded
    in the index and finished by the next writer or prune (as are those a crashed writer left).

    Args:
        source: the checkpoint folder (path, URI or :class:`~asyncckpt.storage.Storage`).
        keep_last: how many of the newest checkpoints of each series to keep (>= 1).
        storage_options: backend options, as for :func:`asyncckpt.load`.

    Returns:
        The names dropped from the index, oldest first (empty when nothing was over the limit).

    Raises:
        CheckpointNotFoundError: ``source`` is not a checkpoint folder.
        CheckpointError: a writer holds the folder (local folders: its lock is held).
        CorruptIndexError: the index cannot be read; nothing is changed.
        StorageError: the index could not be written (nothing was deleted), or some files could
            not be deleted (the index no longer lists them; they stay recorded for deletion).
        TypeError, ValueError: ``keep_last`` is not an int >= 1.
    """
    keep_last = _check_keep_last(keep_last)
    # A missing folder must not be created by taking the writer lock: look first.
    plan_prune(source, keep_last, storage_options=storage_options)
    storage = _storage(source, storage_options)

    async def run() -> list[str]:
        await storage.open(writer=True)  # local folders: the writer lock, or CheckpointError
        try:
            index = await _read_index(storage)  # re-read under the lock: it is authoritative now
            if index is None:
                raise CheckpointNotFoundError(f"{storage.uri} has no {INDEX_NAME}")
            # The folder's own commit protocol, keeping every best pointer the index has.
            tracked = [BestMetric(r.metric, r.mode) for r in index.best.values()]
            folder = CheckpointFolder(storage, best=tracked)
            await folder.open_for_writing()
            plan = _plan(folder.index, keep_last, storage.uri)
            if plan.dropped:
                await folder.publish(plan.after)
            failed: list[str] = []
            await folder.delete_pending(lambda name, exc: failed.append(name))
            await folder.flush_index()
            if failed:
                raise StorageError(
                    f"{storage.uri}: the index no longer lists {', '.join(failed)}, but their "
                    "files could not be deleted; the next writer or prune deletes them",
                    storage.uri,
                )
            return list(plan.dropped)
        finally:
            await storage.aclose()

    return run_sync(run)
