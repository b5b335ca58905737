"""MMCVCheckpointer: mmcv IterBasedRunner-style save_checkpoint / resume over asyncckpt."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from helpers import WrappedStorage, tensors_equal
from torch import nn

import asyncckpt
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
