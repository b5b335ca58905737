"""mmcv-era helpers: ``IterBasedRunner``'s ``save_checkpoint()`` / ``resume()`` over asyncckpt.

For hand-written loops (or code ported from mmcv 1.x runners) that want mmcv's checkpoint layout
(``{'meta', 'state_dict', 'optimizer'}``, ``iter_{}.pth`` files, a ``latest.pth`` link) with
asynchronous, atomic writes (see ``docs/mmcv.md`` for what matches mmcv and what differs)::

    ckpt = MMCVCheckpointer(model, optimizer, meta=dict(exp_name="x"), keep_last=5)
    ckpt.resume("work_dir/latest.pth")              # if resuming: sets ckpt.epoch / ckpt.iter
    while ckpt.iter < max_iters:
        train_step()
        if (ckpt.iter + 1) % 1000 == 0:
            ckpt.save_checkpoint("work_dir")        # work_dir/iter_{ckpt.iter + 1}.pth
        ckpt.iter += 1
    ckpt.close()

Needs nothing beyond asyncckpt (no mmcv, no mmengine); with mmcv installed, its version is
recorded in every checkpoint's meta as mmcv does.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
import time
from collections.abc import Mapping
from functools import partial
from types import TracebackType
from typing import Any

import torch
from torch import nn

from asyncckpt import Checkpointer, load
from asyncckpt.storage import Storage

from ._mm_state import state_dict_without_wrappers, unwrap, weights_for
from ._pointers import PointedSaveHandle, PointerFile, close_writers, link_atomic

__all__ = ["MMCVCheckpointer"]

LATEST_NAME = "latest.pth"

Optimizers = torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer] | None


def installed_mmcv_version() -> str | None:
    """The version mmcv reports (``mmcv.__version__``) if mmcv is installed, without importing
    it when it is not imported yet (importing mmcv 1.x is slow and warns)."""
    module = sys.modules.get("mmcv")
    if module is not None and isinstance(getattr(module, "__version__", None), str):
        return str(module.__version__)
    for distribution in ("mmcv", "mmcv-full", "mmcv-lite"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


class MMCVCheckpointer:
    """``save_checkpoint`` / ``resume`` with the semantics of mmcv's ``IterBasedRunner``.

    The counters mean what they mean in mmcv's runner: ``iter`` is the number of iterations
    completed before the current one, so a checkpoint saved at the end of an iteration (where
    mmcv's ``CheckpointHook`` saves) is ``iter_{iter + 1}.pth`` and records
    ``meta['epoch'] = epoch + 1``, ``meta['iter'] = iter``; ``resume()`` sets both from the meta,
    exactly as mmcv does.

    Saving copies the state before returning and writes it in the background (one
    :class:`~asyncckpt.Checkpointer` per ``out_dir``). ``latest.pth`` is a relative symlink to the
    newest checkpoint, moved (atomically, by a worker thread) as soon as that checkpoint is
    committed: ``save_checkpoint(...).wait()`` returns once it has moved, and a process that dies
    before ``close()`` leaves it naming a complete checkpoint. Where the filesystem has no
    symlinks it is a copy; for non-local storage there is none (the folder's ``last_checkpoint``
    names the newest checkpoint).

    Args:
        model: the model. Data-parallel wrappers are left out of the saved names, at the top
            and around children (``a.weight``, not ``a.module.weight``), as mmcv does.
        optimizer: an optimizer, a dict of them, or None.
        meta: entries added to every checkpoint's meta (mmcv's ``runner.meta``).
        logger: where resume messages go (default: the ``asyncckpt`` logger).
        **options: :class:`~asyncckpt.CheckpointerConfig` options for the writers, e.g.
            ``keep_last=5``, ``queue_size=2``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizers = None,
        *,
        meta: dict[str, Any] | None = None,
        logger: logging.Logger | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"meta should be a dict or None, but got {type(meta)}")
        _check_optimizers(optimizer)
        options.setdefault("cpu_locations", True)  # mmcv saves weights_to_cpu(state_dict)
        self.model = model
        self.optimizer = optimizer
        self.meta = meta
        self.epoch = 0
        self.iter = 0
        self.logger = logger or logging.getLogger("asyncckpt")
        self._options = options
        self._mmcv_version = installed_mmcv_version()
        self._writers: dict[object, tuple[Checkpointer, PointerFile | None]] = {}

    # -- saving ----------------------------------------------------------------------------------
    def save_checkpoint(
        self,
        out_dir: str | os.PathLike[str] | Storage,
        filename_tmpl: str = "iter_{}.pth",
        meta: dict[str, Any] | None = None,
        save_optimizer: bool = True,
        create_symlink: bool = True,
    ) -> PointedSaveHandle:
        """Save ``iter_{iter + 1}.pth`` (per ``filename_tmpl``) into ``out_dir``.

        Args:
            out_dir: folder (or URI / :class:`~asyncckpt.storage.Storage`) to save into.
            filename_tmpl: file name template; ``{}`` receives ``iter + 1``.
            meta: extra meta entries for this checkpoint (``self.meta`` is added to them, then
                ``epoch``, ``iter``, ``mmcv_version`` and ``time``). The dict is copied, not
                changed (mmcv writes these entries into it).
            save_optimizer: include the optimizer state(s).
            create_symlink: point ``latest.pth`` at this checkpoint once it is committed.

        Returns:
            The save's handle: ``wait()`` blocks until the checkpoint is durable and
            ``latest.pth`` names it.

        Raises:
            TypeError: ``meta`` is not a dict, or the state holds something that cannot be
                checkpointed.
            WriterError: an earlier save, or moving ``latest.pth``, failed.
        """
        if meta is None:
            meta = {}
        elif not isinstance(meta, dict):
            raise TypeError(f"meta should be a dict or None, but got {type(meta)}")
        meta = dict(meta)
        if self.meta is not None:
            meta.update(self.meta)
        # after self.meta, so that a meta carried over from a resumed run cannot override them
        meta.update(epoch=self.epoch + 1, iter=self.iter)
        if self._mmcv_version is not None:
            meta.update(mmcv_version=self._mmcv_version)
        meta.update(time=time.asctime())
        model = unwrap(self.model)
        classes = getattr(model, "CLASSES", None)
        if classes is not None:
            meta.update(CLASSES=classes)
        checkpoint: dict[str, Any] = {
            "meta": meta,
            "state_dict": state_dict_without_wrappers(model),
        }
        if save_optimizer and self.optimizer is not None:
            if isinstance(self.optimizer, torch.optim.Optimizer):
                checkpoint["optimizer"] = self.optimizer.state_dict()
            else:
                checkpoint["optimizer"] = {k: o.state_dict() for k, o in self.optimizer.items()}
        name = filename_tmpl.format(self.iter + 1)
        writer, pointer = self._writer(out_dir)
        if pointer is not None:
            pointer.check()
            if create_symlink:
                pointer.follow(name)
        handle = writer.save(checkpoint, step=self.iter + 1, epoch=self.epoch + 1, name=name)
        return PointedSaveHandle(handle, pointer if create_symlink else None)

    def flush(self) -> None:
        """Block until every save is written and ``latest.pth`` names the newest; raise writer
        failures."""
        for writer, pointer in self._writers.values():
            writer.flush()
            if pointer is not None:
                pointer.wait()
                pointer.check()

    def close(self) -> None:
        """Drain and close every writer; raise writer failures."""
        writers, self._writers = list(self._writers.values()), {}
        close_writers(writers)

    def __enter__(self) -> MMCVCheckpointer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- resuming --------------------------------------------------------------------------------
    def resume(
        self,
        checkpoint: str | os.PathLike[str],
        resume_optimizer: bool = True,
        map_location: Any = "default",
        strict: bool = False,
    ) -> dict[str, Any]:
        """Load a checkpoint into the model (and optimizers); restore ``epoch`` and ``iter``.

        Args:
            checkpoint: a checkpoint file, ``latest.pth``, or a checkpoint folder (its latest).
            resume_optimizer: also load the optimizer state(s) if the checkpoint has them.
            map_location: as for ``torch.load``; ``'default'``: the current CUDA device if there
                is one, else the CPU.
            strict: as for ``load_state_dict`` (mmcv's default is False: missing and unexpected
                keys are logged).

        Returns:
            The loaded checkpoint.

        Raises:
            CheckpointNotFoundError: nothing to load there.
            IntegrityError: the file does not match the checksum its folder's index recorded.
            TypeError: ``self.optimizer`` is neither an optimizer nor a dict of them.
        """
        if map_location == "default":
            map_location = (
                f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
            )
        source = os.fspath(checkpoint)
        if os.path.islink(source):  # latest.pth: load (and verify) the file it names
            source = os.path.realpath(source)
        state = load(source, map_location=map_location)
        weights = weights_for(self.model, state["state_dict"])
        result = unwrap(self.model).load_state_dict(weights, strict=strict)
        if result.missing_keys or result.unexpected_keys:
            self.logger.warning(
                "checkpoint %s and the model differ: missing keys %s, unexpected keys %s",
                source, result.missing_keys, result.unexpected_keys,
            )
        self.epoch = state["meta"]["epoch"]
        self.iter = state["meta"]["iter"]
        if "optimizer" in state and resume_optimizer:
            if isinstance(self.optimizer, torch.optim.Optimizer):
                self.optimizer.load_state_dict(state["optimizer"])
            elif isinstance(self.optimizer, Mapping):
                for name, optim in self.optimizer.items():
                    optim.load_state_dict(state["optimizer"][name])
            else:
                raise TypeError(
                    "Optimizer should be dict or torch.optim.Optimizer but got "
                    f"{type(self.optimizer)}"
                )
        self.logger.info("resumed from epoch: %s, iter %s", self.epoch, self.iter)
        return state

    # -- internals -------------------------------------------------------------------------------
    def _writer(
        self, out_dir: str | os.PathLike[str] | Storage
    ) -> tuple[Checkpointer, PointerFile | None]:
        if isinstance(out_dir, Storage):
            key: object = out_dir
        else:
            text = os.fspath(out_dir)
            key = text if "://" in text else os.path.abspath(text)
        entry = self._writers.get(key)
        if entry is None:
            # mmcv saves from the main process only: one writer, never collective
            writer = Checkpointer(out_dir, **{"distributed": False, **self._options})
            latest = writer.storage.local_path(LATEST_NAME)
            pointer = None
            if latest is not None:
                pointer = PointerFile(partial(_link_latest, latest), LATEST_NAME)
                writer.subscribe(pointer)
            entry = self._writers[key] = (writer, pointer)
        return entry


def _link_latest(latest: str, name: str) -> None:
    link_atomic(name, latest)


def _check_optimizers(optimizer: object) -> None:
    if optimizer is None or isinstance(optimizer, torch.optim.Optimizer):
        return
    if isinstance(optimizer, Mapping) and all(
        isinstance(o, torch.optim.Optimizer) for o in optimizer.values()
    ):
        return
    raise TypeError(
        "optimizer must be a torch.optim.Optimizer, a dict of them or None, "
        f"got {type(optimizer).__name__}"
    )
