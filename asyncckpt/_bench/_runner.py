"""Runs a benchmark: every case (size x layout) with every contender and reference interleaved,
then the training loop; writes the results.

::

    for each size, layout:   build the state, open every contender afresh
        for each round:      references and contenders in a rotated order, one save each:
                             stall, durable, CPU, peak memory; then delete it (untimed)
        close the contenders (their first save above was a real first save)
    training loop            (see _training)
    write results.json, results.md, stall.png, training.png
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from ._contenders import Contender, build_contenders
from ._dest import Destination
from ._measure import CpuWindow, MemoryProbe, summarize
from ._options import BenchOptions, format_size
from ._references import References
from ._report import markdown, plot, targets, write_outputs
from ._states import make_state
from ._training import BASELINE, run_training

__all__ = ["run_bench"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _machine(dest: Destination, device: str) -> dict[str, Any]:
    import psutil

    import asyncckpt

    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "cpu_count": len(affinity(0)) if affinity else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "asyncckpt": getattr(asyncckpt, "__version__", "?"),
        "device": (torch.cuda.get_device_name() if device == "cuda" else "cpu"),
        "destination": dest.uri,
        "filesystem": dest.kind,
        "loadavg_start": _loadavg(),
        "loadavg_end": None,
    }


def _measure_save(contender: Contender, tree: Any, step: int, probe: MemoryProbe,
                  index: int, objects: dict[str, Any] | None = None) -> dict[str, Any]:
    probe.begin()
    cpu = CpuWindow()
    cpu.start()
    t0 = time.perf_counter()
    pending = contender.save(tree, step, objects)
    t1 = time.perf_counter()
    nbytes = pending.wait()
    t2 = time.perf_counter()
    cpu.stop()
    probe.end()
    contender.cleanup()
    extra, cuda_extra = probe.settle(contender.id)
    return {
        "index": index, "step": step, "stall_s": t1 - t0, "durable_s": t2 - t0,
        "bytes": nbytes, "cpu_s": cpu.process, "caller_cpu_s": cpu.caller,
        "background_cpu_s": cpu.background, "peak_extra_rss_bytes": extra,
        "peak_extra_cuda_bytes": cuda_extra, "error": None,
    }


_SECRET_HINTS = ("key", "secret", "token", "password", "credential", "session")


def _redacted(options: dict[str, Any]) -> dict[str, Any]:
    """Storage options as they may be written to a results file: secrets masked."""
    return {k: "***" if any(h in k.lower() for h in _SECRET_HINTS) else v
            for k, v in options.items()}


def _redacted_command(command: str, options: dict[str, Any]) -> str:
    for key, value in options.items():
        if any(h in key.lower() for h in _SECRET_HINTS) and str(value):
            command = command.replace(str(value), "***")
    return command


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def run_bench(options: BenchOptions, *, command: str = "asyncckpt bench",
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark described by ``options``; write and return the results."""
    from tqdm import tqdm

    os.makedirs(options.out, exist_ok=True)
    own_dest = options.dest is None
    dest_uri = options.dest or tempfile.mkdtemp(prefix="dest-", dir=options.out)
    dest = Destination(dest_uri, options.storage_options)
    contenders, skipped = build_contenders(
        dest, modes=options.modes, direct_io=options.direct_io,
        queue_size=options.queue_size, when_full=options.when_full,
        select=options.contenders,
    )
    if options.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    results: dict[str, Any] = {
        "schema": 1,
        "command": _redacted_command(command, options.storage_options),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": _machine(dest, options.device),
        "options": {**asdict(options),
                    "storage_options": _redacted(options.storage_options)},
        "labels": {BASELINE: "no checkpointing", **{c.id: c.label for c in contenders}},
        "skipped": skipped,
        "save_latency": [],
        "training": None,
        "targets": [],
        "errors": [],
    }
    for cid, reason in skipped.items():
        log(f"asyncckpt bench: not running {cid}: {reason}")
    results["machine"]["peak_rss_method"] = MemoryProbe().method
    cases = [(size, layout) for size in options.sizes for layout in options.layouts]
    copies = 1 if options.device == "cuda" else 2
    per_round = len(contenders) + copies + (1 if dest.remote else 2)
    train_blocks = (len(contenders) + 1) * options.train_rounds if options.training else 0
    total = len(cases) * options.saves * per_round + train_blocks
    bar = tqdm(total=total, disable=not options.progress, unit="op", leave=False,
               dynamic_ncols=True)
    try:
        for size, layout in cases:
            results["save_latency"].append(
                _run_case(options, dest, contenders, size, layout, bar, results)
            )
        if options.training and contenders:
            results["training"] = _run_training(options, contenders, bar, results)
    finally:
        bar.close()
        if own_dest:
            shutil.rmtree(dest_uri, ignore_errors=True)
    results["machine"]["loadavg_end"] = _loadavg()
    results["targets"] = targets(results)
    write_outputs(results, options.out, markdown, plot)
    return results


