"""Reading multi-rank checkpoints (index entries of kind ``"dcp"``): the readers' side.

The index records every file of such a checkpoint (name, size, checksum); these functions check
the directory (or, on S3, the objects under ``<name>/``) against those records before DCP reads
it (its filesystem reader, or its fsspec reader on S3), so a file changed after the commit is
refused, as for single files. ``torch.distributed.checkpoint`` is imported only when a
multi-rank checkpoint is actually read.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from contextlib import aclosing
from typing import Any

import anyio

from .._errors import CheckpointError, CheckpointNotFoundError, IntegrityError, StorageError
from .._format.hashing import Hasher
from .._format.index import IndexEntry
from ..storage import S3Storage, Storage, storage_for
from ..storage._limits import ObjectTooLargeError
from .folder import select_entry
from .reading import close_reader, describe, open_reader, open_target, run_sync

__all__ = ["checkpoint_location", "directory_problem", "load_directory", "load_into"]

#: a collective ``load_into`` waits this long for the other ranks (seconds)
LOAD_TIMEOUT = 300.0

_MISSING = "missing"


def checkpoint_location(storage: Storage, entry: IndexEntry) -> str:
    """Where a multi-rank checkpoint is: its local path, or its URI on S3.

    Raises:
        CheckpointError: the folder is on another store (multi-rank checkpoints are read from
            a filesystem path or from S3).
    """
    if isinstance(storage, S3Storage):
        return storage.uri_of(entry.name)
    path = storage.local_path(entry.name)
    if path is None:
        raise CheckpointError(
            f"{storage.uri_of(entry.name)} is a multi-rank checkpoint; these are read from a "
            "filesystem path or from s3:// only"
        )
    return path


def s3_reader(storage: S3Storage, location: str) -> Any:
    """DCP's fsspec reader of a multi-rank checkpoint on S3, with the storage's s3fs options."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(location, **storage.storage_options)


def _problems(directory: str, entry: IndexEntry, share: slice = slice(None)) -> list[str]:
    from .._dist.files import FileRecord
    from .._dist.load import check_file

    records = [FileRecord(*f) for f in entry.files][share]
    return [p for r in records if (p := check_file(directory, r)) is not None]


async def s3_problems(storage: S3Storage, entry: IndexEntry,
                      share: slice = slice(None)) -> list[str]:
    """What differs between the objects of a multi-rank checkpoint on S3 and the index's
    records of its files (``share``: which of them to read); a missing object's problem ends
    with ``missing``."""
    problems = []
    for name, size, checksum in list(entry.files)[share]:
        key = f"{entry.name}/{name}"
        uri = storage.uri_of(key)
        hasher, found = Hasher(), 0
        try:
            stream = storage.read_stream(key, max_bytes=size)
            async with aclosing(stream):  # type: ignore[type-var]
                async for chunk in stream:
                    await anyio.to_thread.run_sync(hasher.update, chunk)
                    found += len(chunk)
        except FileNotFoundError:
            problems.append(f"{uri}: {_MISSING}")
            continue
        except ObjectTooLargeError:
            problems.append(f"{uri}: more than the {size} bytes the index recorded")
            continue
        except StorageError as exc:
            problems.append(f"{uri}: {exc}")
            continue
        if found != size:
            problems.append(f"{uri}: {found} bytes, the index records {size}")
        elif hasher.hexdigest() != checksum:
            problems.append(f"{uri}: checksum {hasher.hexdigest()} does not match {checksum}")
    return problems


