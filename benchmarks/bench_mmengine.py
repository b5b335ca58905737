#!/usr/bin/env python3
"""Training-loop cost of checkpointing in mmengine: ``CheckpointHook`` vs ``AsyncCheckpointHook``.

Trains the same MLP (same initial weights, same data) with mmengine's iteration-based loop,
saving every ``--interval`` iterations, once per hook per round. Rounds alternate the order of
the hooks (A B, B A, ...), so drift in the machine's speed hits both alike. For each hook it
reports the mean iteration time (all iterations, iterations that saved, the others) and the
wall time of the whole run, which for the async hook includes waiting for the last checkpoint
to be durable at the end of training.

    python benchmarks/bench_mmengine.py --width 2048 --depth 8 --iters 60 --interval 10 \\
        --rounds 3 --json bench-out/mmengine.json --markdown bench-out/mmengine.md

Differences to keep in mind when reading the numbers: mmengine's hook writes with
``torch.save`` into a buffer and then a file, without fsync; asyncckpt fsyncs every checkpoint
(durable) in the background. Both keep ``--keep`` checkpoints.

Standalone on purpose (needs asyncckpt with the mmengine extra, nothing else): it does not use
the project's benchmark harness.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

HOOKS = ("CheckpointHook", "AsyncCheckpointHook")


@dataclass
class RunResult:
    """One training run with one hook."""

    hook: str
    round: int
    iteration_s: list[float] = field(default_factory=list)
    saved: list[bool] = field(default_factory=list)
    wall_s: float = 0.0
    checkpoint_bytes: int = 0


def _build(args: argparse.Namespace, work_dir: str, hook: str, timer: Any) -> Any:
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class MLP(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            for _ in range(args.depth):
                layers += [nn.Linear(args.width, args.width), nn.ReLU()]
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(args.width, 1)

        def forward(self, inputs: Any, data_samples: Any = None, mode: str = "tensor") -> Any:
            x = torch.stack(inputs) if isinstance(inputs, list) else inputs
            out = self.head(self.body(x)).squeeze(-1)
            if mode == "loss":
                y = torch.stack(data_samples) if isinstance(data_samples, list) else data_samples
                return {"loss": ((out - y) ** 2).mean()}
            return out

    class Synthetic(Dataset):  # type: ignore[type-arg]
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(args.batch * 4, args.width, generator=g)
            self.y = torch.randn(args.batch * 4, generator=g)

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"inputs": self.x[i], "data_samples": self.y[i]}

    torch.manual_seed(0)
    model = MLP()
    return Runner(
        model=model,
        work_dir=work_dir,
        train_dataloader=dict(
            dataset=Synthetic(), sampler=dict(type="InfiniteSampler", shuffle=True, seed=0),
            batch_size=args.batch, num_workers=0,
        ),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=1e-4)),
        train_cfg=dict(by_epoch=False, max_iters=args.iters),
        default_hooks=dict(
            checkpoint=dict(type=hook, interval=args.interval, by_epoch=False,
                            max_keep_ckpts=args.keep),
            logger=dict(type="LoggerHook", interval=10**9),
        ),
        custom_hooks=[timer],
        log_processor=dict(by_epoch=False),
        experiment_name=f"bench-{hook}-{time.time_ns()}",
        randomness=dict(seed=0),
        log_level="WARNING",
    )


def _timer_hook(result: RunResult, interval: int) -> Any:
    from mmengine.hooks import Hook

    class IterationTimer(Hook):
        """Times each iteration from the first hook before it to the last hook after it
        (the checkpoint hooks run at VERY_LOW, before this LOWEST one)."""

        priority = "LOWEST"

        def __init__(self) -> None:
            self.t0 = 0.0

        def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                             outputs: Any = None) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            result.iteration_s.append(time.perf_counter() - self.t0)
            result.saved.append((runner.iter + 1) % interval == 0
                                or runner.iter + 1 == runner.max_iters)

    return IterationTimer()


def _device() -> str:
    from mmengine.device import get_device

    return str(get_device())  # where mmengine's Runner puts the model


def _cleanup() -> None:
    from mmengine.logging import MessageHub, MMLogger
    from mmengine.registry import DefaultScope
    from mmengine.visualization import Visualizer

    for logger in list(MMLogger._instance_dict.values()):
        for handler in list(logger.handlers):
            handler.close()
            logger.removeHandler(handler)
    for registry in (MMLogger, Visualizer, DefaultScope, MessageHub):
        registry._instance_dict.clear()
    gc.collect()


def run_once(args: argparse.Namespace, hook: str, round_: int, root: str) -> RunResult:
    result = RunResult(hook, round_)
    work_dir = os.path.join(root, f"{hook}-{round_}")
    runner = _build(args, work_dir, hook, _timer_hook(result, args.interval))
    t0 = time.perf_counter()
    runner.train()  # returns after the async hook drained its queue (after_train)
    result.wall_s = time.perf_counter() - t0
    last = os.path.join(work_dir, f"iter_{args.iters}.pth")
    result.checkpoint_bytes = os.path.getsize(last) if os.path.exists(last) else 0
    del runner
    _cleanup()
    shutil.rmtree(work_dir, ignore_errors=True)
    return result


def summarize(results: list[RunResult], warmup: int = 0) -> dict[str, dict[str, float]]:
    """Means per hook over all its runs, leaving out each run's first ``warmup`` iterations."""
    out: dict[str, dict[str, float]] = {}
    for hook in HOOKS:
        runs = [r for r in results if r.hook == hook]
        if not runs:
            continue
        timed = [(t, s) for r in runs for t, s in list(zip(r.iteration_s, r.saved,
                                                               strict=True))[warmup:]]
        every = [t for t, _ in timed]
        saving = [t for t, s in timed if s]
        other = [t for t, s in timed if not s]
        out[hook] = {
            "mean_iteration_s": statistics.fmean(every) if every else float("nan"),
            "mean_saving_iteration_s": statistics.fmean(saving) if saving else float("nan"),
            "mean_other_iteration_s": statistics.fmean(other) if other else float("nan"),
            "median_wall_s": statistics.median(r.wall_s for r in runs),
            "checkpoint_mb": runs[0].checkpoint_bytes / 1e6,
        }
    if len(out) == 2:
        sync, asyn = out["CheckpointHook"], out["AsyncCheckpointHook"]
        out["ratio_async_over_sync"] = {
            k: asyn[k] / sync[k] for k in sync if k != "checkpoint_mb" and sync[k] > 0
        }
    return out


