"""What a state of very many tiny tensors costs: stall, time to durable, peak memory.

Usage: ``python benchmarks/many_tiny_tensors.py N`` (N float32 tensors of 4 elements in a dict).
Prints the stall of one ``save()``, the time until it is durable, ``torch.save`` of the same
state for comparison, and the peak RSS above the state (in all and per tensor).
"""

from __future__ import annotations

import gc
import resource
import sys
import tempfile
import time

import torch

import asyncckpt


def main(n: int) -> None:
    state = {f"t{i}": torch.randn(4) for i in range(n)}
    gc.collect()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with tempfile.TemporaryDirectory() as folder:
        with asyncckpt.Checkpointer(folder) as ckpt:
            t0 = time.perf_counter()
            handle = ckpt.save(state, step=1)
            t1 = time.perf_counter()
            handle.wait()
            t2 = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t3 = time.perf_counter()
        torch.save(state, f"{folder}/reference.pt")
        t4 = time.perf_counter()
    extra = (peak - base) * 1024
    print(f"tensors={n} data={n * 16 / 1e6:.1f} MB stall={t1 - t0:.2f} s "
          f"durable={t2 - t0:.2f} s torch.save={t4 - t3:.2f} s "
          f"peak extra={extra / 2**20:.0f} MiB ({extra / n:.0f} B per tensor)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
