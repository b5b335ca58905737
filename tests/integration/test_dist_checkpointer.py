"""Multi-rank checkpoints through the public front doors, with real gloo ranks: save with
``Checkpointer`` / ``AsyncCheckpointer`` on 4 ranks, read back with ``load_into`` on 2 and 1,
``asyncckpt.load``, ``dcp.load``; rotation, best and latest across a restart; ``verify`` and
``asyncckpt ls``; refusals and disagreements."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from support import dist_front as df
from support import dist_support as ds

import asyncckpt
from asyncckpt._cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch")

OPTIONS = {"keep_last": 2, "best": {"loss": "less"}}


def _assert_same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert sorted(expected) == sorted(got)
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key


@pytest.fixture(scope="module")
def ddp4(tmp_path_factory):
    """DDP model + Adam saved at steps 1, 2, 3 on 4 ranks (keep_last=2; step 2 has the best
    loss)."""
    parent = str(tmp_path_factory.mktemp("ddp4") / "run")
    return parent, ds.run(4, df.scenario_ddp_checkpointer, parent, [1, 2, 3], OPTIONS)


def test_every_rank_sees_the_same_commits_rotation_best_and_latest(ddp4):
    parent, results = ddp4
    for r in results:
        assert [i.name for i in r["infos"]] == ["step_1", "step_2", "step_3"]
        assert [c.name for c in r["listed"]] == ["step_2", "step_3"]  # step_1 rotated away
        assert r["listed"] == results[0]["listed"]  # same entries (rank 0's) everywhere
        assert r["latest"].name == "step_3" and r["best"].name == "step_2"
        assert all(c.kind == "dcp" and c.world_size == 4 for c in r["listed"])
    on_disk = sorted(n for n in os.listdir(parent) if not n.startswith("."))
    assert on_disk == ["asyncckpt-index.json", "last_checkpoint", "step_2", "step_3"]
    with open(os.path.join(parent, "asyncckpt-index.json"), "rb") as f:
        entry = json.load(f)["entries"][-1]
    names = {f[0] for f in entry["files"]}
    assert names == {".metadata", ".asyncckpt.json", *(f"__{r}_0.distcp" for r in range(4))}
    assert entry["size"] == sum(f[1] for f in entry["files"])


@pytest.mark.parametrize(("world", "which", "step"), [(2, "latest", 3), (1, "best:loss", 2)])
def test_load_into_reshards_to_fewer_ranks(ddp4, world, which, step):
    parent, results = ddp4
    loaded = ds.run(world, df.scenario_load_into_ddp, parent, which)
    for got in loaded:
        _assert_same(results[0]["expected"][step], got["tensors"])
        assert got["step"] == step


def test_load_assembles_the_full_state_and_dcp_reads_the_directory(ddp4):
    parent, results = ddp4
    full = asyncckpt.load(parent)  # one process, no torch.distributed
    assert full["step"] == 3
    _assert_same(results[0]["expected"][3], ds.flat_tensors(
        {"model": full["model"], "optim": full["optim"]}))
    by_step = asyncckpt.load(parent, which=2)
    assert by_step["step"] == 2
    expected = results[0]["expected"][2]
    sd = {"model": {k.removeprefix("model."): torch.zeros_like(v) for k, v in expected.items()
                    if k.startswith("model.")}}
    dcp.load(sd, checkpoint_id=os.path.join(parent, "step_2"), no_dist=True)
    for key, value in sd["model"].items():
        assert torch.equal(value, expected[f"model.{key}"]), key


def test_verify_and_ls_cover_multi_rank_checkpoints(ddp4, tmp_path, capsys):
    parent, _ = ddp4
    report = asyncckpt.verify(parent, load=True)
    assert report.ok and report.checked == ("step_2", "step_3")
    assert main(["ls", parent, "--format", "tsv"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [r[0] for r in rows] == ["step_2/", "step_3/"]
    assert "ranks:4" in rows[1][-1] and "latest" in rows[1][-1]
    # a file changed after the commit: verify names it, load refuses it
    copy = tmp_path / "copy"
    shutil.copytree(parent, copy)
    victim = copy / "step_3" / "__1_0.distcp"
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    report = asyncckpt.verify(copy)
    assert [(p.kind, p.name) for p in report.problems] == [("checksum", "step_3")]
    assert "__1_0.distcp" in report.problems[0].message
    with pytest.raises(asyncckpt.IntegrityError, match="__1_0.distcp"):
        asyncckpt.load(copy)


def test_a_restart_on_another_world_size_resumes_rotation_best_and_latest(ddp4, tmp_path):
    parent, _ = ddp4
    copy = str(tmp_path / "resumed")
    shutil.copytree(parent, copy)
    os.makedirs(os.path.join(copy, ".asyncckpt-tmp.step_9.dead.1"))  # a crashed save's part
    results = ds.run(2, df.scenario_reopen, copy, 4, OPTIONS)
    for r in results:
        assert r["before"] == ["step_2", "step_3"] and r["latest_before"].name == "step_3"
        assert r["after"] == ["step_2", "step_3", "step_4"][-len(r["after"]):]
        assert "step_2" in r["after"] and r["after"][-1] == "step_4"  # best is kept
        assert r["best"].name == "step_2"
    listed = [c.name for c in asyncckpt.checkpoints(copy)]
    assert listed == results[0]["after"]
    assert sorted(n for n in os.listdir(copy) if n.startswith("step_")) == listed
    assert [c.world_size for c in asyncckpt.checkpoints(copy)][-1] == 2


def test_dtensor_state_through_the_async_front_door_loads_on_another_mesh(tmp_path):
    parent = str(tmp_path / "dt")
    names = ds.run(4, df.scenario_dtensor_checkpointer, parent, [1, 2])
    assert names == [["step_1", "step_2"]] * 4
    loaded = ds.run(2, df.scenario_load_into_dtensor, parent, 1)
    full = asyncckpt.load(parent, which=1)
    assert full["meta"] == {"step": 1, "name": "run", "lrs": [0.1, 0.01]}
    assert torch.equal(full["plain"], torch.arange(10, dtype=torch.float64) * 2)
    for got in loaded:  # sharded over 2 ranks now, the same full tensors
        assert got["meta"] == full["meta"]
        for key in ("rows", "cols", "repl"):
            assert torch.equal(got["tensors"][f"w.{key}"], full["w"][key]), key
        assert torch.equal(got["tensors"]["plain"], full["plain"])


def test_ranks_saving_different_steps_fail_that_save_clearly_on_every_rank(tmp_path):
    results = ds.run(2, df.scenario_disagree, str(tmp_path / "run"))
    for r in results:
        assert r["disagree"].startswith("WriterError(DistributedSaveError)")
        assert r["flush"] == "ok"  # raised once, by the handle
        assert "disagree on which checkpoint" in r["disagree"]
        assert "rank 0: 'step_2'" in r["disagree"] and "rank 1: 'step_3'" in r["disagree"]
        assert r["listed"] == [1, 5]


def test_options_that_would_drop_different_saves_per_rank_are_refused(tmp_path):
    results = ds.run(2, df.scenario_refusals, str(tmp_path / "run"))
    for r in results:
        assert "when_full='skip'" in r["when_full=skip"]
        assert "when_full='coalesce'" in r["when_full=coalesce"]
        assert "snapshot='pipelined'" in r["snapshot=pipelined"]
        assert all(v.startswith("ValueError") for v in r.values())


def test_distributed_false_keeps_one_single_file_writer_per_rank(tmp_path):
    results = ds.run(2, df.scenario_independent, str(tmp_path))
    for listing in results:
        assert "step_1.pt" in listing
