"""The benchmark harness at a tiny size: every output is produced and complete."""

from __future__ import annotations

import errno
import json
import math
import os

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("psutil")

from asyncckpt._bench import _options  # noqa: E402
from asyncckpt._bench._contenders import contender_ids  # noqa: E402
from asyncckpt._bench._dest import Destination  # noqa: E402
from asyncckpt._bench._options import (  # noqa: E402
    BenchOptions,
    parse_size,
    parse_storage_options,
)
from asyncckpt._bench._runner import run_bench  # noqa: E402
from asyncckpt._cli import main  # noqa: E402

SAVE_FIELDS = {
    "index", "step", "stall_s", "durable_s", "bytes", "cpu_s", "caller_cpu_s",
    "background_cpu_s", "peak_extra_rss_bytes", "peak_extra_cuda_bytes", "error",
}
SUMMARY_FIELDS = {
    "ok", "label", "saves", "steady_saves", "bytes", "first_stall_s", "first_durable_s",
    "stall_p50_s", "stall_p95_s", "stall_max_s", "durable_p50_s", "durable_max_s",
    "throughput_gbps", "peak_extra_rss_bytes", "peak_extra_cuda_bytes", "cpu_s_per_gb",
    "background_cpu_s_per_gb",
}
MACHINE_FIELDS = {
    "cpu_count", "cpu_model", "memory_bytes", "platform", "python", "torch", "device",
    "destination", "filesystem", "loadavg_start", "loadavg_end", "peak_rss_method",
}
try:  # DCP's DefaultStager, which the reused-stager contender keeps, is torch >= 2.9
    from torch.distributed.checkpoint.staging import DefaultStager  # noqa: F401
    HAS_DEFAULT_STAGER = True
except ImportError:
    HAS_DEFAULT_STAGER = False

# Lightning is optional (not installed in CI); the others ship with torch.
CORE = ("asyncckpt-eager", "asyncckpt-eager-direct", "torch-save", "dcp",
        *(("dcp-reused-stager",) if HAS_DEFAULT_STAGER else ()), "thread-clone")


def _is_png(path: str) -> bool:
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return False
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
        return image.size[0] > 100 and image.size[1] > 100


