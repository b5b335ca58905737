"""Multi-rank saves with real gloo ranks: DDP and DTensor states, dedup, DCP-readable layout,
resharding on load (save on 4, load on 2 and 1)."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from support import dist_support as ds
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from asyncckpt import IntegrityError
from asyncckpt._dist import load_full, verify_directory

pytestmark = pytest.mark.filterwarnings(
    # torch's own FSDP2 / DTensor modules warn about their experimental status
    "ignore::UserWarning:torch",
)


def _metadata(directory):
    with open(os.path.join(directory, ".metadata"), "rb") as f:
        return pickle.load(f)


def _assert_same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert sorted(expected) == sorted(got)
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key


@pytest.fixture(scope="module")
def ddp4(tmp_path_factory):
    """A DDP model + Adam saved at steps 1 and 2 on 4 ranks."""
    parent = str(tmp_path_factory.mktemp("ddp4"))
    return parent, ds.run(4, ds.scenario_ddp_saves, parent, [1, 2])


def test_every_rank_returns_the_same_commit_and_only_the_first_save_plans(ddp4):
    parent, results = ddp4
    commits = [r["commits"] for r in results]
    assert all(c == commits[0] for c in commits)
    assert [c.replanned for c in commits[0]] == [True, False]
    assert all(r["plans"] == [1, 1] for r in results)  # no planning collective at step 2
    assert sorted(os.listdir(parent)) == ["step_1", "step_2"]
    names = {f.name for f in commits[0][1].files}
    assert names == {".metadata", ".asyncckpt.json", *(f"__{r}_0.distcp" for r in range(4))}
    assert verify_directory(os.path.join(parent, "step_2"))


def test_replicated_tensors_are_written_once_spread_over_ranks(ddp4):
    parent, results = ddp4
    metadata = _metadata(os.path.join(parent, "step_2"))
    locations = list(metadata.storage_data.items())
    assert len({index for index, _ in locations}) == len(locations)  # each item exactly once
    writers = {info.relative_path for _, info in locations}
    assert len(writers) >= 3  # spread, not all on rank 0
    expected = results[0]["expected"][2]
    payload = sum(t.numel() * t.element_size() for t in expected.values())
    written = sum(f.size for f in results[0]["commits"][1].files if f.name.endswith(".distcp"))
    # one copy of the state plus per-item archive overhead, far from 4 copies
    assert payload < written < payload + 2048 * len(locations)


@pytest.mark.parametrize("world", [2, 1])
def test_save_on_4_load_into_fewer_ranks(ddp4, world):
    parent, results = ddp4
    loaded = ds.run(world, ds.scenario_ddp_load, os.path.join(parent, "step_2"))
    for got in loaded:
        _assert_same(results[0]["expected"][2], got)


def test_full_load_dcp_load_and_dcp_to_torch_save_read_the_layout(ddp4, tmp_path):
    parent, results = ddp4
    directory = os.path.join(parent, "step_1")
    expected = results[0]["expected"][1]
    full = load_full(directory)
    assert full["step"] == 1
    _assert_same(expected, ds.flat_tensors({"model": full["model"], "optim": full["optim"]}))
    # plain DCP, in place, no process group
    target = {"model": {k: torch.zeros_like(v) for k, v in full["model"].items()}}
    dcp.load(target, checkpoint_id=directory, no_dist=True)
    _assert_same(ds.flat_tensors({"model": full["model"]}), ds.flat_tensors(target))
    dcp_to_torch_save(directory, tmp_path / "full.pt")
    converted = torch.load(tmp_path / "full.pt", weights_only=False)
    _assert_same(expected, ds.flat_tensors({"model": converted["model"],
                                            "optim": converted["optim"]}))


def test_dtensor_shards_are_written_by_their_owners_and_reshard_on_load(tmp_path):
    parent = str(tmp_path)
    commits = ds.run(4, ds.scenario_dtensor_save, parent, [0, 1])
    assert [c.replanned for c in commits[0]] == [True, False]
    directory = os.path.join(parent, "step_0")
    metadata = _metadata(directory)
    rows = [(i, info.relative_path) for i, info in metadata.storage_data.items()
            if i.fqn == "w.rows"]
    assert sorted(path for _, path in rows) == [f"__{r}_0.distcp" for r in range(4)]
    assert len([i for i in metadata.storage_data if i.fqn == "w.repl"]) == 1
    expected = ds.flat_tensors(ds_full_dtensor_state())
    full = load_full(directory)
    _assert_same(expected, ds.flat_tensors({k: full[k] for k in ("w", "plain")}))
    assert full["meta"] == {"step": 0, "name": "run", "lrs": [0.1, 0.01]}
    for world in (2, 1):
        for got in ds.run(world, ds.scenario_dtensor_load, directory):
            assert got["meta"] == full["meta"]
            _assert_same(expected, got["tensors"])


def ds_full_dtensor_state() -> dict:
    """The full tensors of dtensor_state(world, 0), computed without a process group."""
    g = torch.Generator().manual_seed(0)
    return {
        "w": {
            "rows": torch.randn(35, 16, generator=g),
            "cols": torch.randn(12, 8, generator=g),
            "repl": torch.randn(33, generator=g),
        },
        "plain": torch.arange(10, dtype=torch.float64),
    }


def test_fsdp2_fully_shard_state_saves_sharded_and_loads_full(tmp_path):
    expected = ds.run(2, ds.scenario_fsdp2_save, str(tmp_path))[0]
    directory = tmp_path / "fsdp"
    writers = {info.relative_path for info in _metadata(directory).storage_data.values()}
    assert writers == {"__0_0.distcp", "__1_0.distcp"}
    full = load_full(directory)
    _assert_same(expected, ds.flat_tensors({"model": full["model"], "optim": full["optim"]}))


def test_a_corrupted_file_fails_verification_before_loading(ddp4, tmp_path):
    parent, _ = ddp4
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(parent, "step_2"), copy)
    with open(copy / "__2_0.distcp", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(IntegrityError, match="__2_0.distcp: checksum"):
        load_full(copy)


def test_host_memory_follows_the_rank_share_after_the_first_save(tmp_path):
    held = ds.run(2, ds.scenario_replicated_memory, str(tmp_path), 3)
    state = 8 * (2 << 20)
    for per_save in held:
        # the first save has no plan yet: every rank copies the whole state; from the second,
        # each rank copies only the tensors the plan assigns it (half) and keeps no more
        assert per_save[0] >= state
        assert per_save[1] <= 0.6 * state and per_save[2] <= 0.6 * state
