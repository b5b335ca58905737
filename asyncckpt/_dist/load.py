"""Reading multi-rank checkpoints: verify our checksums, then let DCP do the resharding.

``load_into`` is collective and in place, at any world size: DCP's ``load`` matches the
chunks recorded in ``.metadata`` against the shards the current state asks for (save on 4
ranks, load on 2 or 1, DTensor or plain tensors). ``load_full`` runs in one process and
assembles full tensors, as ``dcp_to_torch_save`` does. Both verify every file against the
manifest first (split over the ranks when collective) and read non-tensor values with
``torch.load(weights_only=True)`` -- DCP's default reader unpickles them without restriction.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    _EmptyStateDictLoadPlanner,
)
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
from torch.distributed.checkpoint.storage import StorageReader

from .._errors import IntegrityError
from .._format.hashing import Hasher
from .files import FileRecord, read_manifest
from .group import CheckpointGroup

__all__ = ["check_file", "load_full", "load_into", "verify_directory"]

_READ_CHUNK = 8 << 20


class _WeightsOnly:
    """Mixin: non-tensor values are read with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as exc:
            raise IntegrityError(
                f"the value {fqn!r} cannot be read with torch.load(weights_only=True): {exc}"
            ) from exc
        if self.flatten_state_dict:  # type: ignore[attr-defined]
            set_element(self.original_state_dict, self.mappings[fqn], obj)  # type: ignore[attr-defined]
        else:
            self.state_dict[fqn] = obj  # type: ignore[attr-defined]


class _LoadPlanner(_WeightsOnly, DefaultLoadPlanner):
    pass


class _FullLoadPlanner(_WeightsOnly, _EmptyStateDictLoadPlanner):
    pass


def check_file(directory: str, record: FileRecord) -> str | None:
    path = os.path.join(directory, record.name)
    hasher = Hasher()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
    except OSError as exc:
        return f"{path}: {exc}"
    if size != record.size:
        return f"{path}: {size} bytes, the manifest records {record.size}"
    if hasher.hexdigest() != record.checksum:
        return f"{path}: checksum {hasher.hexdigest()} does not match {record.checksum}"
    return None


def verify_directory(directory: str | os.PathLike[str], *,
                     group: CheckpointGroup | None = None) -> list[FileRecord]:
    """Check every file of a committed checkpoint against its manifest.

    With ``group``, collective: each rank hashes a share of the files and every rank gets the
    same verdict.

    Raises:
        IntegrityError: a file is missing, has the wrong size or the wrong checksum.
        FileNotFoundError: ``directory`` holds no manifest.
    """
    directory = os.fspath(directory)
    records = read_manifest(directory)
    if group is None:
        problems = [p for r in records if (p := check_file(directory, r)) is not None]
    else:
        mine = records[group.rank::group.world_size]
        local = [p for r in mine if (p := check_file(directory, r)) is not None]
        gathered = group.all_gather(local, what=f"verify {directory}")
        problems = [p for ps in gathered for p in ps]
    if problems:
        raise IntegrityError("checkpoint failed verification: " + "; ".join(problems))
    return records


def load_into(state: dict[str, Any], directory: str | os.PathLike[str], *,
              group: CheckpointGroup | None = None, verify: bool = True,
              reader: StorageReader | None = None) -> None:
    """Load a multi-rank checkpoint into ``state`` in place (collective, any world size).

    ``state`` is what DCP's ``load`` takes: a dict whose values are tensors, DTensors, nested
    dicts or objects with ``state_dict()`` / ``load_state_dict()`` (modules, optimizers).

    Args:
        state: the state to fill, with the shapes and shardings of the current run.
        directory: a committed checkpoint directory.
        group: the checkpoint process group; when torch.distributed runs with several ranks
            and none is given, a temporary one is created (collectively) and destroyed.
        verify: check every file's checksum first (a local directory only).
        reader: DCP's reader of the checkpoint (default: the local directory's); the caller
            verified a checkpoint read through another one.
    """
    if not isinstance(state, dict):
        raise TypeError(
            f"load_into fills a dict in place (values replaced, modules and optimizers loaded "
            f"through load_state_dict), got {type(state).__qualname__}"
        )
    directory = os.fspath(directory)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    own = group is None and distributed
    if own:
        group = CheckpointGroup()
    try:
        if verify and reader is None:
            verify_directory(directory, group=group)
        where: dict[str, Any] = {"checkpoint_id": directory} if reader is None \
            else {"storage_reader": reader}
        if distributed and group is not None:
            dcp.load(state, planner=_LoadPlanner(), process_group=group.pg, **where)
        else:
            dcp.load(state, planner=_LoadPlanner(), no_dist=True, **where)
    finally:
        if own and group is not None:
            group.destroy()


def load_full(directory: str | os.PathLike[str], *, verify: bool = True,
              reader: StorageReader | None = None) -> dict[str, Any]:
    """The whole state of a multi-rank checkpoint, with full (unsharded) tensors, in this
    process alone (no collective).

    Args:
        directory: a committed checkpoint directory.
        verify: check every file's checksum first (a local directory only).
        reader: DCP's reader of the checkpoint (default: the local directory's); the caller
            verified a checkpoint read through another one.
    """
    directory = os.fspath(directory)
    if verify and reader is None:
        verify_directory(directory)
    state: dict[str, Any] = {}
    # the internal entry point, as dcp_to_torch_save uses: dcp.load() would fill a copy
    _load_state_dict(state, storage_reader=reader or FileSystemReader(directory),
                     planner=_FullLoadPlanner(), no_dist=True)
    return state
