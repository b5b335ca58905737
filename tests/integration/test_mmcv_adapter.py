"""MMCVCheckpointer: mmcv IterBasedRunner-style save_checkpoint / resume over asyncckpt."""

from __future__ import annotations

import copy
import importlib.metadata
import logging
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from support.helpers import WrappedStorage, tensors_equal
from torch import nn

import asyncckpt
from asyncckpt import WriterError
from asyncckpt.adapters.mmcv import MMCVCheckpointer
from asyncckpt.storage import LocalStorage


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def train_steps(model: nn.Module, optimizers: list[torch.optim.Optimizer], n: int) -> None:
    for _ in range(n):
        loss = model(torch.randn(5, 3)).pow(2).mean()
        for o in optimizers:
            o.zero_grad()
        loss.backward()
        for o in optimizers:
            o.step()


def test_save_names_meta_and_latest_link_like_mmcv(tmp_path):
    model = make_model()
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with MMCVCheckpointer(model, optim, meta=dict(exp_name="x")) as ckpt:
        for it in range(6):
            train_steps(model, [optim], 1)
            if (ckpt.iter + 1) % 3 == 0:
                ckpt.save_checkpoint(tmp_path, meta=dict(note=it))
            ckpt.iter += 1
    names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".pth"))
    assert names == ["iter_3.pth", "iter_6.pth", "latest.pth"]
    assert os.readlink(tmp_path / "latest.pth") == "iter_6.pth"  # relative, like mmcv.symlink
    saved = torch.load(tmp_path / "latest.pth", weights_only=True)
    assert set(saved) == {"meta", "state_dict", "optimizer"}
    meta = saved["meta"]
    assert (meta["epoch"], meta["iter"], meta["exp_name"], meta["note"]) == (1, 5, "x", 5)
    assert tensors_equal(saved["state_dict"], model.state_dict())


def test_resume_restores_counters_model_and_optimizer(tmp_path):
    model = make_model()
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with MMCVCheckpointer(nn.DataParallel(model), optim) as ckpt:
        train_steps(model, [optim], 4)
        ckpt.epoch, ckpt.iter = 2, 3
        ckpt.save_checkpoint(tmp_path)
    expected_model = {k: v.clone() for k, v in model.state_dict().items()}
    expected_optim = optim.state_dict()

    fresh = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    fresh_optim = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    resumed = MMCVCheckpointer(fresh, fresh_optim)
    state = resumed.resume(tmp_path / "latest.pth")
    assert (resumed.epoch, resumed.iter) == (3, 3)  # mmcv: meta epoch = epoch + 1
    assert tensors_equal(fresh.state_dict(), expected_model)
    assert tensors_equal(fresh_optim.state_dict()["state"], expected_optim["state"])
    assert state["meta"]["iter"] == 3
    resumed.close()


def test_resume_with_a_dict_of_optimizers_and_without_optimizer(tmp_path):
    model = make_model()
    optims = {
        "first": torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9),
        "last": torch.optim.Adam(model[2].parameters(), lr=0.01),
    }
    with MMCVCheckpointer(model, optims) as ckpt:
        train_steps(model, list(optims.values()), 2)
        ckpt.save_checkpoint(tmp_path, filename_tmpl="ckpt_{:04d}.pth")
    assert os.path.isfile(tmp_path / "ckpt_0001.pth")

    fresh = make_model()
    fresh_optims = {
        "first": torch.optim.SGD(fresh[0].parameters(), lr=0.1, momentum=0.9),
        "last": torch.optim.Adam(fresh[2].parameters(), lr=0.01),
    }
    MMCVCheckpointer(fresh, fresh_optims).resume(tmp_path, resume_optimizer=False)
    assert all(not o.state for o in fresh_optims.values())
    MMCVCheckpointer(fresh, fresh_optims).resume(tmp_path)
    for name, optim in optims.items():
        assert tensors_equal(fresh_optims[name].state_dict()["state"], optim.state_dict()["state"])


def test_latest_link_moves_only_once_the_checkpoint_is_committed(tmp_path):
    storage = WrappedStorage(LocalStorage(tmp_path))
    storage.gate = threading.Event()
    model = make_model()
    ckpt = MMCVCheckpointer(model, queue_size=2)
    try:
        ckpt.save_checkpoint(storage)
        assert not os.path.lexists(tmp_path / "latest.pth")  # iter_1 is not written yet
        storage.gate.set()
        ckpt.flush()
        assert os.readlink(tmp_path / "latest.pth") == "iter_1.pth"
        storage.gate.clear()
        ckpt.iter = 1
        ckpt.save_checkpoint(storage)
        assert os.readlink(tmp_path / "latest.pth") == "iter_1.pth"
        storage.gate.set()
        ckpt.flush()
        assert os.readlink(tmp_path / "latest.pth") == "iter_2.pth"
    finally:
        storage.gate.set()
        ckpt.close()


