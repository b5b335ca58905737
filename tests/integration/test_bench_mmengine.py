"""Smoke test of benchmarks/bench_mmengine.py at a tiny size (it is not a measurement)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

pytest.importorskip("mmengine")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_mmengine.py")


def test_bench_mmengine_runs_both_hooks_and_writes_reports(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_mmengine", SCRIPT)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_mmengine", bench)  # dataclasses look it up
    spec.loader.exec_module(bench)
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    bench.main(["--width", "8", "--depth", "1", "--batch", "4", "--iters", "4", "--interval", "2",
                "--warmup", "1",
                "--rounds", "2", "--dir", str(tmp_path / "runs"), "--json", str(out_json),
                "--markdown", str(out_md)])
    report = json.loads(out_json.read_text())
    runs = report["runs"]
    # interleaved: A B, then B A
    assert [r["hook"] for r in runs] == ["CheckpointHook", "AsyncCheckpointHook",
                                         "AsyncCheckpointHook", "CheckpointHook"]
    for run in runs:
        assert len(run["iteration_s"]) == 4
        assert run["saved"] == [False, True, False, True]
        assert run["checkpoint_bytes"] > 0
    assert set(report["summary"]) == {"CheckpointHook", "AsyncCheckpointHook",
                                      "ratio_async_over_sync"}
    table = out_md.read_text()
    assert "| CheckpointHook |" in table and "| AsyncCheckpointHook |" in table
    assert table in capsys.readouterr().out
