"""Pointer files next to checkpoints (mmengine's ``last_checkpoint``, mmcv's ``latest.pth``).

A pointer names only committed checkpoints and is replaced atomically, so a crash leaves either
the previous pointer or the new one. :class:`PointerFile` is an observer of the writer: when a
checkpoint it follows commits, it asks its own worker thread to move the pointer, so the
writer's event loop never waits on the file system for it::

    training thread   follow(name) ─ save(...)
    writer's loop     commit ─ Committed ──▶ target := name, wake the worker (no I/O here)
                             ─ Rotated   ──▶ the pointer names a victim? wait for the worker
                             ─ delete the victims
    pointer worker    write the newest target (tmp + rename); failures kept for the caller

Rotation deletes files right after the commit that dropped them. A pointer naming one of them is
moved (to the new target, or to the checkpoint just committed) before the ``Rotated`` observer
returns, so it never names a deleted file; that is the only case in which the loop waits.
Failures to write the pointer are raised in the training thread by :meth:`PointerFile.check`,
which the adapters call at their next save, flush and close.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from asyncckpt import Checkpointer, CheckpointInfo, SyncSaveHandle, WriterError
from asyncckpt.events import Committed, Event, Rotated

__all__ = ["PointedSaveHandle", "PointerFile", "link_atomic", "write_text_atomic"]


class PointerFile:
    """A pointer file that follows the commits of the checkpoints it is told to follow.

    Args:
        write: writes the pointer so that it names a checkpoint (given its file name); runs on
            the pointer's worker thread and must replace the file atomically.
        what: the pointer's name in error messages (``"latest.pth"``).
    """

    def __init__(self, write: Callable[[str], object], what: str) -> None:
        self._write = write
        self._what = what
        self._lock = threading.Lock()
        self._follow: set[str] = set()
        self._target: str | None = None  # what the pointer must name
        self._written: str | None = None  # what it names on disk (None: not known)
        self._last_committed: str | None = None
        self._running = False
        self._job: concurrent.futures.Future[None] | None = None
        self._errors: list[BaseException] = []
        self._worker = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"asyncckpt-{what}"
        )

    # -- the training thread ---------------------------------------------------------------------
    def follow(self, name: str) -> None:
        """Move the pointer to ``name`` whenever a save of that name commits (call it before
        the save)."""
        with self._lock:
            self._follow.add(name)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every move asked for so far is written (or failed)."""
        with self._lock:
            job = self._job
        if job is not None:
            concurrent.futures.wait([job], timeout=timeout)

    def check(self) -> None:
        """Raise the failures of earlier moves, once.

        Raises:
            WriterError: the pointer could not be written (``__cause__``: the first failure).
        """
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise WriterError(
                f"updating {self._what} failed: {errors[0]!r}", tuple(errors)
            ) from errors[0]

    def close(self) -> None:
        """Wait for the moves in flight and stop the worker thread; raise their failures."""
        self.wait()
        self._worker.shutdown(wait=True)
        self.check()

    # -- the writer's event loop (an observer) ---------------------------------------------------
    def __call__(self, event: Event) -> None:
        if isinstance(event, Committed):
            with self._lock:
                self._last_committed = event.info.name
                if event.info.name in self._follow:
                    self._move(event.info.name)
        elif isinstance(event, Rotated):
            job = None
            with self._lock:
                victims = set(event.names)
                if self._written in victims and (
                    self._target is None or self._target in victims
                ):
                    # the file it names goes, and no followed commit moves it: the newest
                    # checkpoint takes its place (retention keeps the one just committed)
                    if self._last_committed is not None:
                        self._move(self._last_committed)
                if self._running and (self._written is None or self._written in victims):
                    job = self._job
            if job is not None:  # the deletions follow this event: move the pointer first
                concurrent.futures.wait([job])

    def _move(self, name: str) -> None:
        """Set the target and make sure the worker writes it (called with the lock held)."""
        self._target = name
        if not self._running:
            self._running = True
            self._job = self._worker.submit(self._run)

    # -- the worker thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:  # until the target stops moving
            with self._lock:
                target = self._target
                if target is None or target == self._written:
                    self._running = False
                    return
            try:
                self._write(target)
            except Exception as exc:  # the old pointer is intact; raised by check()
                with self._lock:
                    self._errors.append(exc)
                    self._running = False
                return
            with self._lock:
                self._written = target


class PointedSaveHandle:
    """A save's handle whose :meth:`wait` also waits until the pointer names the checkpoint.

    Everything else is the wrapped :class:`~asyncckpt.SyncSaveHandle`'s.
    """

    def __init__(self, handle: SyncSaveHandle, pointer: PointerFile | None) -> None:
        self._handle = handle
        self._pointer = pointer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __repr__(self) -> str:
        return repr(self._handle)

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """Block until the save is resolved and, if it committed, the pointer names it.

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
            WriterError: the save failed, or the pointer could not be written.
        """
        info = self._handle.wait(timeout)
        if self._pointer is not None and info is not None:
            # Committed observers run before the handle's waiter resumes: the move is asked for.
            self._pointer.wait()
            self._pointer.check()
        return info


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


def close_writers(writers: Iterable[tuple[Checkpointer, PointerFile | None]]) -> None:
    """Close each writer, then its pointer (which has its last moves to make); every one is
    closed even when another fails, and the first failure is raised."""
    errors: list[Exception] = []
    for writer, pointer in writers:
        for close in (writer.close, pointer.close if pointer is not None else None):
            if close is None:
                continue
            try:
                close()
            except Exception as exc:
                errors.append(exc)
    if errors:
        raise errors[0]