def test_latest_is_a_copy_where_symlinks_fail(tmp_path, monkeypatch):
    def no_symlinks(*args, **kwargs):
        raise OSError("symlinks are not supported here")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    with MMCVCheckpointer(make_model()) as ckpt:
        ckpt.save_checkpoint(tmp_path)
    assert not os.path.islink(tmp_path / "latest.pth")
    assert (tmp_path / "latest.pth").read_bytes() == (tmp_path / "iter_1.pth").read_bytes()
    assert [c.name for c in asyncckpt.checkpoints(tmp_path)] == ["iter_1.pth"]


def test_rotation_options_and_argument_errors(tmp_path):
    with MMCVCheckpointer(make_model(), keep_last=2) as ckpt:
        for it in range(4):
            ckpt.iter = it
            ckpt.save_checkpoint(tmp_path, create_symlink=False)
        with pytest.raises(TypeError, match="meta should be a dict"):
            ckpt.save_checkpoint(tmp_path, meta=[1])
    assert sorted(os.listdir(tmp_path)) == [
        ".asyncckpt.lock", "asyncckpt-index.json", "iter_3.pth", "iter_4.pth", "last_checkpoint"
    ]
    with pytest.raises(TypeError, match="optimizer must be"):
        MMCVCheckpointer(make_model(), optimizer="sgd")
    with pytest.raises(TypeError, match="model must be"):
        MMCVCheckpointer({"w": torch.zeros(1)})


# -- latest.pth follows the commits ----------------------------------------------------------------
def test_latest_exists_after_the_first_wait_and_follows_each_commit(tmp_path):
    model = make_model()
    ckpt = MMCVCheckpointer(model)
    try:
        for it in range(3):
            ckpt.iter = it
            info = ckpt.save_checkpoint(tmp_path).wait()  # no flush, no next save
            assert info is not None and info.name == f"iter_{it + 1}.pth"
            assert os.readlink(tmp_path / "latest.pth") == f"iter_{it + 1}.pth"
    finally:
        ckpt.close()


def test_latest_never_names_a_rotated_file(tmp_path):
    """keep_last=1: every commit rotates out the file latest.pth named; at each deletion the
    link has already moved, and after each wait() it names the file just saved."""
    storage = WrappedStorage(LocalStorage(tmp_path))
    named_at_delete: list[tuple[str, str]] = []

    def probe(name: str) -> None:
        named_at_delete.append((name, os.readlink(tmp_path / "latest.pth")))

    storage.fail_delete = probe
    ckpt = MMCVCheckpointer(make_model(), keep_last=1, queue_size=2)
    try:
        for it in range(5):
            ckpt.iter = it
            ckpt.save_checkpoint(storage).wait()
            assert os.readlink(tmp_path / "latest.pth") == f"iter_{it + 1}.pth"
            assert os.path.isfile(tmp_path / "latest.pth")
    finally:
        ckpt.close()
    assert [victim for victim, _ in named_at_delete] == [f"iter_{i}.pth" for i in range(1, 5)]
    assert all(victim != named for victim, named in named_at_delete)


def test_saves_without_symlink_do_not_move_latest_but_rotation_cannot_strand_it(tmp_path):
    ckpt = MMCVCheckpointer(make_model(), keep_last=1)
    try:
        ckpt.save_checkpoint(tmp_path).wait()
        ckpt.iter = 1
        ckpt.save_checkpoint(tmp_path, create_symlink=False).wait()
        ckpt.flush()
        # iter_1 was rotated out: latest.pth moved to the checkpoint that replaced it
        assert os.readlink(tmp_path / "latest.pth") == "iter_2.pth"
        ckpt.iter = 2
        with MMCVCheckpointer(make_model(), keep_last=3) as other:
            other.iter = 5
            other.save_checkpoint(tmp_path / "b", create_symlink=False).wait()
        assert not os.path.lexists(tmp_path / "b" / "latest.pth")
    finally:
        ckpt.close()


_CRASH = """
import os, sys, torch
from torch import nn
from asyncckpt.adapters.mmcv import MMCVCheckpointer
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
ckpt = MMCVCheckpointer(model, torch.optim.SGD(model.parameters(), lr=0.1), keep_last=1)
for it in range(2):
    ckpt.iter = it
    ckpt.save_checkpoint(sys.argv[1]).wait()
os._exit(3)  # dies without close(), flush() or any exit handler
"""