def markdown(summary: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    rows = [
        f"mmengine checkpoint hooks: MLP width {args.width} depth {args.depth}, "
        f"{args.iters} iterations ({args.warmup} warm-up), save every {args.interval}, "
        f"{args.rounds} round(s), device {_device()}",
        "",
        "| hook | mean iteration (ms) | saving iterations (ms) | other iterations (ms) "
        "| run wall (s) | checkpoint (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for hook in HOOKS:
        s = summary.get(hook)
        if s is None:
            continue
        rows.append(
            f"| {hook} | {s['mean_iteration_s'] * 1e3:.2f} | "
            f"{s['mean_saving_iteration_s'] * 1e3:.2f} | {s['mean_other_iteration_s'] * 1e3:.2f} "
            f"| {s['median_wall_s']:.2f} | {s['checkpoint_mb']:.1f} |"
        )
    ratio = summary.get("ratio_async_over_sync")
    if ratio:
        rows += ["", "async / sync: " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items())]
    return "\n".join(rows) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=512, help="MLP width (default 512)")
    p.add_argument("--depth", type=int, default=4, help="hidden layers (default 4)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=40, help="iterations per run (default 40)")
    p.add_argument("--interval", type=int, default=10, help="save every N iterations")
    p.add_argument("--keep", type=int, default=2, help="max_keep_ckpts (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="runs per hook, interleaved")
    p.add_argument("--warmup", type=int, default=2,
                   help="leave each run's first N iterations out of the means (default 2)")
    p.add_argument("--dir", default=None, help="where runs write (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write the raw results and summary here")
    p.add_argument("--markdown", default=None, help="write the table here (also printed)")
    args = p.parse_args(argv)
    for name in ("width", "depth", "batch", "iters", "interval", "keep", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not 0 <= args.warmup < args.iters:
        p.error("--warmup must be >= 0 and less than --iters")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import asyncckpt.adapters.mmengine  # noqa: F401 - registers AsyncCheckpointHook

    root = args.dir or tempfile.mkdtemp(prefix="bench-mmengine-")
    os.makedirs(root, exist_ok=True)
    results: list[RunResult] = []
    try:
        for round_ in range(args.rounds):
            order = HOOKS if round_ % 2 == 0 else HOOKS[::-1]
            for hook in order:
                results.append(run_once(args, hook, round_, root))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    summary = summarize(results, args.warmup)
    report = {
        "benchmark": "mmengine-checkpoint-hooks",
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "dir")},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "device": _device(),
        },
        "summary": summary,
        "runs": [asdict(r) for r in results],
    }
    table = markdown(summary, args)
    print(table, end="")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
