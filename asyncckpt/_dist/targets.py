"""Where a multi-rank save's files go, and how a finished checkpoint becomes visible.

The commit protocol is the same on every store (``saver.py``: write, agree, rank 0 writes
``.metadata`` and the manifest, rank 0 records the index entry, broadcast). What differs is
this seam, one :class:`SaveTarget` per save and rank::

                  shared filesystem (LocalLayout)         S3 (S3Layout, through S3Storage)
    write_file    .asyncckpt-tmp.<name>.<session>.<n>/    <name>/<file>: an object appears
                  <file>, fsynced                         only when its upload completes
    publish       rename to <name>, fsync the parent      nothing: the index entry rank 0
                                                          records next is the commit
    unpublish     move <name> aside, delete it            delete the objects under <name>/
    discard       each rank its file, rank 0 the dir      each rank the objects it wrote,
                                                          unless rank 0 may have listed them

and, when rank 0 opens the folder, :meth:`Layout.remove_leftovers`: temporary directories and
unlisted checkpoint directories (local), or folders holding checkpoint files that the index does
not list and the uploads in flight in folders (S3). Either way a checkpoint that the index does
not list does not exist for any reader.
"""

from __future__ import annotations

import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection
from typing import Any, BinaryIO, TypeVar

import anyio

from ..storage import S3Storage, Storage
from ..storage._produce import write_produced
from .files import (
    MANIFEST_NAME,
    METADATA_NAME,
    publish_dir,
    rank_file_name,
    remove_leftovers,
    remove_unlisted,
    temp_dir_name,
    unpublish_dir,
)

__all__ = ["Layout", "LocalLayout", "S3Layout", "SaveTarget", "create_file", "is_checkpoint_file",
           "layout_for"]

T = TypeVar("T")

#: what a rank's ``emit`` receives; the target writes it out
Produce = Callable[[Callable[[Any], None]], None]

_PART_FILE = re.compile(r"__\d+_\d+\.distcp")


def is_checkpoint_file(name: str) -> bool:
    """Whether ``name`` (relative to a checkpoint folder) is a file a multi-rank save writes."""
    return name in (METADATA_NAME, MANIFEST_NAME) or _PART_FILE.fullmatch(name) is not None


def create_file(path: str) -> BinaryIO:
    """Create a new file for writing (it must not exist)."""
    return open(path, "xb")  # noqa: SIM115 - closed by LocalTarget.write_file


class SaveTarget(ABC):
    """The files of one multi-rank save on one rank (see the module docstring).

    Attributes:
        location: where the committed checkpoint is (a path or a URI; DCP's checkpoint id).
        borrowing: whether :meth:`write_file` consumes each chunk before ``emit`` returns (the
            serializer may then pass views of buffers it reuses).
    """

    location: str
    borrowing: bool

    @abstractmethod
    def write_file(self, filename: str, produce: Produce) -> int:
        """Create ``filename`` (replacing one this save wrote before: a re-plan) with the bytes
        ``produce(emit)`` emits, durably; return the bytes stored. Blocking."""

    @abstractmethod
    def publish(self) -> None:
        """Rank 0, once every file is durable: make the checkpoint ready for its index entry."""

    @abstractmethod
    def unpublish(self) -> None:
        """Rank 0, when the index entry could not be recorded: take the checkpoint away."""

    @abstractmethod
    def discard(self, rank: int, *, recorded_maybe: bool) -> None:
        """After a failed save: remove what this rank wrote (best effort, never raises).

        ``recorded_maybe``: the ranks could not learn the outcome (a peer died while rank 0
        told them), so rank 0 may have listed the checkpoint: nothing it names may go.
        """