def _run_case(options: BenchOptions, dest: Destination, contenders: list[Contender],
              size: int, layout: str, bar: Any,
              results: dict[str, Any]) -> dict[str, Any]:
    case_name = f"{format_size(size)} {layout}"
    bar.set_description(f"{case_name}: building the state")
    state = make_state(layout, size, device=options.device, seed=options.seed)
    # Contenders are opened afresh for each case, so what they retain is counted afresh too.
    probe = MemoryProbe(cuda=options.device == "cuda")
    refs = References(state.tree, state.nbytes, dest)
    saves: dict[str, list[dict[str, Any]]] = {c.id: [] for c in contenders}
    ref_runs: dict[str, list[dict[str, Any]]] = {r: [] for r in refs.ids()}
    failed: dict[str, str] = {}
    opened: list[Contender] = []
    for contender in contenders:
        try:
            contender.open()
            opened.append(contender)
        except Exception as exc:  # a peer's API changed, a backend is missing, ...
            failed[contender.id] = _error_text(exc)
            results["errors"].append({"contender": contender.id, "case": case_name,
                                      "error": _error_text(exc)})
    items: list[Contender | str] = [*refs.ids(), *opened]
    try:
        for round_ in range(options.saves):
            shift = round_ % len(items)
            for item in items[shift:] + items[:shift]:
                if isinstance(item, str):
                    bar.set_description(f"{case_name}: {item}")
                    ref = refs.run(item)
                    if ref is not None:
                        ref_runs[item].append({"seconds": ref.seconds, "bytes": ref.nbytes,
                                               "cpu_s": ref.cpu_s, "label": ref.label})
                    bar.update()
                    continue
                bar.set_description(f"{case_name}: {item.id}")
                if item.id not in failed:
                    try:
                        saves[item.id].append(
                            _measure_save(item, state.tree, round_ + 1, probe, round_,
                                          state.objects)
                        )
                    except Exception as exc:
                        failed[item.id] = _error_text(exc)
                        results["errors"].append({"contender": item.id, "case": case_name,
                                                  "error": _error_text(exc)})
                        traceback.print_exc(file=sys.stderr)
                bar.update()
    finally:
        for contender in opened:
            try:
                contender.close()
            except Exception as exc:
                results["errors"].append({"contender": contender.id, "case": case_name,
                                          "error": "closing: " + _error_text(exc)})
    summaries: dict[str, Any] = {}
    for contender in contenders:
        summary = summarize(saves[contender.id], options.warmup)
        if contender.id in failed:
            summary = {"ok": False, "error": failed[contender.id]}
        summaries[contender.id] = {"label": contender.label, **summary}
    references: dict[str, Any] = {}
    for rid, runs in ref_runs.items():
        if not runs:
            continue
        steady = runs[options.warmup:] or runs[-1:]
        p50 = statistics.median(r["seconds"] for r in steady)
        references[rid] = {
            "label": runs[0]["label"], "runs": runs, "p50_s": p50,
            "gbps": runs[0]["bytes"] / 1e9 / p50 if p50 > 0 else None,
            "cpu_s_per_gb": (
                sum(r["cpu_s"] for r in steady) / (runs[0]["bytes"] / 1e9 * len(steady))
            ),
        }
    case = {
        "size": size, "layout": layout, "state_bytes": state.nbytes, "tensors": state.tensors,
        "contenders": summaries, "references": references, "saves": saves,
    }
    del state, refs
    gc.collect()
    return case


def _run_training(options: BenchOptions, contenders: list[Contender], bar: Any,
                  results: dict[str, Any]) -> dict[str, Any] | None:
    opened: list[Contender] = []
    for contender in contenders:
        try:
            contender.open()
            opened.append(contender)
        except Exception as exc:
            results["errors"].append({"contender": contender.id, "case": "training",
                                      "error": _error_text(exc)})

    def tick(what: str) -> None:
        bar.set_description(what)
        bar.update()

    try:
        training = run_training(
            opened, nbytes=options.train_size, batch=options.train_batch,
            rounds=options.train_rounds, save_every=options.save_every,
            device=options.device, seed=options.seed, tick=tick,
        )
        for cid, error in training["failed"].items():
            results["errors"].append({"contender": cid, "case": "training", "error": error})
        return training
    except Exception as exc:
        results["errors"].append({"contender": "?", "case": "training",
                                  "error": _error_text(exc)})
        traceback.print_exc(file=sys.stderr)
        return None
    finally:
        for contender in opened:
            try:
                contender.close()
            except Exception as exc:
                results["errors"].append({"contender": contender.id, "case": "training",
                                          "error": "closing: " + _error_text(exc)})
