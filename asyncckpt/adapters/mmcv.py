"""mmcv-era helpers: ``IterBasedRunner``'s ``save_checkpoint()`` / ``resume()`` over asyncckpt.

For hand-written loops (or code ported from mmcv 1.x runners) that want mmcv's checkpoint layout
(``{'meta', 'state_dict', 'optimizer'}``, ``iter_{}.pth`` files, a ``latest.pth`` link) with
asynchronous, atomic writes::

    ckpt = MMCVCheckpointer(model, optimizer, meta=dict(exp_name="x"), keep_last=5)
    ckpt.resume("work_dir/latest.pth")              # if resuming: sets ckpt.epoch / ckpt.iter
    while ckpt.iter < max_iters:
        train_step()
        if (ckpt.iter + 1) % 1000 == 0:
            ckpt.save_checkpoint("work_dir")        # work_dir/iter_{ckpt.iter + 1}.pth
        ckpt.iter += 1
    ckpt.close()

Needs nothing beyond asyncckpt (no mmcv, no mmengine).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch
from torch import nn

from .._load import load
from .._sync import Checkpointer, SyncSaveHandle
from ..storage import Storage
from ._pointers import CommitTracker, link_atomic

__all__ = ["MMCVCheckpointer"]

LATEST_NAME = "latest.pth"
_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)
_MODULE_PREFIX = re.compile(r"^module\.")

Optimizers = torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer] | None


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, _WRAPPERS):
        model = model.module
    return model


class MMCVCheckpointer:
    """``save_checkpoint`` / ``resume`` with the semantics of mmcv's ``IterBasedRunner``.

    The counters mean what they mean in mmcv's runner: ``iter`` is the number of iterations
    completed before the current one, so a checkpoint saved at the end of an iteration (where
    mmcv's ``CheckpointHook`` saves) is ``iter_{iter + 1}.pth`` and records
    ``meta['epoch'] = epoch + 1``, ``meta['iter'] = iter``; ``resume()`` sets both from the meta,
    exactly as mmcv does.

    Saving copies the state before returning and writes it in the background (one
    :class:`~asyncckpt.Checkpointer` per ``out_dir``). ``latest.pth`` is a relative symlink to the
    newest checkpoint, replaced atomically once that checkpoint is committed (a copy where the
    filesystem has no symlinks; nothing for non-local storage, where the folder's
    ``last_checkpoint`` pointer names the newest checkpoint).

    Args:
        model: the model (DataParallel / DistributedDataParallel wrappers are unwrapped).
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
        self._writers: dict[object, Checkpointer] = {}
        self._links: dict[object, tuple[str, CommitTracker[str]]] = {}

    # -- saving ----------------------------------------------------------------------------------
    def save_checkpoint(
        self,
        out_dir: str | os.PathLike[str] | Storage,
        filename_tmpl: str = "iter_{}.pth",
        meta: dict[str, Any] | None = None,
        save_optimizer: bool = True,
        create_symlink: bool = True,
    ) -> SyncSaveHandle:
        """Save ``iter_{iter + 1}.pth`` (per ``filename_tmpl``) into ``out_dir``.

        Args:
            out_dir: folder (or URI / :class:`~asyncckpt.storage.Storage`) to save into.
            filename_tmpl: file name template; ``{}`` receives ``iter + 1``.
            meta: extra meta entries for this checkpoint (``self.meta`` is added to them, then
                ``epoch`` and ``iter``).
            save_optimizer: include the optimizer state(s).
            create_symlink: point ``latest.pth`` at this checkpoint once it is committed.

        Returns:
            The save's handle (``handle.wait()`` blocks until it is durable).

        Raises:
            TypeError: ``meta`` is not a dict, or the state holds something that cannot be
                checkpointed.
            WriterError: an earlier save failed.
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
        model = _unwrap(self.model)
        meta.update(time=time.asctime())
        classes = getattr(model, "CLASSES", None)
        if classes is not None:
            meta.update(CLASSES=classes)
        checkpoint: dict[str, Any] = {"meta": meta, "state_dict": model.state_dict()}
        if save_optimizer and self.optimizer is not None:
            if isinstance(self.optimizer, torch.optim.Optimizer):
                checkpoint["optimizer"] = self.optimizer.state_dict()
            else:
                checkpoint["optimizer"] = {k: o.state_dict() for k, o in self.optimizer.items()}
        name = filename_tmpl.format(self.iter + 1)
        writer, key = self._writer(out_dir)
        handle = writer.save(checkpoint, step=self.iter + 1, epoch=self.epoch + 1, name=name)
        if create_symlink:
            latest = writer.storage.local_path(LATEST_NAME)
            if latest is not None:
                self._links.setdefault(key, (latest, CommitTracker()))[1].add(handle, name)
        self._update_links()
        return handle

    def flush(self) -> None:
        """Block until every save is written and ``latest.pth`` names the newest; raise writer
        failures."""
        try:
            for writer in self._writers.values():
                writer.flush()
        finally:
            self._update_links()

    def close(self) -> None:
        """Drain and close every writer; raise writer failures."""
        writers, self._writers = list(self._writers.values()), {}
        errors: list[BaseException] = []
        for writer in writers:
            try:
                writer.close()
            except Exception as exc:
                errors.append(exc)
        self._update_links()
        if errors:
            raise errors[0]

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
        weights = {_MODULE_PREFIX.sub("", k): v for k, v in state["state_dict"].items()}
        result = _unwrap(self.model).load_state_dict(weights, strict=strict)
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
    def _writer(self, out_dir: str | os.PathLike[str] | Storage) -> tuple[Checkpointer, object]:
        if isinstance(out_dir, Storage):
            key: object = out_dir
        else:
            text = os.fspath(out_dir)
            key = text if "://" in text else os.path.abspath(text)
        writer = self._writers.get(key)
        if writer is None:
            writer = self._writers[key] = Checkpointer(out_dir, **self._options)
        return writer, key

    def _update_links(self) -> None:
        for latest, tracker in self._links.values():
            name = tracker.newest_committed()
            if name is not None:
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
