"""A tiny, deterministic mmengine setup for the adapter tests: model, metric, runner, comparisons.

Everything runs on the CPU in well under a second per run. Two runs built with the same arguments
train bit-identically, so checkpoints written by two different hooks can be compared exactly.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import HistoryBuffer, MessageHub, MMLogger
from mmengine.model import BaseModel
from mmengine.registry import DefaultScope
from mmengine.runner import Runner
from mmengine.testing.runner_test_case import ToyDataset
from mmengine.visualization import Visualizer
from torch import nn

#: Entries that depend on the wall clock or on object ids, not on what was trained.
VOLATILE_META = {"time", "cfg"}
VOLATILE_INFO = {"eta", "cfg"}
VOLATILE_SCALARS = {"train/time", "train/data_time", "val/time", "val/data_time"}
CHECKPOINT_LOGS = ("Checkpoints will be saved", "Saving checkpoint", "best checkpoint",
                   "is published", "will be removed")


class TinyModel(BaseModel):
    """A two-layer regressor with an MSE loss (mmengine's ToyModel's loss diverges)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(2, 4)
        self.linear2 = nn.Linear(4, 1)

    def forward(self, inputs: Any, data_samples: Any = None, mode: str = "tensor") -> Any:
        x = torch.stack(inputs) if isinstance(inputs, list) else inputs
        out = self.linear2(torch.relu(self.linear1(x))).squeeze(-1)
        if mode == "loss":
            target = torch.stack(data_samples) if isinstance(data_samples, list) else data_samples
            return {"loss": ((out - target) ** 2).mean()}
        return out


