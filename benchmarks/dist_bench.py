"""Multi-rank checkpoint benchmark: asyncckpt against DCP ``async_save`` and ``torch.save`` on
rank 0, with the same ranks and the same state.

Usage::

    python benchmarks/dist_bench.py --ranks 2,4 --mib 128 --saves 5

Every contender runs in a fresh set of gloo ranks (CPU) on one machine, so its peak memory is
its own. The state is DDP-like: replicated float32 tensors (the same on every rank), ``--mib``
in total. Reported per contender and world size (medians over the saves after the first):

* stall: how long ``save()`` blocks the training loop, the slowest rank;
* durable: from ``save()`` to the checkpoint being durable (committed), the slowest rank;
* throughput: state bytes / durable time;
* extra MiB: peak resident memory of the rank minus before the first save, the largest rank;
* floors: copying one rank's share into a warm buffer (the least a snapshot can cost) and every
  rank writing its share to a new file with fsync at once (the raw write floor).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import queue
import shutil
import socket
import statistics
import tempfile
import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TENSORS = 64


def _state(mib: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    numel = mib * (1 << 20) // 4 // TENSORS
    return {f"layer{i}.weight": torch.randn(numel, generator=g) for i in range(TENSORS)}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


class _PeakSampler:
    """The highest resident memory seen while it runs (sampled every 2 ms)."""

    def __init__(self) -> None:
        self.peak = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_mib())


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def _floors(state: dict[str, torch.Tensor], folder: str, rank: int, world: int) -> dict[str, float]:
    tensors = list(state.values())[rank::world]  # about this rank's share
    share = sum(t.numel() * t.element_size() for t in tensors)
    buffers = [torch.empty_like(t) for t in tensors]
    for b, t in zip(buffers, tensors, strict=True):  # warm
        b.copy_(t)
    t0 = time.perf_counter()
    for b, t in zip(buffers, tensors, strict=True):
        b.copy_(t)
    copy = time.perf_counter() - t0
    dist.barrier()
    t0 = time.perf_counter()
    with open(os.path.join(folder, f"raw{rank}"), "wb") as f:
        for t in tensors:
            f.write(memoryview(t.numpy()).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    local = time.perf_counter() - t0
    dist.barrier()
    write = time.perf_counter() - t0
    os.unlink(os.path.join(folder, f"raw{rank}"))
    return {"copy_floor": copy, "raw_write": write, "raw_local": local, "share": share}


def _run_asyncckpt(state: dict[str, Any], folder: str, saves: int) -> list[tuple[float, float]]:
    import asyncckpt

    out = []
    with asyncckpt.Checkpointer(folder, keep_last=1) as ckpt:
        for step in range(saves):
            dist.barrier()
            t0 = time.perf_counter()
            handle = ckpt.save(state, step=step)
            stall = time.perf_counter() - t0
            handle.wait()
            out.append((stall, time.perf_counter() - t0))
    return out


def _run_dcp(state: dict[str, Any], folder: str, saves: int,
             reuse: bool) -> list[tuple[float, float]]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    # one stager for every save: it keeps its staging buffers (no pinned/shared memory on CPU)
    stager = DefaultStager(StagingOptions(False, False, False, False)) if reuse else None
    out = []
    for step in range(saves):
        dist.barrier()
        t0 = time.perf_counter()
        kwargs = {"async_stager": stager} if stager is not None else {}
        future = dcp.async_save(state, checkpoint_id=os.path.join(folder, f"step_{step}"),
                                **kwargs)
        stall = time.perf_counter() - t0
        future.result()
        out.append((stall, time.perf_counter() - t0))
        dist.barrier()
        if dist.get_rank() == 0 and step:
            shutil.rmtree(os.path.join(folder, f"step_{step - 1}"))
    return out


def _run_torch_save(state: dict[str, Any], folder: str, saves: int) -> list[tuple[float, float]]:
    out = []
    for step in range(saves):
        dist.barrier()
        t0 = time.perf_counter()
        if dist.get_rank() == 0:
            path = os.path.join(folder, f"step_{step}.pt")
            torch.save(state, path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        dist.barrier()  # the other ranks wait for rank 0 (a blocking save stalls everyone)
        elapsed = time.perf_counter() - t0
        out.append((elapsed, elapsed))
    return out


def _rank(rank: int, world: int, port: int, contender: str, mib: int, saves: int, folder: str,
          results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=600))
    for module in ("torch.distributed.checkpoint", "asyncckpt"):  # before the memory baseline
        importlib.import_module(module)
    state = _state(mib)
    floors = _floors(state, folder, rank, world) if contender == "asyncckpt" else {}
    before = _rss_mib()
    sampler = _PeakSampler()
    if contender == "asyncckpt":
        timings = _run_asyncckpt(state, folder, saves)
    elif contender in ("dcp", "dcp-reused"):
        timings = _run_dcp(state, folder, saves, reuse=contender == "dcp-reused")
    else:
        timings = _run_torch_save(state, folder, saves)
    results.put((rank, {"timings": timings, "extra_mib": sampler.stop() - before, **floors}))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(contender: str, world: int, mib: int, saves: int, root: str) -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix=f"{contender}-{world}-", dir=root)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, contender, mib, saves, folder,
                                              results)) for r in range(world)]
    for p in procs:
        p.start()
    per_rank: dict[int, Any] = {}
    while len(per_rank) < world:
        try:
            rank, row = results.get(timeout=5)
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a rank of {contender} on {world} ranks failed") from None
            continue
        per_rank[rank] = row
    for p in procs:
        p.join(600)
    shutil.rmtree(folder, ignore_errors=True)
    steady = range(1, saves)  # the first save plans and allocates
    stall = [max(per_rank[r]["timings"][i][0] for r in per_rank) for i in steady]
    durable = [max(per_rank[r]["timings"][i][1] for r in per_rank) for i in steady]
    first = per_rank[0]["timings"][0]
    row: dict[str, Any] = {
        "contender": contender, "ranks": world, "mib": mib,
        "stall_s": statistics.median(stall), "durable_s": statistics.median(durable),
        "first_stall_s": first[0], "first_durable_s": first[1],
        "throughput_mib_s": mib / statistics.median(durable),
        "extra_mib": max(per_rank[r]["extra_mib"] for r in per_rank),
    }
    if "copy_floor" in per_rank[0]:
        row["copy_floor_s"] = max(per_rank[r]["copy_floor"] for r in per_rank)
        row["raw_write_s"] = max(per_rank[r]["raw_write"] for r in per_rank)
        row["raw_mib_s"] = mib / row["raw_write_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="2,4", help="world sizes, comma-separated")
    parser.add_argument("--mib", type=int, default=128, help="state size in MiB")
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--contenders", default="asyncckpt,dcp,dcp-reused,torch.save")
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="dist-bench-")
    rows = []
    for world in (int(r) for r in args.ranks.split(",")):
        for contender in args.contenders.split(","):
            row = measure(contender, world, args.mib, args.saves, root)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
