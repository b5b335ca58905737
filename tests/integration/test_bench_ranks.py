"""``asyncckpt bench --ranks``: option parsing, errors, and a tiny real run on gloo ranks."""

from __future__ import annotations

import json
import math
import multiprocessing
import os

import pytest

pytest.importorskip("psutil")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from asyncckpt._bench import _options  # noqa: E402
from asyncckpt._bench._dist_options import (  # noqa: E402
    DIST_CONTENDERS,
    DistBenchOptions,
    parse_ranks,
)
from asyncckpt._bench._dist_rank import share_of  # noqa: E402
from asyncckpt._bench._options import BenchOptions  # noqa: E402
from asyncckpt._cli import main  # noqa: E402

SUMMARY_FIELDS = {
    "ok", "label", "saves", "steady_saves", "bytes", "first_stall_s", "first_durable_s",
    "stall_p50_s", "stall_p50_s_per_rank", "durable_p50_s", "durable_p50_s_per_rank",
    "throughput_gbps", "peak_extra_rss_bytes", "peak_extra_rss_bytes_per_rank",
    "peak_extra_cuda_bytes",
}
FLOOR_FIELDS = {"copy_floor_s", "copy_floor_s_per_rank", "share_bytes_per_rank",
                "raw_write_s", "raw_write_gbps"}
RANK_SAVE_FIELDS = {"step", "stall_s", "durable_s", "bytes", "peak_extra_rss_bytes",
                    "peak_extra_cuda_bytes"}
TRAINING_FIELDS = {
    "ranks", "state_bytes", "batch", "rounds", "save_every", "baseline_step_s_per_rank",
    "overhead_pct", "overhead_pct_per_rank", "overhead_paired_median_pct_per_rank",
    "stall_p50_s", "drain_max_s", "summary_per_rank", "failed",
}
GOALS = (
    "per-rank stall ≤ 1.5× copy floor (worst rank)",
    "per-rank stall ≤ 0.5× DCP async_save, new stager (worst rank)",
    "per-rank stall ≤ 0.5× DCP async_save, reused stager (worst rank)",
    "throughput to durable ≥ 0.8× raw write floor",
    "training-loop overhead ≤ 5 % (save every 2 steps, worst rank)",
)
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


@pytest.mark.parametrize(("text", "value"), [("2", (2,)), ("2,4", (2, 4)), (" 4 , 2,4", (4, 2))])
def test_parse_ranks(text, value):
    assert parse_ranks(text) == value


@pytest.mark.parametrize("text", ["0", "-2", "1", "2,x", "2.5", "", ","])
def test_parse_ranks_rejects_with_the_option_named(text):
    with pytest.raises(ValueError, match="^--ranks: "):
        parse_ranks(text)


@pytest.mark.parametrize(("value", "why"), [("0", ">= 2, got 0"), ("-1", ">= 2, got -1"),
                                            ("two", "'two' is not an integer"),
                                            ("2,1.5", "'1.5' is not an integer")])
