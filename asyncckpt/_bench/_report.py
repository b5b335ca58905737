"""Outputs of a run: ``results.json`` (every raw figure), ``results.md`` (tables of ratios) and
PNG plots (stall per save; the training-loop timeline)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

from ._goals import _div, _floor, _raw_gbps, add_target, targets
from ._options import format_size

__all__ = [
    "add_target",
    "errors_lines",
    "machine_text",
    "markdown",
    "plot",
    "skipped_lines",
    "targets",
    "targets_lines",
    "write_json",
    "write_outputs",
]

REFERENCE_ROW_IDS = ("memcpy", "copy_", "write-buffered", "write-direct", "upload")


def _s(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x >= 10:
        return f"{x:.1f} s"
    if x >= 0.1:
        return f"{x:.2f} s"
    return f"{x * 1e3:.1f} ms"


def _x(x: float | None) -> str:
    if x is None or math.isnan(x) or math.isinf(x):
        return "–"
    return f"{x:.2f}×" if x < 10 else f"{x:.0f}×"


def _g(x: float | None, unit: str = "") -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{x:.2f}{unit}"


def _pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:+.1f} %"


def write_json(results: dict[str, Any], path: str) -> None:
    """Write the results; NaN becomes null so any JSON reader can load it."""

    def clean(obj: Any) -> Any:
        if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
            return None
        if isinstance(obj, dict):
            return {str(k): clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        return obj

    with open(path, "w", encoding="utf-8") as f:
        json.dump(clean(results), f, indent=1, allow_nan=False)
        f.write("\n")


def write_outputs(results: dict[str, Any], out: str, render: Callable[[dict[str, Any]], str],
                  plots: Callable[[dict[str, Any], str], list[str]] | None = None) -> None:
    """Write results.json and results.md (``render``'s text), and the plots, into ``out``;
    record their paths in ``results["outputs"]``."""
    json_path = os.path.join(out, "results.json")
    md_path = os.path.join(out, "results.md")
    results["outputs"] = {"json": json_path, "markdown": md_path}
    results["outputs"]["plots"] = plots(results, out) if plots is not None else []
    write_json(results, json_path)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(render(results))


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def machine_text(m: dict[str, Any], extra: str = "") -> str:
    """The machine paragraph of results.md (``extra``: a sentence after the device)."""
    return (f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), "
            f"{format_size(m['memory_bytes'])} RAM, {m['platform']}; Python {m['python']}, "
            f"torch {m['torch']}, device {m['device']}{extra}. Destination "
            f"`{m['destination']}` ({m['filesystem']}). Load average at start / end: "
            f"{m['loadavg_start']} / {m['loadavg_end']}.")


def skipped_lines(results: dict[str, Any]) -> list[str]:
    """The contenders that did not run, and why."""
    if not results.get("skipped"):
        return []
    return ["", "Not run: " + "; ".join(f"`{k}` ({v})" for k, v in
                                       results["skipped"].items()) + "."]


def targets_lines(results: dict[str, Any], heading: str, marks: tuple[str, str]) -> list[str]:
    """The targets table under ``heading``; ``marks``: the words for met and not met."""
    rows = results.get("targets") or []
    if not rows:
        return []
    words = {True: marks[0], False: marks[1], None: "–"}
    return ["", heading, "", *_table(
        ["target", "case", "measured", "limit", "met"],
        ([t["target"], t["case"], "–" if t["value"] is None else
          f"{t['value']:.2f} {t['unit']}", f"{t['limit']:g} {t['unit']}", words[t["met"]]]
         for t in rows))]


def errors_lines(results: dict[str, Any]) -> list[str]:
    """The errors section (none: no lines)."""
    if not results.get("errors"):
        return []
    return ["", "## Errors", ""] + [f"* `{e['contender']}` ({e['case']}): {e['error']}"
                                    for e in results["errors"]]


def markdown(results: dict[str, Any]) -> str:
    """The tables a person reads: ratios against the references and the peers."""
    m = results["machine"]
    o = results["options"]
    lines = [
        "# asyncckpt bench",
        "",
        f"Run `{results['command']}` on {results['started']}.",
        "",
        machine_text(m),
        "",
        f"Each contender saved {o['saves']} times per case, interleaved with the others; the "
        f"first {o['warmup']} saves are warm-up, the steady state is the rest. asyncckpt ran "
        f"with queue_size={o['queue_size']}, when_full={o['when_full']!r}.",
        "",
        "How to read it: *stall* is how long `save()` blocked the caller; *durable* is from "
        "the call until the bytes are fsynced (or uploaded). *× floor* divides the stall by "
        "the memory-copy floor (the least an eager snapshot can cost); *× torch.save* divides "
        "it by synchronous torch.save + fsync; *× raw write* divides the throughput to durable "
        "by `os.write` + `fsync` of as many bytes through the page cache. *Peak extra RSS* is "
        "the host memory the contender needed above the state itself (buffers it keeps count). "
        "*CPU s/GB* is process CPU time per GB committed; *background* is the part spent "
        "outside the caller's thread.",
    ]
    lines += skipped_lines(results)
    for case in results["save_latency"]:
        c = case["contenders"]
        floor = _floor(case)
        torch_stall = c.get("torch-save", {}).get("stall_p50_s") if c.get(
            "torch-save", {}).get("ok") else None
        raw = _raw_gbps(case, "write-buffered") or _raw_gbps(case, "upload")
        lines += ["", f"## Save latency: {format_size(case['size'])}, layout `{case['layout']}` "
                  f"({case['tensors']} tensors, {case['state_bytes'] / 1e9:.3f} GB)", ""]
        rows = []
        for s in c.values():
            if not s.get("ok"):
                rows.append([s["label"], "failed: " + str(s.get("error", "?"))[:80]] + [""] * 11)
                continue
            rows.append([
                s["label"], _s(s["first_stall_s"]), _s(s["stall_p50_s"]), _s(s["stall_p95_s"]),
                _s(s["stall_max_s"]), _x(_div(s["stall_p50_s"], floor)),
                _x(_div(s["stall_p50_s"], torch_stall)), _s(s["durable_p50_s"]),
                _g(s["throughput_gbps"]), _x(_div(s["throughput_gbps"], raw)),
                _x(_div(s["peak_extra_rss_bytes"], case["state_bytes"])),
                _g(s["cpu_s_per_gb"]), _g(s["background_cpu_s_per_gb"]),
            ])
        for rid in REFERENCE_ROW_IDS:
            r = case["references"].get(rid)
            if r is None:
                continue
            copy = rid in ("memcpy", "copy_")
            rows.append([
                f"*{r['label']}*", "", _s(r["p50_s"]) if copy else "", "", "",
                _x(_div(r["p50_s"], floor)) if copy else "", "",
                "" if copy else _s(r["p50_s"]), "" if copy else _g(r["gbps"]),
                "" if copy else _x(_div(r["gbps"], raw)), "",
                _g(r["cpu_s_per_gb"]), "",
            ])
        lines += _table(
            ["contender", "stall first", "stall p50", "p95", "max", "× floor", "× torch.save",
             "durable p50", "GB/s to durable", "× raw write", "peak extra RSS (× state)",
             "CPU s/GB", "background CPU s/GB"], rows)
    training = results.get("training")
    if training:
        lines += ["", f"## Training loop: {format_size(training['state_bytes'])} of params + Adam "
                  f"state, batch {training['batch']}, a save every {training['save_every']} "
                  f"steps ({training['rounds']} rounds, the first a warm-up)", "",
                  f"Baseline step without checkpointing: {_s(training['baseline_step_s'])}.", ""]
        labels = results["labels"]
        lines += _table(
            ["contender", "mean step", "median step", "overhead", "overhead (paired median)",
             "stall p50", "max wait at block end"],
            ([labels.get(cid, cid), _s(s["mean_step_s"]), _s(s["median_step_s"]),
              f"{s['overhead_pct']:+.1f} %", _pct(s.get("overhead_paired_median_pct")),
              _s(s["stall_p50_s"]) if cid != "none" else "", _s(s["drain_max_s"])
              if cid != "none" else ""] for cid, s in training["summary"].items()))
    lines += targets_lines(results, "## Targets (asyncckpt)", ("yes", "**no**"))
    lines += errors_lines(results)
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: str) -> list[str]:
    """Write the PNG plots into ``out``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths: list[str] = []
    cases = results["save_latency"]
    if cases:
        cols = min(2, len(cases))
        rows = -(-len(cases) // cols)
        # At least 11 inches wide: the legend (up to 4 columns of labels) must fit below.
        fig, axes = plt.subplots(rows, cols, figsize=(max(11, 7 * cols), 4.2 * rows),
                                 squeeze=False)
        for ax, case in zip(axes.flat, cases, strict=False):
            for cid, s in case["contenders"].items():
                saves = [r for r in case["saves"].get(cid, []) if r.get("error") is None]
                if not saves:
                    continue
                ax.plot([r["index"] + 1 for r in saves], [r["stall_s"] for r in saves],
                        marker="o", markersize=3, label=s["label"])
            floor = _floor(case)
            if floor:
                ax.axhline(floor, color="k", linestyle="--", linewidth=1,
                           label="memory-copy floor")
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{format_size(case['size'])}, {case['layout']}")
            ax.set_xlabel("save #")
            ax.set_ylabel("stall (s, log)")
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(cases):]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
        fig.suptitle("save() stall per save, by contender and state size")
        fig.tight_layout(rect=(0, (0.08 + 0.02 * (len(labels) // 4)) / rows, 1, 0.96))
        path = os.path.join(out, "stall.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    training = results.get("training")
    if training:
        fig, ax = plt.subplots(figsize=(12, 4.5))
        timeline = training["timeline"]
        labels = results["labels"]
        names = list(training["summary"])
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, name in enumerate(names):
            points = [t for t in timeline if t["contender"] == name]
            color = colors[i % len(colors)]
            ax.scatter([t["index"] for t in points], [t["step_s"] * 1e3 for t in points],
                       s=6, color=color, label=labels.get(name, name))
            saved = [t for t in points if t["saved"]]
            ax.scatter([t["index"] for t in saved], [t["step_s"] * 1e3 for t in saved],
                       s=40, marker="v", color=color, edgecolors="k", linewidths=0.5)
        ax.axhline(training["baseline_step_s"] * 1e3, color="k", linestyle="--", linewidth=1)
        ax.set_xlabel("training step (blocks of save_every steps, contenders interleaved; "
                      "▼ = step with a save)")
        ax.set_ylabel("step time (ms)")
        ax.set_title("training-loop step time; dashed: mean step without checkpointing")
        ax.legend(fontsize=8, ncol=3)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out, "training.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