async def directory_problem(storage: Storage, entry: IndexEntry,
                            load: bool) -> tuple[str, str] | None:
    """``(kind, message)`` of what is wrong with a listed multi-rank checkpoint, or None.

    ``kind`` is ``"missing"`` (no directory, or on S3 none of its objects), ``"checksum"`` (a
    file differs from the index's record: size, checksum, or absent) or ``"unreadable"`` (not
    on a filesystem or S3, or, with ``load``, DCP could not read it).
    """
    if not isinstance(storage, S3Storage):
        return await anyio.to_thread.run_sync(_local_problem, storage, entry, load)
    location = checkpoint_location(storage, entry)
    problems = await s3_problems(storage, entry)
    if problems and len(problems) == len(entry.files) \
            and all(p.endswith(f": {_MISSING}") for p in problems):
        return "missing", f"{location} is listed but missing"
    if problems:
        return "checksum", "; ".join(problems)
    if load:
        from .._dist.load import load_full

        try:
            await anyio.to_thread.run_sync(functools.partial(
                load_full, location, verify=False, reader=s3_reader(storage, location)))
        except Exception as exc:
            return "unreadable", f"{location}: {type(exc).__name__}: {exc}"
    return None


def _local_problem(storage: Storage, entry: IndexEntry, load: bool) -> tuple[str, str] | None:
    try:
        directory = checkpoint_location(storage, entry)
    except CheckpointError as exc:
        return "unreadable", str(exc)
    if not os.path.isdir(directory) or os.path.islink(directory):
        if not os.path.lexists(directory):
            return "missing", f"{directory} is listed but missing"
        return "unreadable", f"{directory} is listed as a multi-rank checkpoint, not a directory"
    problems = _problems(directory, entry)
    if problems:
        return "checksum", "; ".join(problems)
    if load:
        from .._dist.load import load_full

        try:
            load_full(directory, verify=False)
        except Exception as exc:
            return "unreadable", f"{directory}: {type(exc).__name__}: {exc}"
    return None


async def load_directory(storage: Storage, entry: IndexEntry, *,
                         verify: bool) -> dict[str, Any]:
    """The full state of a multi-rank checkpoint in this process (tensors unsharded).

    Raises:
        IntegrityError: a file differs from what the index recorded.
    """
    from .._dist.load import load_full

    location = checkpoint_location(storage, entry)
    reader = None
    if isinstance(storage, S3Storage):
        problems = await s3_problems(storage, entry) if verify else []
        reader = s3_reader(storage, location)
    elif verify:
        problems = await anyio.to_thread.run_sync(_problems, location, entry)
    else:
        problems = []
    if problems:
        raise IntegrityError("checkpoint failed verification: " + "; ".join(problems),
                             kind="checksum", uri=location)
    return await anyio.to_thread.run_sync(functools.partial(
        load_full, location, verify=False, reader=reader))


def _choose(source: Any, which: object,
            storage_options: Mapping[str, Any] | None) -> tuple[str, str, IndexEntry]:
    """(folder, checkpoint location, entry) of the checkpoint ``which`` names."""
    async def run() -> tuple[str, str, IndexEntry]:
        target = await open_target(source, storage_options)
        try:
            if target.index is None:
                raise CheckpointNotFoundError(f"{describe(source)} is not a checkpoint folder")
            if target.name is not None:
                entry = target.index.get(target.name)
                if entry is None:
                    raise CheckpointNotFoundError(
                        f"{describe(source)} is not listed in its folder's index")
            else:
                entry = select_entry(target.index, which, target.storage.uri)
            if entry.kind is None:
                raise CheckpointError(
                    f"{target.storage.uri_of(entry.name)} is a single-file checkpoint; "
                    "load it with asyncckpt.load() and load_state_dict()"
                )
            return (target.storage.uri, checkpoint_location(target.storage, entry), entry)
        finally:
            await target.close()

    return run_sync(run, source)


def _s3_storage(source: Any, folder: str,
                storage_options: Mapping[str, Any] | None) -> S3Storage | None:
    """This rank's S3 storage of the chosen folder, or None when it is not on S3."""
    if isinstance(source, S3Storage):
        return source
    if not folder.startswith(("s3://", "s3a://")):
        return None
    storage = storage_for(folder, storage_options=storage_options)
    return storage if isinstance(storage, S3Storage) else None


