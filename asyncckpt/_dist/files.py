"""The layout of a multi-rank checkpoint, its files, and the local-filesystem steps that commit it.

A committed checkpoint is a directory that ``torch.distributed.checkpoint`` reads as is::

    <name>/
        __0_0.distcp        rank 0's items, one after the other
        __1_0.distcp        rank 1's items ...
        .metadata           DCP's pickled Metadata: every key's shape, dtype and chunks, and
                            where each chunk lives (file, offset, length); written last
        .asyncckpt.json     size and xxh3 checksum of every file above (our manifest)

Each item in a ``.distcp`` file is what DCP's ``FileSystemWriter`` writes for it: a tensor as
the ``torch.save`` archive of that tensor, a non-tensor value as the ``torch.save`` archive of
the value; ``FileSystemReader`` slices the file at the recorded offset and ``torch.load``\\ s
the slice. Tensors come first, in plan order, then the non-tensor values, so the tensors'
offsets stay the same from save to save even when a value's pickled size changes.

While a save runs, every rank writes into ``.asyncckpt-tmp.<name>.<session>.<n>/`` next to the
final directory (the same name on every rank, derived from the checkpoint group's session id
and the save counter, so no collective is needed to agree on it). Rank 0 renames it to
``<name>`` only after every rank reported its files durable; a crash leaves only the temporary
directory, which :func:`remove_leftovers` deletes. On S3 the same files are objects under
``<name>/`` and the index entry is the commit (``targets.py`` holds what differs per store).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .._errors import StorageError
from .._format.hashing import Hasher
from .._format.serialize import serialize
from .._snapshot.snapshot import Snapshot
from ..storage._dirs import (
    CHECKPOINT_MANIFEST,
    is_checkpoint_directory,
    remove_checkpoint_directory,
)

if TYPE_CHECKING:
    from .targets import SaveTarget

__all__ = [
    "MANIFEST_NAME",
    "METADATA_NAME",
    "TEMP_PREFIX",
    "FileRecord",
    "ItemLocation",
    "check_name",
    "fsync_dir",
    "publish_dir",
    "rank_file_name",
    "read_manifest",
    "remove_leftovers",
    "remove_unlisted",
    "temp_dir_name",
    "unpublish_dir",
    "write_manifest",
    "write_rank_file",
    "write_small_file",
]

METADATA_NAME = ".metadata"
MANIFEST_NAME = CHECKPOINT_MANIFEST
TEMP_PREFIX = ".asyncckpt-tmp."
_FORMAT = "asyncckpt-dcp/1"


@dataclass(frozen=True)
class FileRecord:
    """One file of a committed checkpoint: what the index and ``verify`` check."""

    name: str
    size: int
    checksum: str


@dataclass(frozen=True)
class ItemLocation:
    """Where one item landed in a rank's file."""

    offset: int
    length: int


