"""The goals each figure of a run is held to: one row per goal, case and contender.

Every goal is a ratio measured in the same run (or a difference against a reference measured in
it), so a busy machine moves the figure and its limit alike:

* eager stall against the memory-copy floor (at most 1.5× of it, and at most 1 ms above it: the
  fixed cost of a save), against ``torch.save`` + fsync and against DCP's stall;
* the first save's stall, whose arena pages are faulted in, against the floor;
* a pipelined save, where the optimizer is in the state (layout ``model``), blocks ≤ 1 ms;
* throughput to durable against the raw write of the same bytes, peak memory;
* many-tensor states (layout ``tiny-many``): stall ≤ 0.1× and the write (time to durable less
  the stall) ≤ 1× ``torch.save`` + fsync, peak extra memory ≤ 2× the data plus
  :data:`PER_TENSOR_BYTES` per tensor;
* the training loop's overhead.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from ._options import format_size

__all__ = ["PER_TENSOR_BYTES", "add_target", "targets"]

#: The per-tensor memory allowance of a many-tensor state: the plan kept for the next save
#: (its records and the placeholder tensors bound into each arena) and the serializer's pickle.
PER_TENSOR_BYTES = 4096

_EAGER = ("asyncckpt-eager", "asyncckpt-eager-direct")
_PIPELINED = ("asyncckpt-pipelined", "asyncckpt-pipelined-direct")


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _floor(case: dict[str, Any]) -> float | None:
    refs = case["references"]
    values = [refs[r]["p50_s"] for r in ("memcpy", "copy_") if r in refs]
    return min(values) if values else None


def _raw_gbps(case: dict[str, Any], ref: str) -> float | None:
    entry = case["references"].get(ref)
    return None if entry is None else entry["gbps"]


def add_target(rows: list[dict[str, Any]], what: str, case: str, value: float | None,
               limit: float, unit: str, higher_is_better: bool = False) -> None:
    """Append a target row: the measured ``value`` against ``limit``, met or not (None:
    could not be measured)."""
    met = None if value is None else (value >= limit if higher_is_better else value <= limit)
    rows.append({"target": what, "case": case, "value": value, "limit": limit, "unit": unit,
                 "met": met})


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """asyncckpt's performance goals, each with the figure this run measured for it."""
    rows: list[dict[str, Any]] = []
    queue = results["options"]["queue_size"]

    add = functools.partial(add_target, rows)

    for case in results["save_latency"]:
        name = f"{format_size(case['size'])} {case['layout']}"
        c = case["contenders"]
        floor = _floor(case)
        torch_save = c.get("torch-save", {})
        torch_s = torch_save["stall_p50_s"] if torch_save.get("ok") else None
        eager = c.get("asyncckpt-eager", {})
        if eager.get("ok"):
            stall = eager["stall_p50_s"]
            add("eager stall ≤ 1.5× memory-copy floor", name, _div(stall, floor), 1.5, "×")
            add("eager stall ≤ 1/10 of torch.save + fsync", name, _div(stall, torch_s), 0.1,
                "×")
            dcps = [c[k]["stall_p50_s"] for k in ("dcp", "dcp-reused-stager")
                    if c.get(k, {}).get("ok")]
            if dcps:
                add("eager stall ≤ DCP async_save stall (best stager)", name,
                    _div(stall, min(dcps)), 1.0, "×")
        for cid in _EAGER:
            entry = c.get(cid, {})
            if not entry.get("ok"):
                continue
            if floor is not None and case["layout"] != "tiny-many":
                add(f"{cid}: fixed cost, stall − copy floor ≤ 1 ms", name,
                    (entry["stall_p50_s"] - floor) * 1e3, 1.0, "ms")
                add(f"{cid}: first-save stall ≤ 2× copy floor", name,
                    _div(entry["first_stall_s"], floor), 2.0, "×")
            add(f"{cid}: peak extra RSS ≤ (queue_size + 1) × state + 10 %", name,
                _div(entry["peak_extra_rss_bytes"], case["state_bytes"]),
                (queue + 1) * 1.1, "× state")
        if case["layout"] == "model":  # the optimizer is in the state: a pipelined save
            for cid in _PIPELINED:
                entry = c.get(cid, {})
                if entry.get("ok"):
                    add(f"{cid}: stall ≤ 1 ms", name, entry["stall_p50_s"] * 1e3, 1.0, "ms")
        if case["layout"] == "tiny-many":
            for cid in (*_EAGER, *_PIPELINED):
                entry = c.get(cid, {})
                if not entry.get("ok"):
                    continue
                add(f"{cid}: many tensors, stall ≤ 0.1× torch.save + fsync", name,
                    _div(entry["stall_p50_s"], torch_s), 0.1, "×")
                add(f"{cid}: many tensors, write (durable − stall) ≤ 1× torch.save + fsync",
                    name, _div(entry["durable_p50_s"] - entry["stall_p50_s"], torch_s), 1.0, "×")
                extra = entry["peak_extra_rss_bytes"] - 2 * case["state_bytes"]
                add(f"{cid}: many tensors, peak extra RSS ≤ 2× data + {PER_TENSOR_BYTES} B "
                    "per tensor", name, max(extra, 0) / case["tensors"], PER_TENSOR_BYTES,
                    "B/tensor")
        for cid, ref in (("asyncckpt-eager", "write-buffered"),
                         ("asyncckpt-eager-direct", "write-direct"),
                         ("asyncckpt-eager", "upload")):
            entry = c.get(cid, {})
            raw = _raw_gbps(case, ref)
            if entry.get("ok") and raw:
                add(f"{cid}: throughput ≥ 0.8× raw {ref}", name,
                    _div(entry["throughput_gbps"], raw), 0.8, "×", higher_is_better=True)
    training = results.get("training")
    if training:
        for cid in _EAGER:
            entry = training["summary"].get(cid)
            if entry is not None:
                add(f"{cid}: training-loop overhead ≤ 5 % (save every "
                    f"{training['save_every']} steps)", format_size(training["state_bytes"]),
                    entry["overhead_pct"], 5.0, "%")
        for cid in _PIPELINED:
            entry = training["summary"].get(cid)
            if entry is not None and entry.get("stall_p50_s") is not None:
                add(f"{cid}: training-loop stall ≤ 1 ms", format_size(training["state_bytes"]),
                    entry["stall_p50_s"] * 1e3, 1.0, "ms")
    return rows
