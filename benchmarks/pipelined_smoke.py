"""Smoke run: eager vs pipelined snapshots on a small MLP + Adam (CPU, or CUDA if present).

Not a benchmark (that is ``asyncckpt bench``): it only shows that both modes work end to end and
what the loop sees per save -- the stall of ``save()`` and the time the next optimizer step waited
in the guard. ``python benchmarks/pipelined_smoke.py [--width 1024] [--saves 5]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import asyncckpt


def run(mode: str, width: int, saves: int, device: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU(),
        torch.nn.Linear(width, width),
    ).to(device)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(64, width, device=device)

    def step() -> None:
        optim.zero_grad()
        model(x).pow(2).mean().backward()
        optim.step()

    step()
    with tempfile.TemporaryDirectory() as folder:
        with asyncckpt.Checkpointer(folder, snapshot=mode, keep_last=1) as ckpt:
            t0 = time.perf_counter()
            for i in range(1, saves + 1):
                ckpt.save({"model": model, "optim": optim}, step=i)
                step()
                step()
            ckpt.flush()
            seconds = time.perf_counter() - t0
            stats = ckpt.stats
    mib = stats.bytes_committed / saves / 2**20
    print(
        f"{mode:9s} {mib:7.1f} MiB/save  stall p50 {stats.stall_p50 * 1e3:7.2f} ms  "
        f"guard waits {stats.guard_waits}/{stats.guard_calls} "
        f"({stats.guard_wait_seconds * 1e3:.2f} ms)  total {seconds:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--saves", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for mode in ("eager", "pipelined"):
        run(mode, args.width, args.saves, device)


if __name__ == "__main__":
    main()
