"""One checkpoint folder behind :class:`~asyncckpt.adapters.lightning.AsyncCkptIO`.

Lightning names checkpoints by full path and deletes them by path; asyncckpt keeps one index
per folder. A :class:`_Folder` owns the folder's writer and turns Lightning's calls into
index operations::

    save_checkpoint(dir/x.ckpt)  ─▶ save(name="x.ckpt", supersedes=[x.ckpt, *removals])
    remove_checkpoint(dir/y.ckpt) ─▶ removals += y.ckpt   (writer busy: carried by the next save)
                                  ─▶ remove([y.ckpt])     (writer idle, or at teardown)

A removal rides on the next save so that training never waits for the writer; it is
published in the same index update as that save, after the file it replaces is durable, and
only then is the victim's file deleted. If that save does not commit, the removal goes back to
the pending ones. Naming the saved file in its own ``supersedes`` lets Lightning rewrite a file
(``last.ckpt``) at another step.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import Any

import torch

from .. import Checkpointer, CheckpointerConfig, SyncSaveHandle

__all__ = ["foreign_types", "running_trainer_on_stack", "split_path"]

# What asyncckpt's snapshot stores natively (exact types): everything else found in a Lightning
# checkpoint is listed in ``extra_types`` so that it is pickled as it is, like torch.save does.
_NATIVE = frozenset(
    {dict, OrderedDict, list, tuple, bool, int, float, complex, str, bytes, type(None),
     torch.dtype, torch.device, torch.Size, torch.Tensor, torch.nn.Parameter}
)


def split_path(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(folder, file name)`` of a checkpoint path or URI (``s3://bucket/run/x.ckpt``).

    Raises:
        TypeError: ``path`` is not a str or path.
        ValueError: ``path`` names no file.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a checkpoint path must be a str or os.PathLike, got {path!r:.80}")
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        folder, _, name = text.rpartition("/")
    else:
        text = text.removeprefix("file://")
        folder, name = os.path.split(os.path.abspath(text))
    if not name or not folder or folder.endswith(":/"):
        raise ValueError(f"checkpoint path {text!r} names no file inside a folder")
    return folder, name


def foreign_types(obj: object) -> set[type]:
    """Classes in ``obj`` that asyncckpt's snapshot does not store natively (see ``_NATIVE``).

    Objects with a ``state_dict()`` and tensor subclasses are left to the snapshot (it
    snapshots the former and refuses the latter with a clear message).
    """
    found: set[type] = set()
    stack: list[object] = [obj]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in _NATIVE:
            if kind in (dict, OrderedDict):
                if id(item) not in seen:
                    seen.add(id(item))
                    stack.extend(item.values())  # type: ignore[attr-defined]
            elif kind in (list, tuple):
                if id(item) not in seen:
                    seen.add(id(item))
                    stack.extend(item)  # type: ignore[arg-type]
            continue
        if isinstance(item, torch.Tensor) or callable(getattr(item, "state_dict", None)):
            continue
        found.add(kind)
    return found


def running_trainer_on_stack() -> bool:
    """Whether a Lightning ``Trainer`` that is running (fit/validate/test/predict, or handling
    an exception in one) is on the calling thread's stack.

    Lightning gives a ``CheckpointIO`` no handle on the trainer; its ``save_checkpoint`` runs
    inside ``Trainer.save_checkpoint``, so the trainer is found as ``self`` of a caller's frame.
    """
    trainer_mod = sys.modules.get("lightning.pytorch.trainer.trainer")
    states = sys.modules.get("lightning.pytorch.trainer.states")
    if trainer_mod is None or states is None:
        return False
    trainer_cls, status = trainer_mod.Trainer, states.TrainerStatus
    frame: FrameType | None = sys._getframe(1)
    for _ in range(64):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, trainer_cls):
            return candidate.state.status in (status.RUNNING, status.INTERRUPTED)
        frame = frame.f_back
    return False


class _Folder:
    """The writer of one folder, and the removals Lightning asked for that are not done yet."""

    def __init__(
        self,
        uri: str,
        config: CheckpointerConfig,
        storage_options: Mapping[str, Any] | None,
        observers: Iterable[Callable[[Any], object]],
    ) -> None:
        self.uri = uri
        self._config = config
        self._storage_options = storage_options
        self._observers = tuple(observers)
        self._writer: Checkpointer | None = None
        self._pending: dict[str, None] = {}  # insertion-ordered set of names to remove
        self._carried: list[tuple[SyncSaveHandle, set[str]]] = []
        self._last: SyncSaveHandle | None = None

    @property
    def writer(self) -> Checkpointer:
        """The folder's writer, opened on first use (this resumes the folder's index)."""
        if self._writer is None:
            self._writer = Checkpointer(
                # Lightning saves from global rank 0 only: one writer, never collective
                self.uri, config=dataclasses.replace(self._config, distributed=False),
                observers=self._observers,
                storage_options=self._storage_options,
            )
        return self._writer

    def _ensure_types(self, types: set[type]) -> None:
        """Reopen the writer when a checkpoint holds a class it was not told about."""
        known = {cls for cls, _ in self._config.extra_types}
        new = types - known
        if not new:
            return
        if self._writer is not None:
            self.close()  # the writer's config is fixed; drain it, then reopen
        ordered = sorted(new, key=lambda c: (c.__module__, c.__qualname__))
        self._config = dataclasses.replace(
            self._config,
            extra_types=self._config.extra_types + tuple((cls, None) for cls in ordered),
        )

    def save(self, checkpoint: Mapping[str, Any], name: str, step: int,
             epoch: int | None) -> SyncSaveHandle:
        """Queue ``checkpoint`` as ``name``; carry the pending removals with it."""
        self._ensure_types(foreign_types(checkpoint))
        writer = self.writer
        self._reclaim()
        self._pending.pop(name, None)  # rewritten: it is no longer to be removed
        for _, names in self._carried:
            names.discard(name)
        carry = list(self._pending)
        handle = writer.save(checkpoint, step=step, epoch=epoch, name=name,
                             supersedes=[name, *carry])
        self._pending.clear()
        if carry:
            self._carried.append((handle, set(carry)))
        self._last = handle
        return handle

    def remove(self, name: str) -> None:
        """Remove ``name`` now if the writer is idle, else with the next save (or at close)."""
        self._pending[name] = None
        if self._last is None or self._last.done():  # FIFO: nothing is queued any more
            self.settle()

    def flush(self) -> None:
        """Wait until every queued save is durable; raise writer failures."""
        if self._writer is not None:
            self._writer.flush()

    def settle(self) -> None:
        """Wait for queued saves, then apply every removal that is still pending."""
        writer = self.writer
        writer.flush()
        self._reclaim()
        if self._pending:
            writer.remove(list(self._pending))
            self._pending.clear()

    def close(self) -> None:
        """Settle and close the writer (the next save reopens it)."""
        if self._writer is None:
            return
        try:
            self.settle()
        finally:
            writer, self._writer, self._last = self._writer, None, None
            writer.close()

    def _reclaim(self) -> None:
        """Removals carried by a save that did not commit are pending again."""
        still: list[tuple[SyncSaveHandle, set[str]]] = []
        for handle, names in self._carried:
            if not handle.done():
                still.append((handle, names))
            elif handle.status != "committed":
                self._pending.update(dict.fromkeys(names))
        self._carried = still