def check_name(name: str) -> None:
    """ValueError unless ``name`` can name a checkpoint directory (and an S3 folder)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name \
            or os.sep in name or name.startswith("."):
        raise ValueError(
            f"checkpoint name {name!r} must be a non-empty directory name without '/' that does "
            "not start with '.'"
        )


def rank_file_name(rank: int) -> str:
    """The file a rank writes (DCP's own naming: prefix ``__<rank>_``, first file)."""
    return f"__{rank}_0.distcp"


def temp_dir_name(name: str, session: str, sequence: int) -> str:
    return f"{TEMP_PREFIX}{name}.{session}.{sequence}"


def write_rank_file(
    target: SaveTarget,
    rank: int,
    payloads: list[torch.Tensor | bytes],
    snapshot: Snapshot | None,
) -> tuple[FileRecord, list[ItemLocation]]:
    """Write ``payloads`` one after the other into this rank's file of ``target``, durably,
    and describe it.

    Args:
        target: where the save's files go.
        rank: the rank writing (names the file).
        payloads: host tensors (serialized as ``torch.save`` archives, zero-copy from the
            snapshot's arena) or ready ``torch.save`` bytes of non-tensor values.
        snapshot: the snapshot the tensors belong to (its memory ranges let the serializer
            pass tensor bytes to the file without copying them).

    Raises:
        StorageError: the store kept another number of bytes than were written.
    """
    hasher = Hasher()
    locations: list[ItemLocation] = []
    ranges = snapshot.ranges if snapshot is not None else []
    position = 0

    def produce(sink: Callable[[Any], None]) -> None:
        nonlocal position

        def emit(chunk: memoryview | bytearray) -> None:
            nonlocal position
            sink(chunk)
            hasher.update(chunk)
            position += len(chunk)

        for payload in payloads:
            start = position
            if isinstance(payload, bytes):
                emit(memoryview(payload))
            else:
                serialize(Snapshot(payload, payload.nbytes, {}, [], ranges, None), emit,
                          cpu_locations=True, borrowed=target.borrowing)
            locations.append(ItemLocation(start, position - start))

    name = rank_file_name(rank)
    _check_stored(target, name, target.write_file(name, produce), position)
    return FileRecord(name, position, hasher.hexdigest()), locations


def _check_stored(target: SaveTarget, name: str, stored: int, size: int) -> None:
    if stored != size:
        uri = f"{target.location}/{name}"
        raise StorageError(f"storage accepted {stored} of {size} bytes for {uri}", uri)


def fsync_dir(path: str) -> None:
    """Make a directory's entries (created, renamed files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_small_file(target: SaveTarget, name: str, data: bytes) -> FileRecord:
    """Write a small file of ``target`` (the metadata, the manifest) durably, and describe it."""
    _check_stored(target, name, target.write_file(name, lambda emit: emit(data)), len(data))
    hasher = Hasher()
    hasher.update(data)
    return FileRecord(name, len(data), hasher.hexdigest())


def write_manifest(target: SaveTarget, name: str, world_size: int,
                   files: list[FileRecord]) -> FileRecord:
    doc = {
        "format": _FORMAT,
        "name": name,
        "world_size": world_size,
        "files": {f.name: {"size": f.size, "checksum": f.checksum} for f in files},
    }
    return write_small_file(target, MANIFEST_NAME,
                            json.dumps(doc, indent=1, sort_keys=True).encode())


def read_manifest(directory: str) -> list[FileRecord]:
    """The files a committed checkpoint directory must hold, from its manifest.

    Raises:
        FileNotFoundError: ``directory`` has no manifest (not an asyncckpt multi-rank
            checkpoint, or not committed).
        ValueError: the manifest is malformed.
    """
    path = os.path.join(directory, MANIFEST_NAME)
    with open(path, "rb") as f:
        doc: Any = json.loads(f.read())
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise ValueError(f"{path}: not an asyncckpt multi-rank manifest")
    files = doc.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"{path}: 'files' must be an object")
    return [FileRecord(n, int(v["size"]), str(v["checksum"])) for n, v in sorted(files.items())]


def publish_dir(temp: str, final: str) -> None:
    """Rename a finished temporary directory into place and make the rename durable."""
    if os.path.lexists(final):
        raise FileExistsError(
            f"{final} already exists; a committed checkpoint is never overwritten (choose "
            "another name or delete it first)"
        )
    fsync_dir(temp)
    os.rename(temp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))


def unpublish_dir(final: str) -> None:
    """Take a just-published directory out of the folder again (its index entry could not be
    recorded): moved aside at once, then deleted."""
    remove_checkpoint_directory(final)


def remove_unlisted(parent: str, listed: set[str]) -> list[str]:
    """Delete committed-looking checkpoint directories that the index does not list; return
    their names.

    Rank 0 renames a directory into place before it records it in the index; a crash in
    between leaves a complete directory that nothing lists, whose name a resumed run may save
    again. Only directories holding our manifest are removed. Call it only when no save is
    running on ``parent`` (when a checkpointer opens it).
    """
    removed = []
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return []
    for entry in names:
        path = os.path.join(parent, entry)
        if entry.startswith(".") or entry in listed or not is_checkpoint_directory(path):
            continue
        remove_checkpoint_directory(path)
        removed.append(entry)
    return sorted(removed)


def remove_leftovers(parent: str) -> list[str]:
    """Delete the temporary directories of saves that never committed; return their names.

    Call it only when no save is running on ``parent`` (when a checkpointer opens it).
    """
    removed = []
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return []
    for entry in names:
        if entry.startswith(TEMP_PREFIX):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            removed.append(entry)
    return removed