def test_a_crash_before_close_leaves_a_working_latest(tmp_path):
    run = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 3, run.stderr
    assert os.readlink(tmp_path / "latest.pth") == "iter_2.pth"
    fresh = make_model()
    resumed = MMCVCheckpointer(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
    state = resumed.resume(tmp_path / "latest.pth")
    assert (resumed.epoch, resumed.iter) == (1, 1)
    assert state["meta"]["iter"] == 1
    assert [c.name for c in asyncckpt.checkpoints(tmp_path)] == ["iter_2.pth"]


def test_a_failing_latest_update_reaches_the_training_loop(tmp_path):
    ckpt = MMCVCheckpointer(make_model())
    try:
        ckpt.save_checkpoint(tmp_path).wait()
        os.unlink(tmp_path / "latest.pth")
        (tmp_path / "latest.pth").mkdir()  # a folder in the way: the link cannot replace it
        (tmp_path / "latest.pth" / "keep").write_text("x")
        ckpt.iter = 1
        with pytest.raises(WriterError, match="updating latest.pth failed") as raised:
            ckpt.save_checkpoint(tmp_path).wait()
        assert isinstance(raised.value.__cause__, OSError)
        assert [c.name for c in asyncckpt.checkpoints(tmp_path)] == ["iter_1.pth", "iter_2.pth"]
        (tmp_path / "latest.pth" / "keep").unlink()
        (tmp_path / "latest.pth").rmdir()
        ckpt.iter = 2
        ckpt.save_checkpoint(tmp_path).wait()  # reported once; the next move works
        assert os.readlink(tmp_path / "latest.pth") == "iter_3.pth"
    finally:
        ckpt.close()


# -- what mmcv writes ----------------------------------------------------------------------------
class WithParallelChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.DataParallel(nn.Linear(3, 2))
        self.b = nn.BatchNorm1d(2)


def test_data_parallel_children_are_saved_without_their_module_level(tmp_path):
    """mmcv's get_state_dict drops the ``module.`` level of wrapped children too; resuming
    maps the names back onto whatever wrappers the model has."""
    torch.manual_seed(0)
    model = nn.DataParallel(WithParallelChild())
    with MMCVCheckpointer(model) as ckpt:
        ckpt.save_checkpoint(tmp_path)
    saved = torch.load(tmp_path / "iter_1.pth", weights_only=True)["state_dict"]
    assert list(saved) == ["a.weight", "a.bias", "b.weight", "b.bias", "b.running_mean",
                           "b.running_var", "b.num_batches_tracked"]
    expected = model.module.a.module.weight

    wrapped = WithParallelChild()  # the same layout: the child is wrapped again
    nn.init.zeros_(wrapped.a.module.weight)
    MMCVCheckpointer(wrapped).resume(tmp_path / "latest.pth", strict=True)
    assert torch.equal(wrapped.a.module.weight, expected)

    plain = nn.Module()  # no wrapper at all
    plain.a, plain.b = nn.Linear(3, 2), nn.BatchNorm1d(2)
    MMCVCheckpointer(plain).resume(tmp_path / "iter_1.pth", strict=True)
    assert torch.equal(plain.a.weight, expected)


def test_meta_is_copied_and_records_mmcv_only_when_installed(tmp_path):
    caller_meta = {"note": "x"}
    with MMCVCheckpointer(make_model(), meta={"exp_name": "e"}) as ckpt:
        ckpt.save_checkpoint(tmp_path, meta=caller_meta)
    assert caller_meta == {"note": "x"}  # mmcv would have added epoch, iter, time to it
    meta = torch.load(tmp_path / "iter_1.pth", weights_only=True)["meta"]
    try:
        version = importlib.metadata.version("mmcv")
    except importlib.metadata.PackageNotFoundError:
        version = None
    expected = ["note", "exp_name", "epoch", "iter", "time"]
    if version is not None:
        expected.insert(4, "mmcv_version")
        assert meta["mmcv_version"] == version
    assert list(meta) == expected


# -- side by side with mmcv 1.x's own IterBasedRunner (where mmcv 1.x is installed) -------------
def _mmcv_runner_module():
    with warnings.catch_warnings():  # mmcv 1.x announces 2.0 at import
        warnings.simplefilter("ignore")
        return pytest.importorskip("mmcv.runner", reason="needs mmcv 1.x (its runner)")


class Net(nn.Module):
    """A model with a DataParallel child, and the train_step mmcv's runner insists on."""

    CLASSES = ("cat", "dog")

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.DataParallel(nn.Linear(3, 4))
        self.b = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))

    def train_step(self, data: object, optimizer: object) -> dict[str, object]:
        raise NotImplementedError  # the runner's training loop is not used here


