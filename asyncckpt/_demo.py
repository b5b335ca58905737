"""``asyncckpt demo``: a small training loop that checkpoints asynchronously, then resumes.

It trains an MLP on synthetic data on the CPU, saving every N steps through
:class:`asyncckpt.Checkpointer`, then compares the stall the loop saw per save with the time the
same saves take with a plain synchronous ``torch.save`` + fsync, shows the folder and its index,
and finally resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

import asyncckpt
from asyncckpt.events import Event, SnapshotTaken


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def _progress(steps: int, *, show: bool) -> Any:
    """The training steps, with a progress bar when tqdm (the ``demo`` extra) is installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Steps(steps)
    return tqdm(range(1, steps + 1), disable=not show, unit="step", leave=False)


class _Steps:
    """``range(1, steps + 1)`` that ignores what a progress bar would show."""

    def __init__(self, steps: int) -> None:
        self._steps = steps

    def __iter__(self) -> Iterator[int]:
        return iter(range(1, self._steps + 1))

    def set_postfix(self, **_: object) -> None:
        pass


def _model(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(256, width), torch.nn.ReLU(),
        torch.nn.Linear(width, width), torch.nn.ReLU(),
        torch.nn.Linear(width, width), torch.nn.ReLU(),
        torch.nn.Linear(width, 10),
    )


def _sync_save_times(state: dict[str, object], directory: str, count: int) -> list[float]:
    """Time ``torch.save`` + fsync of ``state`` into the same filesystem, ``count`` times."""
    times = []
    with tempfile.TemporaryDirectory(dir=directory, prefix=".torch-save-") as tmp:
        path = os.path.join(tmp, "state.pt")
        for _ in range(count):
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            times.append(time.perf_counter() - t0)
            os.remove(path)
    return times


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default="runs/demo", help="checkpoint folder (default runs/demo)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--every", type=int, default=25, help="save every N steps (default 25)")
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep (default 3)")
    parser.add_argument("--width", type=int, default=1024, help="MLP width (default 1024)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.every < 1 or args.keep_last < 1 or args.width < 1:
        raise SystemExit("--steps, --every, --keep-last and --width must be >= 1")
    torch.manual_seed(0)
    model = _model(args.width)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    stalls: list[float] = []

    def on_event(event: Event) -> None:
        if isinstance(event, SnapshotTaken):
            stalls.append(event.stall)

    print(f"asyncckpt demo: training an MLP ({sum(p.numel() for p in model.parameters()):,} "
          f"parameters, Adam) for {args.steps} steps, saving every {args.every} to {args.dir}")
    loop_stalls: list[float] = []
    started = time.perf_counter()
    with asyncckpt.Checkpointer(
        args.dir, keep_last=args.keep_last, best={"loss": "less"}, observers=[on_event]
    ) as ckpt:
        bar = _progress(args.steps, show=not args.no_progress)
        for step in bar:
            x = torch.randn(256, 256)  # fresh noisy data: learnable, never memorized
            y = (x[:, :10] * 3 + torch.randn(256, 10) * 2).argmax(dim=1)
            loss = loss_fn(model(x), y)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            if step % args.every == 0:
                t0 = time.perf_counter()
                ckpt.save({"model": model, "optim": optim, "step": step}, step=step,
                          metrics={"loss": loss.item()})
                loop_stalls.append(time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss.item():.3f}", stall=_ms(loop_stalls[-1]))
        ckpt.flush()
        stats = ckpt.stats
        listing = ckpt.checkpoints()
        best = ckpt.best("loss")
    wall = time.perf_counter() - started
    if not listing:
        print("no checkpoint was saved (steps < every)")
        return 0

    state_bytes = listing[-1].size
    sync = _sync_save_times({"model": model.state_dict(), "optim": optim.state_dict(),
                             "step": args.steps}, args.dir, min(len(loop_stalls), 5))
    ratio = statistics.median(sync) / max(statistics.median(loop_stalls), 1e-9)
    print(f"trained {args.steps} steps in {wall:.1f} s")
    print(f"saves:  {stats.committed} committed, {stats.skipped} skipped, "
          f"{_mb(state_bytes)} each, {_mb(stats.bytes_committed)} written "
          f"({stats.write_throughput / 1e9:.2f} GB/s while writing)")
    print(f"training loop stalled per save:         p50 {_ms(statistics.median(loop_stalls))}"
          f"   max {_ms(max(loop_stalls))}")
    print(f"same saves with torch.save + fsync:     p50 {_ms(statistics.median(sync))}"
          f"   max {_ms(max(sync))}   ({ratio:.0f}x the asyncckpt stall)")
    print(f"files in {args.dir}:")
    for name in sorted(os.listdir(args.dir)):
        path = os.path.join(args.dir, name)
        if os.path.isfile(path) and not name.startswith("."):
            print(f"  {name:28s} {_mb(os.path.getsize(path)):>10s}")
    print("index (asyncckpt-index.json): "
          + ", ".join(f"{c.name} (step {c.step}, loss {c.metrics['loss']:.3f})" for c in listing)
          + f"; latest = {listing[-1].name}"
          + (f"; best loss = {best.name}" if best else ""))

    # Resume as a fresh process would: new objects, state from the folder.
    fresh = _model(args.width)
    fresh_optim = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    state = asyncckpt.load(args.dir)
    fresh.load_state_dict(state["model"])
    fresh_optim.load_state_dict(state["optim"])
    same = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                model.state_dict().values(), strict=True))
    note = ("identical to the live model" if same and state["step"] == args.steps
            else "restored (the live model trained past it)")
    print(f"resumed from {listing[-1].name}: step {state['step']}, model + optimizer {note}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asyncckpt demo", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