def test_bad_ranks_is_a_usage_error_naming_the_option(value, why, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--ranks", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --ranks:" in err and why in err


@pytest.mark.parametrize(("argv", "flag"), [
    (["--mode", "eager"], "--mode"), (["--queue-size", "2"], "--queue-size"),
    (["--when-full", "skip"], "--when-full"), (["--no-direct-io"], "--no-direct-io"),
    (["--storage-option", "a=1"], "--storage-option"),
])
def test_options_that_do_not_apply_to_ranks_are_refused(argv, flag, tmp_path, capsys):
    rc = main(["bench", "--ranks", "2", "--out", str(tmp_path), *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--ranks does not take {flag}" in err
    assert not os.listdir(tmp_path)


def test_remote_destination_and_unknown_contender_are_refused():
    with pytest.raises(ValueError, match="--dest 's3://b/p': the multi-rank benchmark"):
        DistBenchOptions((2,), BenchOptions(dest="s3://b/p"))
    with pytest.raises(ValueError, match="unknown thread-clone; known: " + ", ".join(
            DIST_CONTENDERS)):
        DistBenchOptions((2,), BenchOptions(contenders=("thread-clone",)))
    with pytest.raises(ValueError, match="--ranks: world sizes must be integers >= 2"):
        DistBenchOptions((1,))


def test_ranks_without_torch_distributed_says_so(monkeypatch, tmp_path, capsys):
    # A torch build without torch.distributed (some macOS / Windows wheels) reports this.
    monkeypatch.setattr(dist, "is_available", lambda: False)
    rc = main(["bench", "--ranks", "2", "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    assert ("asyncckpt bench: --ranks needs torch.distributed: this torch build has no "
            "torch.distributed") in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_ranks_the_options_are_the_single_process_ones():
    import argparse

    from asyncckpt._bench import add_arguments, options_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert args.ranks is None
    assert options_from_args(args) == BenchOptions(modes=_options.snapshot_modes())


def test_shares_cover_every_tensor_once_and_balance_bytes():
    sizes = [64, 8, 32, 32, 16, 8]
    shares = [share_of(sizes, r, 3) for r in range(3)]
    assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in share) for share in shares]
    assert max(loads) == 64 and sum(loads) == sum(sizes)
    assert share_of([5], 1, 2) == []


@needs_gloo
def test_a_failing_rank_is_reported_and_every_rank_ends(tmp_path):
    from asyncckpt._bench._dist_runner import _launch

    options = DistBenchOptions((2,), BenchOptions(sizes=(2**20,), saves=1, warmup=0,
                                                  training=False), timeout_s=60)
    spec = {**options.spec(str(tmp_path), ["asyncckpt-eager"]), "layouts": ["no-such-layout"]}
    with pytest.raises(RuntimeError, match="unknown layout 'no-such-layout'"):
        _launch(2, spec, deadline_s=120)
    assert multiprocessing.active_children() == []  # every rank process has ended


@needs_gloo
def test_tiny_two_rank_run_has_every_contender_metric_and_goal(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main([
        "bench", "--ranks", "2", "--size", "1MiB", "--layout", "few-big,model", "--saves", "2",
        "--warmup", "1", "--train-size", "64KiB", "--train-rounds", "2", "--save-every", "2",
        "--train-batch", "4", "--out", str(out), "--no-progress",
    ])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    results = json.loads((out / "results.json").read_text())

    # without DCP's DefaultStager (torch < 2.8) the reused-stager contender needs CUDA
    reused = _has_default_stager() or torch.cuda.is_available()
    contenders = [c for c in DIST_CONTENDERS if reused or c != "dcp-reused-stager"]
    assert results["errors"] == []
    assert list(results["skipped"]) == ([] if reused else ["dcp-reused-stager"])
    assert results["schema"] == 1 and results["benchmark"] == "multi-rank"
    assert results["machine"]["backend"] == "gloo"
    assert results["options"]["ranks"] == [2]
    assert set(results["labels"]) == set(contenders)
    expected_staging = "DefaultStager" if _has_default_stager() else "cache_staged_state_dict"
    assert expected_staging in results["dcp_reused_staging"]
    assert [(c["ranks"], c["layout"]) for c in results["save_latency"]] == [
        (2, "few-big"), (2, "model")]
    for case in results["save_latency"]:
        assert case["state_bytes"] > 0 and case["tensors"] >= 1
        floors = case["floors"]
        assert set(floors) == FLOOR_FIELDS
        assert len(floors["copy_floor_s_per_rank"]) == len(floors["share_bytes_per_rank"]) == 2
        assert sum(floors["share_bytes_per_rank"]) == case["state_bytes"]
        assert floors["raw_write_gbps"] > 0
        assert list(case["contenders"]) == contenders
        for cid, summary in case["contenders"].items():
            assert set(summary) == SUMMARY_FIELDS, cid
            assert summary["ok"] and summary["saves"] == 2 and summary["steady_saves"] == 1
            assert len(summary["stall_p50_s_per_rank"]) == 2
            assert len(summary["peak_extra_rss_bytes_per_rank"]) == 2
            assert summary["bytes"] >= case["state_bytes"]
            assert summary["durable_p50_s"] >= summary["stall_p50_s"] * 0.999
            assert summary["throughput_gbps"] > 0
            for record in case["saves"][cid]:
                assert len(record["per_rank"]) == 2
                for per_rank in record["per_rank"]:
                    assert set(per_rank) == RANK_SAVE_FIELDS
    (training,) = results["training"]
    assert set(training) == TRAINING_FIELDS
    assert training["ranks"] == 2 and training["failed"] == {}
    assert all(math.isfinite(x) for x in training["overhead_pct_per_rank"])
    for summaries in training["summary_per_rank"]:
        assert set(summaries) == {"none", "asyncckpt-eager"}
    goals = [(t["target"], t["case"]) for t in results["targets"]]
    for case in ("2 ranks, 1 MiB few-big", "2 ranks, 1 MiB model"):
        for goal in GOALS[:4]:
            if reused or "reused stager" not in goal:
                assert (goal, case) in goals
            else:
                assert (goal, case) not in goals
    assert [c for g, c in goals if g == GOALS[4]] == ["2 ranks, 63.9 KiB"]
    for target in results["targets"]:
        assert target["met"] in (True, False) and target["value"] is not None

    markdown = (out / "results.md").read_text()
    assert markdown == captured.out.split("results: ")[0].rstrip("\n") + "\n"
    for label in results["labels"].values():
        assert label in markdown
    for heading in ("## 2 ranks, 1 MiB few-big", "## Training loop", "## Goals"):
        assert heading in markdown
    for column in ("× copy floor", "× DCP", "× DCP reused", "× raw write",
                   "peak extra RSS per rank"):
        assert column in markdown
    assert sorted(os.listdir(out)) == ["results.json", "results.md"]


def _has_default_stager() -> bool:
    try:
        from torch.distributed.checkpoint.staging import DefaultStager  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cached_staging_dcp_says_it_needs_cuda(tmp_path):
    from asyncckpt._bench._dest import Destination
    from asyncckpt._bench._dist_rank import CachedStagingDcp

    reason = CachedStagingDcp(Destination(str(tmp_path))).unsupported()
    assert reason is not None and "cache_staged_state_dict=True) needs CUDA" in reason


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cached_staging_dcp_saves_loadable_checkpoints_with_one_writer(tmp_path):
    # The reused-staging contender of torch releases without DefaultStager; this torch may have
    # both, so it is exercised directly, in a gloo group of one (as the single-process bench).
    import torch.distributed.checkpoint as dcp

    from asyncckpt._bench._dest import Destination
    from asyncckpt._bench._dist_rank import CachedStagingDcp

    contender = CachedStagingDcp(Destination(str(tmp_path)))
    assert contender.unsupported() is None
    assert contender.id == "dcp-reused-stager" and "cache_staged_state_dict" in contender.label
    contender.open()
    try:
        writers = set()
        for step in (1, 2):
            state = {"w": torch.full((64,), float(step)), "b": torch.arange(8.0) * step}
            assert contender.save(state, step).wait() > 0
            writers.add(id(contender._cached))
            loaded = {"w": torch.zeros(64), "b": torch.zeros(8)}
            dcp.load(loaded, checkpoint_id=str(tmp_path / f"dcp-reused-stager-{step}"))
            assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
        assert len(writers) == 1
    finally:
        contender.close()
    assert not dist.is_initialized()
