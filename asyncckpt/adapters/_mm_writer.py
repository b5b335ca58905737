"""The mmengine hook's writer: one asyncckpt ``Checkpointer`` per checkpoint folder, opened at
the first save, with mmengine's ``last_checkpoint`` pointer following its commits.

One writer per folder and process: a run that failed leaves its hook's writer open (mmengine
calls no hook on the way out); a new run on the same folder in the same process (a notebook, a
sweep that retries) closes it first, which also commits what it still had queued. A hook that is
dropped without ``after_run`` (driven by hand) has its writer closed when it is collected or at
interpreter exit (:mod:`._mm_lifecycle`).
"""

from __future__ import annotations

import logging
import os.path as osp
import weakref
from dataclasses import replace
from functools import partial
from typing import Any

from asyncckpt import Checkpointer, CheckpointerConfig
from asyncckpt.storage import Storage, storage_for

from ._mm_lifecycle import close_when_forgotten
from ._mmengine_compat import is_uri, join_path
from ._pointers import PointerFile, close_writers, write_text_atomic

__all__ = ["HookWriter"]

logger = logging.getLogger("asyncckpt")

LAST_CHECKPOINT = "last_checkpoint"


class HookWriter:
    """The writer of one hook: where it writes, and the ``Checkpointer`` once it is open."""

    def __init__(self, config: CheckpointerConfig) -> None:
        self._config = config
        self.folder: str | None = None
        self.work_dir: str | None = None
        self.storage_options: dict[str, Any] = {}
        self.storage: Storage | None = None
        self._ckpt: Checkpointer | None = None
        self._pointer: PointerFile | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def checkpointer(self) -> Checkpointer | None:
        return self._ckpt

    def configure(self, folder: str, storage_options: dict[str, Any], work_dir: str) -> None:
        """Write to ``folder`` from now on (``last_checkpoint`` in ``work_dir``); a writer open
        on another folder is closed first (its failures are raised)."""
        moved = (folder, storage_options, work_dir) != (
            self.folder, self.storage_options, self.work_dir
        )
        if moved:
            self.close()
        if self._ckpt is None:
            # Validates the location now; the folder is created at the first save.
            self.storage = storage_for(folder, storage_options=storage_options)
        self.folder, self.storage_options, self.work_dir = folder, storage_options, work_dir

    def require_folder(self) -> str:
        if self.folder is None:
            raise RuntimeError(
                "AsyncCheckpointHook saves during training: before_train() sets the folder"
            )
        return self.folder

    def open(self) -> Checkpointer:
        """The folder's ``Checkpointer``, opened at the first call."""
        if self._ckpt is not None:
            return self._ckpt
        folder = self.require_folder()
        if self.storage is None:  # closed by after_run; runner.val() may save a best file
            self.storage = storage_for(folder, storage_options=self.storage_options)
        key = _folder_key(folder)
        previous = _writer_of(key)
        if previous is not None and previous is not self and previous._ckpt is not None:
            logger.warning("closing the checkpoint writer an earlier run left open on %s", folder)
            previous.close(quiet=True)
        pointer = None
        if self.work_dir is not None:
            pointer = PointerFile(
                partial(_write_last_checkpoint, osp.join(self.work_dir, LAST_CHECKPOINT), folder),
                LAST_CHECKPOINT,
            )
        # saved from the main process only (``master_only``): one writer, never collective
        ckpt = Checkpointer(self.storage, config=replace(self._config, distributed=False),
                            observers=[pointer] if pointer is not None else [])
        self._ckpt, self._pointer = ckpt, pointer
        self._finalizer = close_when_forgotten(
            self, partial(_close, ckpt, pointer), f"AsyncCheckpointHook writing to {folder}"
        )
        _OPEN_WRITERS[key] = weakref.ref(self)
        return ckpt

    def follow(self, name: str) -> None:
        """``last_checkpoint`` names ``name`` once a save of it commits (call before saving)."""
        if self._pointer is not None:
            self._pointer.follow(name)

    def check(self) -> None:
        """Raise a failure to write ``last_checkpoint``."""
        if self._pointer is not None:
            self._pointer.check()

    def flush(self) -> None:
        """Wait until everything queued is written and ``last_checkpoint`` names the newest."""
        if self._ckpt is not None:
            self._ckpt.flush()
        if self._pointer is not None:
            self._pointer.wait()
            self._pointer.check()

    def close(self, quiet: bool = False) -> None:
        """Drain and close the writer (if open). ``quiet``: log its failures, don't raise."""
        ckpt, pointer = self._ckpt, self._pointer
        self._ckpt = self._pointer = self.storage = None
        if ckpt is None:
            return
        if self._finalizer is not None:
            self._finalizer.detach()
        key = _folder_key(self.require_folder())
        if _writer_of(key) is self:
            del _OPEN_WRITERS[key]
        try:
            _close(ckpt, pointer)
        except Exception:
            if not quiet:
                raise
            logger.exception("closing the checkpoint writer failed")


def _close(ckpt: Checkpointer, pointer: PointerFile | None) -> None:
    """Close the writer, then the pointer; raise the first failure."""
    close_writers([(ckpt, pointer)])


def _write_last_checkpoint(path: str, folder: str, name: str) -> None:
    write_text_atomic(path, join_path(folder, name))


#: checkpoint folder -> the writer holding it (one writer per folder and process)
_OPEN_WRITERS: dict[str, weakref.ref[HookWriter]] = {}


def _writer_of(key: str) -> HookWriter | None:
    ref = _OPEN_WRITERS.get(key)
    return ref() if ref is not None else None


def _folder_key(folder: str) -> str:
    return folder if is_uri(folder) else osp.abspath(folder)
