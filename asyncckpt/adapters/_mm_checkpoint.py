"""What the mmengine hook saves: the dict ``Runner.save_checkpoint`` builds, and the published
copy of a checkpoint (``published_keys``)."""

from __future__ import annotations

import hashlib
import os.path as osp
import pickle
import time
from typing import Any

import mmengine
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper
from mmengine.utils import get_git_hash

__all__ = ["RunMeta", "build_checkpoint", "numeric", "published_copy"]


class RunMeta:
    """The meta entries that stay the same for a whole run. mmengine recomputes them at every
    save (formatting the config, running ``git``); here once per run, off the hot path."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] | None = None

    def reset(self) -> None:
        self._cache = None

    def of(self, runner: Any) -> dict[str, Any]:
        if self._cache is None:
            self._cache = dict(
                cfg=runner.cfg.pretty_text,
                seed=runner.seed,
                experiment_name=runner.experiment_name,
                mmengine_version=mmengine.__version__ + get_git_hash(),
            )
        return self._cache


def build_checkpoint(
    runner: Any,
    meta: dict[str, Any],
    run_meta: dict[str, Any],
    *,
    save_optimizer: bool,
    save_param_scheduler: bool,
    by_epoch: bool,
) -> dict[str, Any]:
    """The dict ``Runner.save_checkpoint`` builds (without its ``.cpu()`` copies: the snapshot
    copies, and records every tensor as a CPU tensor); ``before_save_checkpoint`` hooks run.

    Raises:
        TypeError: ``save_optimizer`` and ``runner.optim_wrapper`` is not an ``OptimWrapper``.
    """
    if by_epoch:
        meta.setdefault("epoch", runner.epoch + 1)
        meta.setdefault("iter", runner.iter)
    else:
        meta.setdefault("epoch", runner.epoch)
        meta.setdefault("iter", runner.iter + 1)
    meta.update(  # in Runner.save_checkpoint's order
        cfg=run_meta["cfg"],
        seed=run_meta["seed"],
        experiment_name=run_meta["experiment_name"],
        time=time.strftime("%Y%m%d_%H%M%S", time.localtime()),
        mmengine_version=run_meta["mmengine_version"],
    )
    if hasattr(runner.train_dataloader.dataset, "metainfo"):
        meta.update(dataset_meta=runner.train_dataloader.dataset.metainfo)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    checkpoint: dict[str, Any] = {
        "meta": meta,
        "state_dict": model.state_dict(),
        "message_hub": runner.message_hub.state_dict(),
    }
    if save_optimizer:
        if not isinstance(runner.optim_wrapper, OptimWrapper):
            raise TypeError(
                "runner.optim_wrapper should be an `OptimWrapper` or `OptimWrapperDict` "
                f"instance, but got {runner.optim_wrapper}"
            )
        checkpoint["optimizer"] = runner.optim_wrapper.state_dict()
    if save_param_scheduler and runner.param_schedulers is None:
        runner.logger.warning(
            "`save_param_scheduler` is True but `self.param_schedulers` is None, so skip "
            "saving parameter schedulers"
        )
        save_param_scheduler = False
    if save_param_scheduler:
        if isinstance(runner.param_schedulers, dict):
            checkpoint["param_schedulers"] = {
                name: [s.state_dict() for s in schedulers]
                for name, schedulers in runner.param_schedulers.items()
            }
        else:
            checkpoint["param_schedulers"] = [s.state_dict() for s in runner.param_schedulers]
    runner.call_hook("before_save_checkpoint", checkpoint=checkpoint)
    return checkpoint


def published_copy(checkpoint: dict[str, Any], keys: list[str], source: str) -> str:
    """Keep only ``keys`` of ``checkpoint`` (in place, logging what goes, as mmengine does);
    return the published file's name: ``<stem of source>-<sha256[:8]>.pth``."""
    removed = [key for key in checkpoint if key not in keys]
    for key in removed:
        del checkpoint[key]
    if removed:
        print_log(
            f"Key {removed} will be removed because they are not found in published_keys. "
            f"If you want to keep them, please set `{removed}` in published_keys",
            logger="current",
        )
    sha = hashlib.sha256(pickle.dumps(checkpoint)).hexdigest()
    return osp.splitext(source)[0] + f"-{sha[:8]}.pth"


def numeric(metrics: dict[str, Any] | None) -> dict[str, float] | None:
    """The metrics the index can record (real numbers); others are left out."""
    if not metrics:
        return None
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out or None