class PeakMetric(BaseMetric):
    """Like mmengine's TriangleMetric: ``acc`` peaks at the middle evaluation, ``mIoU`` at the
    second-to-last one, ``err = 1 - acc`` (smaller is better; its rule cannot be inferred)."""

    default_prefix = "test"

    def __init__(self, evaluations: int) -> None:
        super().__init__()
        self.evaluations = max(evaluations, 2)
        self.calls = 0

    def process(self, data_batch: Any, data_samples: Any) -> None:
        self.results.append(0)

    def compute_metrics(self, results: list[Any]) -> dict[str, float]:
        self.calls += 1
        n = self.evaluations
        acc = 1.0 - abs(self.calls - n // 2) / n
        miou = 1.0 - abs(self.calls - (n - 1)) / n
        return {"acc": acc, "mIoU": miou, "err": 1.0 - acc}


def build_runner(
    work_dir: str | os.PathLike[str],
    checkpoint: Any,
    *,
    by_epoch: bool = True,
    length: int = 6,
    val_interval: int = 1,
    scheduler: bool = False,
    resume: bool = False,
    load_from: str | None = None,
    custom_hooks: list[Any] | None = None,
    name: str = "run",
) -> Runner:
    """A runner training TinyModel for ``length`` epochs (or iterations) with ``checkpoint`` as
    its checkpoint hook (a config dict or a hook instance)."""
    torch.manual_seed(0)  # the model is built here, before the runner seeds anything
    model = TinyModel()
    if by_epoch:
        train_cfg = dict(by_epoch=True, max_epochs=length, val_interval=val_interval)
        sampler = dict(type="DefaultSampler", shuffle=True)
    else:
        train_cfg = dict(by_epoch=False, max_iters=length, val_interval=val_interval)
        sampler = dict(type="InfiniteSampler", shuffle=True)
    schedulers = (
        [dict(type="LinearLR", start_factor=0.5, by_epoch=by_epoch, begin=0, end=length)]
        if scheduler
        else None
    )
    return Runner(
        model=model,
        work_dir=os.fspath(work_dir),
        train_dataloader=dict(dataset=ToyDataset(), sampler=sampler, batch_size=4, num_workers=0),
        val_dataloader=dict(
            dataset=ToyDataset(), sampler=dict(type="DefaultSampler", shuffle=False),
            batch_size=6, num_workers=0,
        ),
        val_evaluator=[PeakMetric(length // val_interval)],
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.05, momentum=0.9)),
        param_scheduler=schedulers,
        train_cfg=train_cfg,
        val_cfg=dict(),
        default_hooks=dict(checkpoint=checkpoint, logger=dict(type="LoggerHook", interval=1000)),
        custom_hooks=custom_hooks or [],
        log_processor=dict(by_epoch=by_epoch),
        experiment_name=f"{name}-{uuid.uuid4().hex[:8]}",
        randomness=dict(seed=0),
        resume=resume,
        load_from=load_from,
    )


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def captured_logs(logger: logging.Logger) -> Iterator[list[str]]:
    """The messages ``logger`` emits inside the block."""
    handler = _Collect()
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


def cleanup_mmengine() -> None:
    """What mmengine's RunnerTestCase.tearDown does, without logging.shutdown() (which would
    also close pytest's own handlers): close the loggers' files and forget the singletons."""
    for logger in list(MMLogger._instance_dict.values()):
        for handler in list(logger.handlers):
            handler.close()
            logger.removeHandler(handler)
    MMLogger._instance_dict.clear()
    Visualizer._instance_dict.clear()
    DefaultScope._instance_dict.clear()
    MessageHub._instance_dict.clear()


# -- comparing what two runs left behind -----------------------------------------------------------
_SHA = re.compile(r"-[0-9a-f]{8}\.pth$")
#: ``Runner.experiment_name`` of build_runner's runners: name-<uuid8>_<timestamp>
_EXPERIMENT = re.compile(r"[A-Za-z]+-[0-9a-f]{8}_\d{8}_\d{6}")
_SHA_IN_TEXT = re.compile(r"-[0-9a-f]{8}\.pth\b")


def checkpoint_files(folder: str | os.PathLike[str]) -> set[str]:
    """The checkpoint files of a folder, with published hashes replaced by ``<sha>``."""
    return {_SHA.sub("-<sha>.pth", n) for n in os.listdir(folder) if n.endswith(".pth")}


def published_file(folder: str | os.PathLike[str], stem: str) -> str:
    (name,) = [n for n in os.listdir(folder) if n.startswith(stem + "-") and _SHA.search(n)]
    return os.path.join(folder, name)


def canon(obj: Any, replace: dict[str, str]) -> Any:
    """A comparable, plain form of a loaded checkpoint: tensors/arrays as (kind, dtype, values),
    HistoryBuffers as their histories, strings with run-specific paths/names replaced."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", str(obj.dtype), tuple(obj.shape), obj.tolist())
    if isinstance(obj, np.ndarray):
        return ("ndarray", str(obj.dtype), obj.tolist())
    if isinstance(obj, np.generic):
        return ("numpy", type(obj).__name__, obj.item())
    if isinstance(obj, HistoryBuffer):
        return ("history", canon(obj._log_history, replace), canon(obj._count_history, replace),
                obj.max_length)
    if isinstance(obj, dict):
        out = {k: canon(v, replace) for k, v in obj.items()}
        return (type(obj).__name__, list(out), out)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [canon(v, replace) for v in obj])
    if isinstance(obj, str):
        for old, new in replace.items():
            obj = obj.replace(old, new)
        return _EXPERIMENT.sub("<EXP>", obj)
    return (type(obj).__name__, obj)


def comparable(checkpoint: dict[str, Any], replace: dict[str, str]) -> Any:
    """``canon`` of a checkpoint without the entries that depend on the clock."""
    checkpoint = dict(checkpoint)
    if "meta" in checkpoint:
        checkpoint["meta"] = {k: v for k, v in checkpoint["meta"].items()
                              if k not in VOLATILE_META}
    hub = checkpoint.get("message_hub")
    if hub is not None:
        checkpoint["message_hub"] = {
            "log_scalars": {k: v for k, v in hub["log_scalars"].items()
                            if k not in VOLATILE_SCALARS},
            "runtime_info": {k: v for k, v in hub["runtime_info"].items()
                             if k not in VOLATILE_INFO},
            "resumed_keys": hub["resumed_keys"],
        }
    return canon(checkpoint, replace)


def checkpoint_lines(lines: list[str], replace: dict[str, str]) -> list[str]:
    """The checkpoint-related log lines, with run-specific paths replaced."""
    out = []
    for line in lines:
        if any(marker in line for marker in CHECKPOINT_LOGS):
            for old, new in replace.items():
                line = line.replace(old, new)
            out.append(_SHA_IN_TEXT.sub("-<sha>.pth", line))
    return out
