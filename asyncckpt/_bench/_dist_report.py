"""The multi-rank benchmark's tables (results.md) and its goals, measured and marked."""

from __future__ import annotations

import functools
from typing import Any

from ._options import format_size
from ._report import (
    _div,
    _g,
    _pct,
    _s,
    _table,
    _x,
    add_target,
    errors_lines,
    machine_text,
    skipped_lines,
    targets_lines,
)

__all__ = ["dist_markdown", "dist_targets"]

_EAGER = "asyncckpt-eager"
_DCPS = (("dcp", "DCP async_save, new stager"), ("dcp-reused-stager",
                                                 "DCP async_save, reused stager"))


def _case_name(case: dict[str, Any]) -> str:
    return f"{case['ranks']} ranks, {format_size(case['size'])} {case['layout']}"


def _worst_ratio(a: list[float], b: list[float]) -> float | None:
    """The largest per-rank ratio ``a[r] / b[r]`` (the rank furthest from the goal)."""
    ratios = [_div(x, y) for x, y in zip(a, b, strict=True)]
    known = [r for r in ratios if r is not None]
    return max(known) if known else None


def stall_vs_copy_floor(case: dict[str, Any], cid: str) -> float | None:
    """Per-rank stall p50 over the same rank's copy floor; the worst rank (ranks with an empty
    share have no floor and are left out)."""
    entry = case["contenders"].get(cid)
    if not entry:
        return None
    floors = case["floors"]
    ranks = [r for r, share in enumerate(floors["share_bytes_per_rank"]) if share > 0]
    return _worst_ratio([entry["stall_p50_s_per_rank"][r] for r in ranks],
                        [floors["copy_floor_s_per_rank"][r] for r in ranks])


def stall_vs(case: dict[str, Any], cid: str, other: str) -> float | None:
    """Per-rank stall p50 of ``cid`` over that of ``other`` on the same rank; the worst rank."""
    a, b = case["contenders"].get(cid), case["contenders"].get(other)
    if not a or not b:
        return None
    return _worst_ratio(a["stall_p50_s_per_rank"], b["stall_p50_s_per_rank"])


def dist_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals for asyncckpt's multi-rank eager saves, measured in this run."""
    rows: list[dict[str, Any]] = []
    add = functools.partial(add_target, rows)

    for case in results["save_latency"]:
        if _EAGER not in case["contenders"]:
            continue
        name = _case_name(case)
        add("per-rank stall ≤ 1.5× copy floor (worst rank)", name,
            stall_vs_copy_floor(case, _EAGER), 1.5, "×")
        for dcp, label in _DCPS:
            if dcp in case["contenders"]:
                add(f"per-rank stall ≤ 0.5× {label} (worst rank)", name,
                    stall_vs(case, _EAGER, dcp), 0.5, "×")
        add("throughput to durable ≥ 0.8× raw write floor", name,
            _div(case["contenders"][_EAGER]["throughput_gbps"],
                 case["floors"]["raw_write_gbps"]), 0.8, "×", higher_is_better=True)
    for training in results.get("training") or []:
        add(f"training-loop overhead ≤ 5 % (save every {training['save_every']} steps, "
            "worst rank)", f"{training['ranks']} ranks, {format_size(training['state_bytes'])}",
            training["overhead_pct"], 5.0, "%")
    return rows


def _case_table(case: dict[str, Any]) -> list[str]:
    floors = case["floors"]
    c = case["contenders"]
    rows = []
    for cid, s in c.items():
        rows.append([
            s["label"], _s(s["first_stall_s"]), _s(s["stall_p50_s"]),
            ", ".join(_s(x) for x in s["stall_p50_s_per_rank"]),
            _x(stall_vs_copy_floor(case, cid)),
            _x(stall_vs(case, cid, "dcp")), _x(stall_vs(case, cid, "dcp-reused-stager")),
            _s(s["durable_p50_s"]), _g(s["throughput_gbps"]),
            _x(_div(s["throughput_gbps"], floors["raw_write_gbps"])),
            ", ".join(format_size(x) for x in s["peak_extra_rss_bytes_per_rank"]),
        ])
    rows.append(["*copy floor (each rank its share, warm buffer)*", "",
                 _s(floors["copy_floor_s"]),
                 ", ".join(_s(x) for x in floors["copy_floor_s_per_rank"]), "1.00×", "", "",
                 "", "", "", ""])
    rows.append(["*raw write floor (every rank its share, write + fsync, at once)*", "", "", "",
                 "", "", "", _s(floors["raw_write_s"]), _g(floors["raw_write_gbps"]), "1.00×",
                 ""])
    shares = ", ".join(format_size(x) for x in floors["share_bytes_per_rank"])
    return ["", f"## {_case_name(case)} ({case['tensors']} tensors, "
            f"{case['state_bytes'] / 1e9:.3f} GB, replicated; shares per rank: {shares})", "",
            *_table(["contender", "stall first", "stall p50 (slowest rank)", "per rank",
                     "× copy floor", "× DCP", "× DCP reused", "durable p50",
                     "GB/s to durable", "× raw write", "peak extra RSS per rank"], rows)]


def dist_markdown(results: dict[str, Any]) -> str:
    """The tables a person reads: each world size and case, the training loop, the goals."""
    m = results["machine"]
    o = results["options"]
    lines = [
        "# asyncckpt bench, multi-rank",
        "",
        f"Run `{results['command']}` on {results['started']}.",
        "",
        machine_text(m, f"; ranks started by {m['start_method']}, backend {m['backend']}"),
        "",
        f"For each world size the ranks run every contender side by side on the same state, "
        f"one save each in a rotated order, {o['saves']} rounds; the first {o['warmup']} are "
        f"warm-up. DCP's reused staging: {results['dcp_reused_staging']}.",
        "",
        "How to read it: *stall* is how long `save()` blocked the caller, *durable* from the "
        "call until the checkpoint is durable; both are the slowest rank's (medians over the "
        "steady rounds), with each rank's median under *per rank*. *× copy floor* divides each "
        "rank's stall by the time that rank takes to copy its share into a warm buffer, *× DCP* "
        "by DCP `async_save`'s stall on the same rank (the worst rank is shown). *GB/s to "
        "durable* is the checkpoint's bytes over the time to durable; *× raw write* divides it "
        "by every rank writing its share with plain writes + fsync at once. *Peak extra RSS* "
        "is the memory a rank needed beyond the state, buffers kept between saves included.",
    ]
    lines += skipped_lines(results)
    for case in results["save_latency"]:
        lines += _case_table(case)
    if results.get("training"):
        lines += ["", "## Training loop (every rank trains its replica; asyncckpt eager "
                  "against no checkpointing)", ""]
        lines += _table(
            ["ranks", "state", "save every", "baseline step per rank", "overhead per rank",
             "paired median per rank", "stall p50", "max wait at block end"],
            ([str(t["ranks"]), format_size(t["state_bytes"]), f"{t['save_every']} steps",
              ", ".join(_s(x) for x in t["baseline_step_s_per_rank"]),
              ", ".join(_pct(x) for x in t["overhead_pct_per_rank"]),
              ", ".join(_pct(x) for x in t["overhead_paired_median_pct_per_rank"]),
              _s(t["stall_p50_s"]), _s(t["drain_max_s"])] for t in results["training"]))
    lines += targets_lines(results, "## Goals (asyncckpt eager, multi-rank)",
                           ("met", "**not met**"))
    lines += errors_lines(results)
    return "\n".join(lines) + "\n"
