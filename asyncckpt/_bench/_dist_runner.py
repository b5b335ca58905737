"""Runs the multi-rank benchmark: for each world size, start that many ranks on this machine,
let them measure every contender side by side (see ``_dist_rank``), then fold their raw
figures into one result per world size and case and write results.json and results.md.

Folding: a save's stall and time to durable are those of its slowest rank (a collective save
is as slow as its slowest rank); per-rank medians are kept too. The copy floor is per rank;
the raw write floor is the time until the last rank's plain write + fsync of its share is done,
every rank writing at once, and its throughput is the bytes of all shares over that time.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from ._dest import Destination
from ._dist_options import DistBenchOptions, dist_unavailable
from ._dist_rank import make_contenders, rank_main, staging_used
from ._dist_report import dist_markdown, dist_targets
from ._report import write_outputs
from ._runner import _loadavg, _machine

__all__ = ["run_dist_bench"]

_POLL_S = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_environment(options: DistBenchOptions) -> None:
    reason = dist_unavailable()
    if reason is not None:
        raise ValueError(f"--ranks needs torch.distributed: {reason}")
    if options.bench.device == "cuda":
        import torch.distributed as dist

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        if not dist.is_nccl_available():
            raise ValueError("--device cuda with --ranks: this torch build has no nccl backend")


def _launch(world: int, spec: dict[str, Any], deadline_s: float) -> list[dict[str, Any]]:
    """Start ``world`` ranks, wait (bounded) for their figures; every rank is gone on return.

    Raises:
        RuntimeError: a rank failed, died, or did not report within ``deadline_s``.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, spec, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    per_rank: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + deadline_s
    try:
        while len(per_rank) < world:
            try:
                rank, payload = results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} of {world} exited with code "
                                       f"{procs[dead[0]].exitcode} before reporting") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{world} ranks: no result within {deadline_s:.0f} s") from None
                continue
            out = pickle.loads(payload)
            if isinstance(out, str):
                raise RuntimeError(out.strip())
            per_rank[rank] = out
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        results.close()
    return [per_rank[r] for r in range(world)]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _fold_case(world: int, ranks: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """One case (size x layout) of one world size, from every rank's raw figures."""
    first = ranks[0]
    rounds = len(first["floors"])
    steady = list(range(warmup, rounds)) or [rounds - 1]
    copy_per_rank = [_median([r["floors"][i]["copy_s"] for i in steady]) for r in ranks]
    write_rounds = [max(r["floors"][i]["write_s"] for r in ranks) for i in steady]
    shares = [r["share_bytes"] for r in ranks]
    raw_write_s = _median(write_rounds)
    floors = {
        "copy_floor_s_per_rank": copy_per_rank,
        "copy_floor_s": max(copy_per_rank),
        "share_bytes_per_rank": shares,
        "raw_write_s": raw_write_s,
        "raw_write_gbps": sum(shares) / 1e9 / raw_write_s if raw_write_s > 0 else float("nan"),
    }
    contenders: dict[str, Any] = {}
    saves: dict[str, Any] = {}
    for cid in first["saves"]:
        rows = [r["saves"][cid] for r in ranks]  # rows[rank][save]
        stall = [max(rows[k][i]["stall_s"] for k in range(world)) for i in range(rounds)]
        durable = [max(rows[k][i]["durable_s"] for k in range(world)) for i in range(rounds)]
        per_rank_stall = [_median([rows[k][i]["stall_s"] for i in steady]) for k in range(world)]
        nbytes = max(_median([rows[k][i]["bytes"] for i in steady]) for k in range(world))
        durable_p50 = _median([durable[i] for i in steady])
        cuda = [s["peak_extra_cuda_bytes"] for row in rows for s in row
                if s["peak_extra_cuda_bytes"] is not None]
        extra = [max(s["peak_extra_rss_bytes"] for s in row) for row in rows]
        contenders[cid] = {
            "ok": True,
            "label": first["labels"][cid],
            "saves": rounds,
            "steady_saves": len(steady),
            "bytes": nbytes,
            "first_stall_s": stall[0],
            "first_durable_s": durable[0],
            "stall_p50_s": _median([stall[i] for i in steady]),
            "stall_p50_s_per_rank": per_rank_stall,
            "durable_p50_s": durable_p50,
            "durable_p50_s_per_rank": [_median([rows[k][i]["durable_s"] for i in steady])
                                       for k in range(world)],
            "throughput_gbps": nbytes / 1e9 / durable_p50 if durable_p50 > 0 else float("nan"),
            "peak_extra_rss_bytes": max(extra),
            "peak_extra_rss_bytes_per_rank": extra,
            "peak_extra_cuda_bytes": max(cuda) if cuda else None,
        }
        saves[cid] = [{"index": i, "stall_s": stall[i], "durable_s": durable[i],
                       "per_rank": [rows[k][i] for k in range(world)]} for i in range(rounds)]
    return {"ranks": world, "size": first["size"], "layout": first["layout"],
            "state_bytes": first["state_bytes"], "tensors": first["tensors"],
            "floors": floors, "contenders": contenders, "saves": saves}


def _fold_training(world: int, ranks: list[dict[str, Any]]) -> dict[str, Any] | None:
    runs = [r["training"] for r in ranks]
    if any(t is None for t in runs):
        return None
    failed = {cid: err for t in runs for cid, err in t["failed"].items()}
    eager = [t["summary"].get("asyncckpt-eager") for t in runs]
    ok = all(e is not None for e in eager)
    first = runs[0]
    return {
        "ranks": world, "state_bytes": first["state_bytes"], "batch": first["batch"],
        "rounds": first["rounds"], "save_every": first["save_every"],
        "baseline_step_s_per_rank": [t["baseline_step_s"] for t in runs],
        "overhead_pct": max(e["overhead_pct"] for e in eager) if ok else None,
        "overhead_pct_per_rank": [e["overhead_pct"] if e else None for e in eager],
        "overhead_paired_median_pct_per_rank": [
            e.get("overhead_paired_median_pct") if e else None for e in eager],
        "stall_p50_s": max(e["stall_p50_s"] for e in eager) if ok else None,
        "drain_max_s": max(e["drain_max_s"] for e in eager) if ok else None,
        "summary_per_rank": [t["summary"] for t in runs],
        "failed": failed,
    }


def run_dist_bench(options: DistBenchOptions, *, command: str = "asyncckpt bench",
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the multi-rank benchmark described by ``options``; write and return the results.

    Raises:
        ValueError: the environment cannot run it (no torch.distributed, no CUDA for
            ``--device cuda``), or no contender can run.
    """
    _check_environment(options)
    bench = options.bench
    os.makedirs(bench.out, exist_ok=True)
    own_dest = bench.dest is None
    dest_uri = bench.dest or tempfile.mkdtemp(prefix="dest-", dir=bench.out)
    dest = Destination(dest_uri)
    skipped: dict[str, str] = {}
    labels: dict[str, str] = {}
    for cid in options.contenders:
        try:
            labels[cid] = make_contenders(dest, (cid,))[0].label
        except ValueError as exc:
            skipped[cid] = str(exc)
    if not labels:
        raise ValueError("no contender can run here: " + "; ".join(skipped.values()))
    results: dict[str, Any] = {
        "schema": 1,
        "benchmark": "multi-rank",
        "command": command,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {**_machine(dest, bench.device),
                    "backend": "cpu:gloo,cuda:nccl" if bench.device == "cuda" else "gloo",
                    "start_method": "spawn"},
        "options": {**asdict(bench), "ranks": list(options.ranks),
                    "timeout_s": options.timeout_s},
        "labels": labels,
        "skipped": skipped,
        "dcp_reused_staging": staging_used(),
        "save_latency": [],
        "training": [],
        "targets": [],
        "errors": [],
    }
    for cid, reason in skipped.items():
        log(f"asyncckpt bench: not running {cid}: {reason}")
    spec = options.spec(dest.root, list(labels))
    cases = len(bench.sizes) * len(bench.layouts) + (1 if bench.training else 0)
    try:
        for world in options.ranks:
            if bench.progress:
                log(f"asyncckpt bench: {world} ranks ...")
            try:
                ranks = _launch(world, spec, options.timeout_s * cases)
            except RuntimeError as exc:
                results["errors"].append({"contender": "?", "case": f"{world} ranks",
                                          "error": str(exc)[:2000]})
                continue
            for i in range(len(ranks[0]["cases"])):
                results["save_latency"].append(
                    _fold_case(world, [r["cases"][i] for r in ranks], bench.warmup))
            training = _fold_training(world, ranks)
            if training is not None:
                results["training"].append(training)
                for cid, error in training["failed"].items():
                    results["errors"].append({"contender": cid,
                                              "case": f"training, {world} ranks",
                                              "error": error})
    finally:
        if own_dest:
            shutil.rmtree(dest_uri, ignore_errors=True)
    results["machine"]["loadavg_end"] = _loadavg()
    results["targets"] = dist_targets(results)
    write_outputs(results, bench.out, dist_markdown)
    return results
