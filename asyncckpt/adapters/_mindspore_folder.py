"""Where ``ModelCheckpoint`` files go: MindSpore's prefix rules and one writer per folder.

Several ``ModelCheckpoint`` callbacks may save into one folder during one run (a common set-up:
one every N steps, one per epoch), each under its own prefix, each with its own rotation. An
asyncckpt folder takes one writer at a time (its lock, and the index the writer owns), so the
callbacks of one process share a :class:`SharedFolder`, which hands the folder's writer to
whichever prefix saves next::

    ModelCheckpoint("step") ──┐                          ┌─ Checkpointer(series="step", ...)
                              ├─ SharedFolder(dir) ──────┤        (one open at a time)
    ModelCheckpoint("epoch") ─┘   lock-protected         └─ Checkpointer(series="epoch", ...)

Handing over drains the previous prefix's queue first, so each prefix's saves are committed in
order and its rotation sees an index no other writer is changing.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .._core.sync import Checkpointer, SyncSaveHandle
from .._format.crypto import Encryption
from ..storage import Storage

__all__ = ["FOLDERS", "FolderRegistry", "SeriesSettings", "SharedFolder", "next_free_prefix",
           "series_name"]

_BREAKPOINT = "_breakpoint.ckpt"


def next_free_prefix(names: Iterable[str], prefix: str, *, breakpoints: bool = False) -> str:
    """MindSpore 2.10's rule for a prefix the folder already uses.

    Regular checkpoints count ``.ckpt`` and ``.safetensors`` files other than breakpoints;
    ``breakpoints=True`` counts only ``*_breakpoint.ckpt`` files (the prefix of a breakpoint).
    ``CKP-1_1.ckpt`` makes ``CKP`` become ``CKP_1``; ``CKP_3-1_1.ckpt`` makes it ``CKP_4`` (the
    largest suffix plus one). Names whose character after the prefix is a letter (``CKPX-...``)
    belong to another prefix.
    """
    suffix = 0
    n = len(prefix)
    for name in names:
        is_breakpoint = name.endswith(_BREAKPOINT)
        if breakpoints != is_breakpoint:
            continue
        if not breakpoints and not name.endswith((".ckpt", ".safetensors")):
            continue
        if not name.startswith(prefix) or len(name) <= n or name[n].isalpha():
            continue
        rest = name[n:]
        dash = rest.find("-")
        if dash == 0:
            suffix = max(suffix, 1)
        elif dash > 0 and rest[1:dash].isdigit():
            suffix = max(suffix, int(rest[1:dash]) + 1)
    return prefix if suffix == 0 else f"{prefix}_{suffix}"


def series_name(prefix: str) -> str:
    """The index series of a prefix: the prefix itself, unless the index cannot hold it as a
    series name (empty, or over 200 characters): then a name derived from its digest."""
    if 1 <= len(prefix) <= 200:
        return prefix
    return "mindspore-prefix-" + hashlib.sha256(prefix.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class SeriesSettings:
    """How one prefix's checkpoints are written and rotated."""

    series: str
    keep_last: int | None
    keep_every_n_minutes: int | None
    encryption: Encryption | None
    torch_crc32: bool
    clock: Callable[[], float]


class SharedFolder:
    """One folder's writer, handed between the prefixes that save into it (thread-safe).

    Args:
        storage: the folder.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._lock = threading.RLock()
        self._writer: Checkpointer | None = None
        self._owner: SeriesSettings | None = None

    def names(self) -> list[str]:
        """The folder's file names."""
        from .._core.load import run_sync

        return run_sync(self.storage.list)

    def save(self, settings: SeriesSettings, state: Any, *, step: int, epoch: int, name: str,
             keep: bool = False) -> SyncSaveHandle:
        """Queue ``state`` as ``name`` in ``settings``' series (handing the writer over first).

        Raises:
            WriterError: a save failed (this one's series, or the one handed over from).
        """
        with self._lock:
            return self._writer_for(settings).save(state, step=step, epoch=epoch, name=name,
                                                   keep=keep)

    def flush(self, settings: SeriesSettings) -> None:
        """Wait until ``settings``' queued saves are committed (nothing to do if not open)."""
        with self._lock:
            if self._owner is settings and self._writer is not None:
                self._writer.flush()

    def release(self, settings: SeriesSettings) -> None:
        """Close the writer if ``settings`` holds it, waiting for its queued saves.

        Raises:
            WriterError: a queued save failed.
        """
        with self._lock:
            if self._owner is settings:
                self._close()

    def _close(self) -> None:
        writer, self._writer, self._owner = self._writer, None, None
        if writer is not None:
            writer.close()

    def _writer_for(self, settings: SeriesSettings) -> Checkpointer:
        if self._owner is not settings or self._writer is None:
            self._close()
            self._writer = Checkpointer(
                self.storage,
                keep_last=settings.keep_last,
                keep_every_n_minutes=settings.keep_every_n_minutes,
                series=settings.series,
                encryption=settings.encryption,
                torch_crc32=settings.torch_crc32,
                last_checkpoint=False,
                clock=settings.clock,
                distributed=False,  # one writer per folder, as MindSpore saves per rank
            )
            self._owner = settings
        return self._writer


class FolderRegistry:
    """The :class:`SharedFolder` of every folder that ``ModelCheckpoint`` callbacks use.

    This is process-wide on purpose: callbacks are built independently by user code (MindSpore's
    API passes nothing between them), and the only thing two callbacks saving into one folder
    have in common is the folder. Entries are weak, so a folder's entry goes away with the last
    callback holding it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._folders: weakref.WeakValueDictionary[str, SharedFolder] = (
            weakref.WeakValueDictionary()
        )

    def folder(self, storage: Storage) -> SharedFolder:
        """The shared writer of ``storage``'s folder (created on first use)."""
        with self._lock:
            shared = self._folders.get(storage.uri)
            if shared is None:
                shared = SharedFolder(storage)
                self._folders[storage.uri] = shared
            return shared


#: The one registry (see :class:`FolderRegistry` for why it is process-wide).
FOLDERS = FolderRegistry()