def test_bench_cli_tiny_run_writes_complete_results(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main([
        "bench", "--size", "2MiB", "--layout", "model,many-small", "--saves", "2",
        "--warmup", "1", "--train-size", "256KiB", "--train-rounds", "2", "--save-every", "2",
        "--train-batch", "4", "--out", str(out), "--no-progress",
        "--contenders", ",".join(CORE),
    ])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    results = json.loads((out / "results.json").read_text())

    assert results["errors"] == []
    assert MACHINE_FIELDS <= set(results["machine"])
    assert results["machine"]["cpu_count"] >= 1
    assert results["options"]["sizes"] == [2 * 2**20]
    assert [c["layout"] for c in results["save_latency"]] == ["model", "many-small"]
    for case in results["save_latency"]:
        assert case["state_bytes"] > 0 and case["tensors"] > 1
        assert set(case["contenders"]) == set(CORE)
        for cid, summary in case["contenders"].items():
            assert summary["ok"], (cid, summary)
            assert SUMMARY_FIELDS <= set(summary), cid
            assert summary["saves"] == 2 and summary["steady_saves"] == 1
            assert summary["bytes"] >= case["state_bytes"]
            assert 0 < summary["stall_p50_s"] <= summary["stall_max_s"]
            assert summary["durable_p50_s"] >= summary["stall_p50_s"] * 0.999
            assert summary["throughput_gbps"] > 0
            for record in case["saves"][cid]:
                assert set(record) == SAVE_FIELDS
        refs = case["references"]
        assert {"memcpy", "copy_", "write-buffered"} <= set(refs)
        for ref in refs.values():
            assert len(ref["runs"]) == 2 and ref["p50_s"] > 0 and ref["gbps"] > 0
    training = results["training"]
    assert set(training["summary"]) == {"none", *CORE}
    assert training["baseline_step_s"] > 0
    assert len(training["timeline"]) == (len(CORE) + 1) * 2 * 2
    assert sum(t["saved"] for t in training["timeline"]) == len(CORE) * 2
    for summary in training["summary"].values():
        assert math.isfinite(summary["overhead_pct"])
        assert math.isfinite(summary["overhead_paired_median_pct"])
    assert {t["target"] for t in results["targets"]} >= {
        "eager stall ≤ 1.5× memory-copy floor", "eager stall ≤ 1/10 of torch.save + fsync",
    }

    markdown = (out / "results.md").read_text()
    assert markdown == printed.split("results: ")[0].rstrip("\n") + "\n"
    assert "| contender | stall first | stall p50 |" in markdown
    assert "## Training loop" in markdown and "## Targets (asyncckpt)" in markdown
    for cid in CORE:
        assert results["labels"][cid] in markdown
    for name in ("stall.png", "training.png"):
        assert _is_png(str(out / name)), name
    # The default destination (a temporary folder inside --out) is removed afterwards.
    assert sorted(os.listdir(out)) == ["results.json", "results.md", "stall.png", "training.png"]


@pytest.mark.skipif(HAS_DEFAULT_STAGER, reason="torch >= 2.9 has DCP's DefaultStager")
def test_reused_stager_contender_is_skipped_with_the_torch_it_needs(tmp_path, capsys):
    rc = main([
        "bench", "--size", "1MiB", "--layout", "few-big", "--saves", "2", "--warmup", "1",
        "--no-training", "--out", str(tmp_path / "out"), "--no-progress",
        "--contenders", "dcp,dcp-reused-stager",
    ])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "needs torch >= 2.9" in results["skipped"]["dcp-reused-stager"]
    assert "not running dcp-reused-stager: needs torch >= 2.9" in captured.out + captured.err
    (case,) = results["save_latency"]
    assert set(case["contenders"]) == {"dcp"} and case["contenders"]["dcp"]["ok"]


def test_remote_destination_uses_fsspec(tmp_path):
    options = BenchOptions(
        sizes=(1 << 20,), layouts=("few-big",), dest="memory://bench", saves=2, warmup=1,
        contenders=("asyncckpt-eager", "torch-save", "thread-clone"), training=False,
        out=str(tmp_path), progress=False,
    )
    results = run_bench(options, log=lambda _: None)
    assert "asyncckpt-eager" not in results["skipped"]  # asyncckpt writes to any fsspec URL
    case = results["save_latency"][0]
    assert set(case["contenders"]) == {"asyncckpt-eager", "torch-save", "thread-clone"}
    assert all(s["ok"] for s in case["contenders"].values())
    assert "upload" in case["references"] and "write-buffered" not in case["references"]
    assert results["machine"]["filesystem"] == "memory"
    assert results["training"] is None


def test_snapshot_modes_come_from_the_config(monkeypatch):
    from typing import Literal

    monkeypatch.setattr(_options, "SnapshotMode", Literal["eager", "pipelined"])
    assert _options.snapshot_modes() == ("eager", "pipelined")
    assert BenchOptions().modes == ("eager", "pipelined")
    assert contender_ids(("eager", "pipelined"), True)[:4] == [
        "asyncckpt-eager", "asyncckpt-eager-direct", "asyncckpt-pipelined",
        "asyncckpt-pipelined-direct",
    ]


@pytest.mark.parametrize(
    ("text", "value"),
    [("256MiB", 256 * 2**20), ("1GiB", 2**30), ("4MB", 4 * 10**6), ("1.5G", 3 * 2**29),
     ("2048", 2048), (" 64 KiB ", 64 * 1024)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "1 parsec", "MiB", "-1MiB", "12"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_parse_storage_options():
    assert parse_storage_options(["anon=true", "endpoint_url=http://127.0.0.1:9000",
                                  "retries=3"]) == {
        "anon": True, "endpoint_url": "http://127.0.0.1:9000", "retries": 3}
    with pytest.raises(ValueError, match="key=value"):
        parse_storage_options(["anon"])
    with pytest.raises(ValueError, match="twice"):
        parse_storage_options(["a=1", "a=2"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"layouts": ("huge",)}, "--layout"), ({"modes": ("lazy",)}, "--mode"),
     ({"saves": 2, "warmup": 2}, "--warmup"), ({"when_full": "drop"}, "--when-full"),
     ({"device": "tpu"}, "--device"), ({"queue_size": 0}, "--queue-size")],
)
def test_bench_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchOptions(**kwargs)


def test_unknown_contender_is_an_error(tmp_path, capsys):
    rc = main(["bench", "--size", "1MiB", "--contenders", "nope", "--out", str(tmp_path),
               "--no-progress", "--no-training"])
    assert rc == 2
    assert "unknown nope" in capsys.readouterr().err


def test_destination_reports_the_filesystem(tmp_path):
    dest = Destination(str(tmp_path / "d"))
    assert dest.kind not in ("", None)
    assert dest.local_root == str(tmp_path / "d") and os.path.isdir(dest.local_root)


def test_secrets_in_storage_options_stay_out_of_the_results(tmp_path):
    from asyncckpt._bench._runner import _redacted, _redacted_command

    options = {"key": "AKIA123", "secret": "s3cr3t", "endpoint_url": "http://127.0.0.1:9"}
    assert _redacted(options) == {"key": "***", "secret": "***",
                                  "endpoint_url": "http://127.0.0.1:9"}
    command = "asyncckpt bench --storage-option key=AKIA123 --storage-option secret=s3cr3t"
    assert "AKIA123" not in _redacted_command(command, options)
    assert "s3cr3t" not in _redacted_command(command, options)


def test_lightning_contender_when_installed(tmp_path):
    pytest.importorskip("lightning")
    options = BenchOptions(
        sizes=(1 << 20,), layouts=("few-big",), saves=2, warmup=1,
        contenders=("lightning",), training=False, out=str(tmp_path), progress=False,
    )
    results = run_bench(options, log=lambda _: None)
    summary = results["save_latency"][0]["contenders"]["lightning"]
    assert results["errors"] == [] and summary["ok"]
    assert summary["bytes"] >= 1 << 20


def test_memory_a_contender_keeps_is_counted_per_case(tmp_path, monkeypatch):
    """A contender that keeps a buffer between saves is charged for it in every case, once."""
    from asyncckpt._bench import _runner
    from asyncckpt._bench._contenders import Contender, Pending

    keep = 64 << 20

    class Hoarder(Contender):
        id, label = "hoarder", "keeps a buffer"

        def open(self):
            self.buffer = None

        def _save(self, tree, name, step, objects):
            if self.buffer is None:
                self.buffer = bytearray(keep)  # zero-filled: resident
            return Pending(lambda: 1)

        def close(self):
            super().close()
            self.buffer = None

    monkeypatch.setattr(_runner, "build_contenders",
                        lambda dest, **_: ([Hoarder(dest)], {}))
    options = BenchOptions(sizes=(1 << 20,), layouts=("few-big", "many-small"), saves=3,
                           warmup=1, training=False, out=str(tmp_path), progress=False)
    results = run_bench(options, log=lambda _: None)
    for case in results["save_latency"]:
        for record in case["saves"]["hoarder"]:
            assert keep * 0.9 < record["peak_extra_rss_bytes"] < keep * 1.4, case["layout"]


def test_a_failing_contender_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    from asyncckpt._bench import _runner
    from asyncckpt._bench._contenders import Contender, TorchSave

    class Broken(Contender):
        id, label = "broken", "always fails"

        def _save(self, tree, name, step, objects):
            raise OSError(errno.EIO, "simulated failure")

    monkeypatch.setattr(_runner, "build_contenders",
                        lambda dest, **_: ([Broken(dest), TorchSave(dest)], {}))
    options = BenchOptions(sizes=(1 << 20,), layouts=("few-big",), saves=2, warmup=1,
                           train_size=1 << 18, train_rounds=2, save_every=2, train_batch=4,
                           out=str(tmp_path), progress=False)
    results = run_bench(options, log=lambda _: None)
    assert {(e["contender"], e["case"]) for e in results["errors"]} == {
        ("broken", "1 MiB few-big"), ("broken", "training")}
    assert all("simulated failure" in e["error"] for e in results["errors"])
    case = results["save_latency"][0]["contenders"]
    assert case["broken"]["ok"] is False and case["torch-save"]["ok"] is True
    assert set(results["training"]["summary"]) == {"none", "torch-save"}
    assert "failed: OSError" in (tmp_path / "results.md").read_text()


def test_tiny_many_layout_and_the_goals_each_figure_is_held_to(tmp_path):
    options = BenchOptions(
        sizes=(64 << 10,), layouts=("model", "tiny-many"), saves=3, warmup=1,
        contenders=("asyncckpt-eager-direct", "asyncckpt-pipelined-direct", "torch-save"),
        training=False, out=str(tmp_path), progress=False,
    )
    results = run_bench(options, log=lambda _: None)
    assert results["errors"] == []
    model, tiny = results["save_latency"]
    assert tiny["layout"] == "tiny-many" and tiny["tensors"] == (64 << 10) // 64
    assert tiny["state_bytes"] == 64 << 10
    for case in (model, tiny):
        assert all(s["ok"] for s in case["contenders"].values())
    goals = {(t["target"], t["case"]): t for t in results["targets"]}
    for cid in ("asyncckpt-eager-direct", "asyncckpt-pipelined-direct"):
        for goal in ("stall ≤ 0.1× torch.save + fsync",
                     "write (durable − stall) ≤ 1× torch.save + fsync",
                     "peak extra RSS ≤ 2× data + 4096 B per tensor"):
            row = goals[(f"{cid}: many tensors, {goal}", "64 KiB tiny-many")]
            assert row["value"] is not None and row["met"] in (True, False)
    assert ("asyncckpt-pipelined-direct: stall ≤ 1 ms", "64 KiB model") in goals
    assert ("asyncckpt-eager-direct: fixed cost, stall − copy floor ≤ 1 ms",
            "64 KiB model") in goals
    assert ("asyncckpt-eager-direct: first-save stall ≤ 2× copy floor", "64 KiB model") in goals
    markdown = (tmp_path / "results.md").read_text()
    assert "## Targets (asyncckpt)" in markdown
    assert "issue" not in markdown.lower()
