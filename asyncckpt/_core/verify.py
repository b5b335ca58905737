"""``verify()``: check every checkpoint a folder lists, collecting problems instead of stopping.

A folder a live writer rotates is verified consistently: a listed file that is gone is looked
up again in a fresh index, and one the writer rotated away meanwhile is reported as such
(``VerifyReport.rotated``), not as missing.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import torch

from .._errors import CheckpointError, CheckpointNotFoundError, IntegrityError
from .._format.index import IndexEntry
from .._format.naming import INDEX_NAME, TMP_PREFIX
from ..storage import Storage, storage_for
from .dist_read import directory_problem
from .folder import CheckpointFolder
from .reading import close_reader, open_reader, read_index, run_sync

__all__ = ["Problem", "VerifyReport", "verify"]

ProblemKind = Literal["index", "missing", "size", "checksum", "unreadable"]


@dataclass(frozen=True)
class Problem:
    """Something :func:`verify` found wrong.

    Attributes:
        kind: ``"index"`` (unreadable index), ``"missing"`` (listed file absent), ``"size"`` /
            ``"checksum"`` (bytes differ from what was committed), ``"unreadable"`` (the entry
            cannot be read at all -- e.g. a folder or a FIFO where a file is listed -- or, with
            ``load=True``, torch.load failed).
        name: the checkpoint concerned (None for the index).
        message: a human-readable explanation.
    """

    kind: ProblemKind
    name: str | None
    message: str


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify`."""

    uri: str
    checked: tuple[str, ...]
    problems: tuple[Problem, ...]
    #: temporary files of a writer that did not finish (harmless; removed when a writer opens)
    leftovers: tuple[str, ...] = ()
    #: listed when the index was read, then rotated away by a live writer (not a problem)
    rotated: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    source: str | os.PathLike[str] | Storage,
    *,
    load: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Check every checkpoint a folder's index lists against its recorded size and checksum.

    Args:
        source: the checkpoint folder.
        load: also ``torch.load(weights_only=True)`` each checkpoint (slower; catches files
            that verify but do not unpickle, e.g. written by an incompatible torch).

    Returns:
        A report; ``report.ok`` is False when anything is wrong. Problems are collected, not
        raised, so one bad file does not hide the others.

    Raises:
        CheckpointNotFoundError: ``source`` is not a checkpoint folder at all.
    """

    async def run() -> VerifyReport:
        storage = storage_for(source, storage_options=storage_options)
        opened = await open_reader(storage)
        try:
            names = await storage.list()
            leftovers = tuple(n for n in names if n.startswith(TMP_PREFIX))
            try:
                index = await read_index(storage)
            except CheckpointError as exc:
                unreadable = Problem("index", None, str(exc))
                return VerifyReport(storage.uri, (), (unreadable,), leftovers)
            if index is None:
                raise CheckpointNotFoundError(f"{storage.uri} has no {INDEX_NAME}")
            problems: list[Problem] = []
            rotated: list[str] = []
            for entry in index.entries:
                problem = await _check_entry(storage, entry, load)
                if problem is not None and problem.kind == "missing":
                    fresh = await read_index(storage)
                    if fresh is None or fresh.get(entry.name) != entry:
                        rotated.append(entry.name)
                        continue
                if problem is not None:
                    problems.append(problem)
            checked = tuple(e.name for e in index.entries if e.name not in rotated)
            return VerifyReport(storage.uri, checked, tuple(problems), leftovers, tuple(rotated))
        finally:
            await close_reader(storage, opened)

    return run_sync(run, source)


async def _check_entry(storage: Storage, entry: IndexEntry, load: bool) -> Problem | None:
    uri = storage.uri_of(entry.name)
    if entry.kind is not None:  # a multi-rank checkpoint: every file against the index
        found = await directory_problem(storage, entry, load)
        return None if found is None else Problem(found[0], entry.name, found[1])  # type: ignore[arg-type]
    try:
        await CheckpointFolder(storage).check(entry)
    except FileNotFoundError:
        return Problem("missing", entry.name, f"{uri} is listed but missing")
    except IntegrityError as exc:
        kind: ProblemKind = "size" if exc.kind == "size" else "checksum"
        return Problem(kind, entry.name, str(exc))
    except (OSError, CheckpointError) as exc:  # a folder, a FIFO, a storage failure
        return Problem("unreadable", entry.name, f"{uri} cannot be read: {exc}")
    if load and entry.encryption is None:  # encrypted ones need a key to load
        try:
            path = storage.local_path(entry.name)
            if path is None:
                data: Any = io.BytesIO(await storage.read_bytes(entry.name))
            else:
                data = path
            await anyio.to_thread.run_sync(_load_on_cpu, data)
        except Exception as exc:
            return Problem("unreadable", entry.name, f"{uri}: {exc}")
    return None


def _load_on_cpu(data: Any) -> None:
    torch.load(data, map_location="cpu", weights_only=True)