def _verify_s3(storage: S3Storage, entry: IndexEntry, share: slice) -> list[str]:
    async def run() -> list[str]:
        opened = await open_reader(storage)
        try:
            return await s3_problems(storage, entry, share)
        finally:
            await close_reader(storage, opened)

    return run_sync(run, storage)


def load_into(
    state: dict[str, Any],
    source: str | os.PathLike[str] | Storage,
    which: str | int = "latest",
    *,
    verify: bool = True,
    process_group: Any = None,
    timeout: float = LOAD_TIMEOUT,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Load a multi-rank checkpoint into ``state`` in place; collective under torch.distributed.

    Every rank calls it with its own ``state`` (modules, optimizers, tensors, DTensors, nested
    dicts), shaped and sharded for the current run: DCP reshards what was saved at any world
    size (saved on 4 ranks, loaded on 2 or 1, or the other way). Rank 0 chooses the
    checkpoint (``which``: ``"latest"``, ``"best:<metric>"``, a step or a name) and tells the
    others, so every rank loads the same one even while a writer adds checkpoints.

    Args:
        state: the dict to fill (values replaced; modules and optimizers loaded through
            ``load_state_dict``).
        source: the checkpoint folder, or one checkpoint directory in it.
        which: which checkpoint of the folder.
        verify: check every file against the sizes and checksums the index recorded (the
            work is split over the ranks).
        process_group: the ranks that load (default: every rank of torch.distributed).
        timeout: seconds the ranks wait for each other.

    Raises:
        CheckpointNotFoundError: nothing matches ``source`` / ``which``.
        CheckpointError: the checkpoint is a single file, or rank 0 could not read the index.
        IntegrityError: a file differs from what the index recorded.
        TypeError: ``state`` is not a dict.
    """
    import torch.distributed as dist

    from .._dist import CheckpointGroup
    from .._dist import load_into as dcp_load_into

    if not isinstance(state, dict):
        raise TypeError(f"load_into fills a dict in place, got {type(state).__qualname__}")
    collective = dist.is_available() and dist.is_initialized() and (
        process_group is not None or dist.get_world_size() > 1)
    group = CheckpointGroup(timeout, ranks_of=process_group) if collective else None
    try:
        chosen: tuple[str | None, str | None, IndexEntry | None, tuple[str, str] | None]
        failure: Exception | None = None
        if group is None or group.rank == 0:
            try:
                chosen = (*_choose(source, which, storage_options), None)
            except Exception as exc:
                failure = exc
                chosen = (None, None, None, (type(exc).__name__, str(exc)))
        if group is not None:
            chosen = group.broadcast(chosen if group.rank == 0 else None,
                                     what=f"choose the checkpoint to load from {source}")
        if failure is not None:
            raise failure
        folder, directory, entry, error = chosen
        if error is not None or folder is None or directory is None or entry is None:
            kind, message = error or ("CheckpointError", "no checkpoint chosen")
            cls = CheckpointNotFoundError if kind == "CheckpointNotFoundError" else CheckpointError
            raise cls(f"rank 0 could not choose a checkpoint: {message}")
        s3 = _s3_storage(source, folder, storage_options)
        if verify:
            share = slice(None) if group is None else slice(group.rank, None, group.world_size)
            problems = _problems(directory, entry, share) if s3 is None \
                else _verify_s3(s3, entry, share)
            if group is not None:
                problems = [p for ps in group.all_gather(problems, what=f"verify {directory}")
                            for p in ps]
            if problems:
                raise IntegrityError("checkpoint failed verification: " + "; ".join(problems),
                                     kind="checksum", uri=directory)
        dcp_load_into(state, directory, group=group, verify=False,
                      reader=None if s3 is None else s3_reader(s3, directory))
    finally:
        if group is not None and group.broken is None:
            group.destroy()