class Layout(ABC):
    """The checkpoint folder a multi-rank checkpointer saves into."""

    location: str

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Rank 0, before the first save: create what is missing. Blocking."""

    @abstractmethod
    def target(self, name: str, session: str, sequence: int) -> SaveTarget:
        """The files of save number ``sequence`` of checkpoint ``name``."""

    @abstractmethod
    async def remove_leftovers(self, listed: Collection[str]) -> list[str]:
        """Rank 0, when the folder is opened and no save runs: remove what unfinished saves
        left and checkpoints that nothing in ``listed`` names; return their names."""


# -- a filesystem every rank sees --------------------------------------------------------------


class LocalTarget(SaveTarget):
    borrowing = True

    def __init__(self, parent: str, name: str, temp: str,
                 open_file: Callable[[str], BinaryIO]) -> None:
        self.location = os.path.join(parent, name)
        self.temp = os.path.join(parent, temp)
        self._open_file = open_file

    def write_file(self, filename: str, produce: Produce) -> int:
        os.makedirs(self.temp, exist_ok=True)
        path = os.path.join(self.temp, filename)
        if os.path.exists(path):
            os.unlink(path)  # a rewrite after re-planning
        size = 0
        with self._open_file(path) as f:
            def emit(chunk: Any) -> None:
                nonlocal size
                size += f.write(chunk) or 0

            produce(emit)
            f.flush()
            os.fsync(f.fileno())
        return size

    def publish(self) -> None:
        publish_dir(self.temp, self.location)

    def unpublish(self) -> None:
        unpublish_dir(self.location)

    def discard(self, rank: int, *, recorded_maybe: bool) -> None:
        """Every rank removes its own file, rank 0 the whole directory: only the temporary
        directory, which a published checkpoint no longer is, whatever the outcome."""
        if rank == 0:
            shutil.rmtree(self.temp, ignore_errors=True)
            return
        try:
            os.unlink(os.path.join(self.temp, rank_file_name(rank)))
        except OSError:
            pass
        try:
            os.rmdir(self.temp)  # empty only if every other rank is done with it
        except OSError:
            pass


class LocalLayout(Layout):
    """Checkpoint directories in a folder on a filesystem every rank sees.

    Args:
        parent: the folder.
        open_file: how files are created (tests inject storage faults here).
    """

    def __init__(self, parent: str | os.PathLike[str], *,
                 open_file: Callable[[str], BinaryIO] = create_file) -> None:
        self.location = os.fspath(parent)
        self._open_file = open_file

    def prepare(self) -> None:
        os.makedirs(self.location, exist_ok=True)

    def target(self, name: str, session: str, sequence: int) -> SaveTarget:
        return LocalTarget(self.location, name, temp_dir_name(name, session, sequence),
                           self._open_file)

    async def remove_leftovers(self, listed: Collection[str]) -> list[str]:
        temps = await anyio.to_thread.run_sync(remove_leftovers, self.location)
        unlisted = await anyio.to_thread.run_sync(remove_unlisted, self.location, set(listed))
        return temps + unlisted


# -- S3 ----------------------------------------------------------------------------------------


class S3Target(SaveTarget):
    """One save's objects under ``<name>/``, written from the commit's worker thread through the
    storage's async API on the event loop that owns its client session (``token``)."""

    borrowing = False  # chunks wait in a queue for the upload: they must stay valid

    def __init__(self, storage: S3Storage, name: str, token: object) -> None:
        self.location = storage.uri_of(name)
        self._storage = storage
        self._name = name
        self._token = token
        self._written: dict[str, None] = {}  # keys this rank wrote (ordered, unique)
        self._checked = False

    def _run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return anyio.from_thread.run(fn, *args, token=self._token)  # type: ignore[arg-type]

    def write_file(self, filename: str, produce: Produce) -> int:
        if not self._checked:  # nothing committed is ever overwritten
            if self._run(self._storage.exists, f"{self._name}/{MANIFEST_NAME}"):
                raise FileExistsError(
                    f"{self.location} already holds a committed checkpoint; a committed "
                    "checkpoint is never overwritten (choose another name or delete it first)")
            self._checked = True
        key = f"{self._name}/{filename}"
        self._written[key] = None
        written, _ = self._run(write_produced, self._storage, key, produce)
        return written

    def publish(self) -> None:
        return None  # the index entry is the commit

    def unpublish(self) -> None:
        self._run(self._storage.delete, self._name)

    def discard(self, rank: int, *, recorded_maybe: bool) -> None:
        """Delete the objects this rank wrote, unless the checkpoint may be listed (then the
        next writer to open the folder removes them if it is not)."""
        if recorded_maybe:
            return
        for key in self._written:
            try:
                self._run(self._storage.delete, key)
            except Exception:  # noqa: S112 - the next writer to open the folder removes it
                continue


class S3Layout(Layout):
    """Checkpoint folders (``<name>/`` key prefixes) under an S3 prefix.

    Args:
        storage: the open storage of this rank.
        token: the event loop that owns the storage's client session (``anyio.lowlevel
            .current_token()`` there); the saver's worker threads call the storage on it.
    """

    def __init__(self, storage: S3Storage, token: object) -> None:
        self.location = storage.uri
        self.storage = storage
        self._token = token

    def target(self, name: str, session: str, sequence: int) -> SaveTarget:
        return S3Target(self.storage, name, self._token)

    async def remove_leftovers(self, listed: Collection[str]) -> list[str]:
        storage, keep = self.storage, set(listed)
        await storage.abort_uploads_in_folders()
        removed = []
        for folder in await storage.folders():
            if folder in keep:
                continue
            if any(is_checkpoint_file(f) for f in await storage.files_in(folder)):
                await storage.delete(folder)
                removed.append(folder)
        return removed


def layout_for(storage: Storage, token: object) -> Layout | None:
    """The layout for multi-rank checkpoints in ``storage``, or None where they cannot go."""
    if isinstance(storage, S3Storage):
        return S3Layout(storage, token)
    path = storage.local_path("probe")
    return None if path is None else LocalLayout(os.path.dirname(path))
