"""Pointer files next to checkpoints (mmengine's ``last_checkpoint``, mmcv's ``latest.pth``).

A pointer may only name a checkpoint that is committed, and it is replaced atomically, so a crash
leaves either the previous pointer or the new one, each naming a complete checkpoint. The training
thread updates pointers when it next calls into the adapter (no waiting, no work on the writer's
event loop): :class:`CommitTracker` says which of the saves it was given committed last.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Generic, Literal, TypeVar

from .._sync import SyncSaveHandle

__all__ = ["CommitTracker", "link_atomic", "write_text_atomic"]

T = TypeVar("T")


class CommitTracker(Generic[T]):
    """Saves in the order they were made, each with a payload (e.g. the path a pointer names)."""

    def __init__(self) -> None:
        self._pending: deque[tuple[SyncSaveHandle, T]] = deque()

    def add(self, handle: SyncSaveHandle, payload: T) -> None:
        self._pending.append((handle, payload))

    def __len__(self) -> int:
        return len(self._pending)

    def newest_committed(self) -> T | None:
        """Forget the saves that are resolved (oldest first, without waiting); return the payload
        of the newest of them that committed, or None if none did."""
        newest: T | None = None
        while self._pending and self._pending[0][0].done():
            handle, payload = self._pending.popleft()
            if handle.status == "committed":
                newest = payload
        return newest


@contextmanager
def _replacing(path: str) -> Iterator[str]:
    """Yield a temporary name next to ``path``; once the block made it, rename it over ``path``
    (atomic). If the block fails, the temporary is removed and ``path`` is untouched."""
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text_atomic(path: str, text: str) -> None:
    """Replace the file at ``path`` with ``text``: written, fsynced, then renamed over it."""
    with _replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def link_atomic(target_name: str, path: str) -> Literal["symlink", "copy"]:
    """Point ``path`` at ``target_name`` (a file in the same folder), replacing it atomically.

    A relative symlink where the filesystem supports them, otherwise a copy of the file (what
    mmcv does on Windows).

    Returns:
        Which of the two was made.
    """
    with _replacing(path) as tmp:
        try:
            os.symlink(target_name, tmp)
            return "symlink"
        except (OSError, NotImplementedError):
            shutil.copyfile(os.path.join(os.path.dirname(path), target_name), tmp)
            return "copy"