def _trained_pair() -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    ref = Net()
    ours = copy.deepcopy(ref)
    optims = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ref, ours)]
    for model, optim in zip((ref, ours), optims, strict=True):
        torch.manual_seed(1)
        for _ in range(2):
            optim.zero_grad()
            model(torch.randn(5, 3)).pow(2).mean().backward()
            optim.step()
    return ref, optims[0], ours, optims[1]


def test_same_files_and_content_as_mmcv_iter_based_runner(tmp_path):
    mmcv_runner = _mmcv_runner_module()
    import mmcv

    ref_model, ref_optim, our_model, our_optim = _trained_pair()
    runner = mmcv_runner.IterBasedRunner(
        ref_model, optimizer=ref_optim, work_dir=str(tmp_path / "ref"),
        logger=logging.getLogger("mmcv-reference"), meta=dict(exp_name="x"), max_iters=10,
    )
    ckpt = MMCVCheckpointer(our_model, our_optim, meta=dict(exp_name="x"))
    for it in (3, 6):
        runner._iter, ckpt.iter = it, it
        runner.save_checkpoint(str(tmp_path / "ref"), meta=dict(note=it))
        ckpt.save_checkpoint(tmp_path / "ours", meta=dict(note=it)).wait()
    ckpt.close()

    def pth(folder: str) -> list[str]:
        return sorted(n for n in os.listdir(tmp_path / folder) if n.endswith(".pth"))

    assert pth("ours") == pth("ref") == ["iter_4.pth", "iter_7.pth", "latest.pth"]
    assert os.readlink(tmp_path / "ours" / "latest.pth") == os.readlink(
        tmp_path / "ref" / "latest.pth")
    for name in ("iter_4.pth", "iter_7.pth"):
        ref = torch.load(tmp_path / "ref" / name, weights_only=True)
        ours = torch.load(tmp_path / "ours" / name, weights_only=True)
        assert list(ours) == list(ref)
        drop_time = [{k: v for k, v in c["meta"].items() if k != "time"} for c in (ours, ref)]
        assert drop_time[0] == drop_time[1]
        assert list(ours["meta"]) == list(ref["meta"])
        assert ours["meta"]["mmcv_version"] == mmcv.__version__
        assert list(ours["state_dict"]) == list(ref["state_dict"])  # a.weight, not a.module...
        assert tensors_equal(ours["state_dict"], ref["state_dict"])
        assert tensors_equal(ours["optimizer"]["state"], ref["optimizer"]["state"])
        assert ours["optimizer"]["param_groups"] == ref["optimizer"]["param_groups"]


def test_cross_resume_with_mmcv_iter_based_runner(tmp_path):
    mmcv_runner = _mmcv_runner_module()
    ref_model, ref_optim, our_model, our_optim = _trained_pair()
    runner = mmcv_runner.IterBasedRunner(ref_model, optimizer=ref_optim,
                                         work_dir=str(tmp_path / "ref"),
                                         logger=logging.getLogger("mmcv-reference"), max_iters=9)
    runner._iter, runner._epoch = 5, 1
    runner.save_checkpoint(str(tmp_path / "ref"))
    with MMCVCheckpointer(our_model, our_optim) as ckpt:
        ckpt.iter, ckpt.epoch = 5, 1
        ckpt.save_checkpoint(tmp_path / "ours")

    def fresh() -> tuple[Net, torch.optim.Optimizer]:
        torch.manual_seed(7)  # different weights than the trained ones
        model = Net()
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    model, optim = fresh()  # mmcv resumes from our latest.pth
    other = mmcv_runner.IterBasedRunner(model, optimizer=optim, work_dir=str(tmp_path / "x"),
                                        logger=logging.getLogger("mmcv-reference"), max_iters=9)
    other.resume(str(tmp_path / "ours" / "latest.pth"), map_location="cpu")
    assert (other.iter, other.epoch) == (5, 2)
    assert tensors_equal(model.state_dict(), our_model.state_dict())
    assert tensors_equal(optim.state_dict()["state"], our_optim.state_dict()["state"])

    model, optim = fresh()  # we resume from mmcv's latest.pth
    ours = MMCVCheckpointer(model, optim)
    ours.resume(tmp_path / "ref" / "latest.pth", strict=True)
    assert (ours.iter, ours.epoch) == (5, 2)
    assert tensors_equal(model.state_dict(), ref_model.state_dict())
    assert tensors_equal(optim.state_dict()["state"], ref_optim.state_dict()["state"])
