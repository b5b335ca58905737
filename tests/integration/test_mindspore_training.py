"""MindSpore-style training with the adapter's ``Model.train``: resume, hook order, breakpoints
(``exception_save``) and several ``ModelCheckpoint`` callbacks in one folder, as in MindSpore 2.10.
tests/mindspore_diff runs the same behaviours side by side with MindSpore itself."""

from __future__ import annotations

import json
import os

import pytest
import torch

import asyncckpt
from asyncckpt.adapters.mindspore import (
    Callback,
    CheckpointConfig,
    Model,
    ModelCheckpoint,
    load_checkpoint,
)


def ckpt_files(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".ckpt"))


def listed(folder) -> list[str]:
    return [c.name for c in asyncckpt.checkpoints(folder)]


# -- Model.train (PyTorch) -------------------------------------------------------------------
def make_run(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optim = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(3)]
    return net, optim, data


def test_resume_from_latest_restores_model_optimizer_and_counters(tmp_path):
    net, optim, data = make_run()
    Model(net, torch.nn.functional.mse_loss, optim).train(4, data)
    uninterrupted = {k: v.clone() for k, v in net.state_dict().items()}

    net, optim, data = make_run()
    config = CheckpointConfig(save_checkpoint_steps=2, append_info=["epoch_num", "step_num"])
    cb = ModelCheckpoint(prefix="resnet", directory=tmp_path, config=config)
    Model(net, torch.nn.functional.mse_loss, optim).train(2, data, callbacks=[cb])
    assert cb.latest_ckpt_file_name == str(tmp_path / "resnet-2_3.ckpt")  # saved by end()

    net, optim, data = make_run(seed=123)  # different initial weights, fresh optimizer
    state = load_checkpoint(cb.latest_ckpt_file_name)
    assert (state["epoch_num"], state["step_num"]) == (2, 6)
    net.load_state_dict(state["network"])
    optim.load_state_dict(state["optimizer"])
    cb2 = ModelCheckpoint(prefix="resnet", directory=tmp_path, config=config)
    Model(net, torch.nn.functional.mse_loss, optim).train(
        4, data, callbacks=[cb2], initial_epoch=state["epoch_num"]
    )
    assert cb2.prefix == "resnet_1"
    for key, value in net.state_dict().items():
        assert torch.equal(value, uninterrupted[key]), key
    final = load_checkpoint(cb2.latest_ckpt_file_name)
    # as in MindSpore 2.10, a resumed run counts its steps from 0: step_num is 6, not 12
    assert (final["epoch_num"], final["step_num"]) == (4, 6)
    assert cb2.latest_ckpt_file_name.endswith("resnet_1-4_3.ckpt")


def test_hooks_run_in_order_and_stop_requests_end_training(tmp_path):
    calls: list[tuple[str, int, int]] = []

    class Recorder(Callback):
        def _note(self, hook, run_context):
            p = run_context.original_args()
            calls.append((hook, p.cur_epoch_num, p.cur_step_num))

        def begin(self, run_context):
            self._note("begin", run_context)

        def epoch_begin(self, run_context):
            self._note("epoch_begin", run_context)

        def step_end(self, run_context):
            self._note("step_end", run_context)
            if run_context.original_args().cur_step_num == 4:
                run_context.request_stop()

        def end(self, run_context):
            self._note("end", run_context)

    net, optim, data = make_run()
    cb = ModelCheckpoint(directory=tmp_path, config=CheckpointConfig(save_checkpoint_steps=3))
    Model(net, torch.nn.functional.mse_loss, optim).train(5, data, callbacks=[Recorder(), cb])
    assert calls == [
        ("begin", 0, 0), ("epoch_begin", 1, 0), ("step_end", 1, 1), ("step_end", 1, 2),
        ("step_end", 1, 3), ("epoch_begin", 2, 3), ("step_end", 2, 4), ("end", 2, 4),
    ]
    assert listed(tmp_path) == ["CKP-1_3.ckpt", "CKP-2_1.ckpt"]


class Boom(Exception):
    pass


def failing_data(data, at: int):
    class Data:
        def __len__(self):
            return len(data)

        def __iter__(self):
            for i, batch in enumerate(data, 1):
                if i == at:
                    raise Boom("data loader died")
                yield batch

    return Data()


@pytest.mark.parametrize("exception_save", [True, False])
def test_exception_save_writes_a_breakpoint_checkpoint(tmp_path, exception_save):
    net, optim, data = make_run()
    config = CheckpointConfig(save_checkpoint_steps=1, keep_checkpoint_max=1,
                              exception_save=exception_save, append_info=["step_num"])
    cb = ModelCheckpoint(directory=tmp_path, config=config)
    with pytest.raises(Boom):
        Model(net, torch.nn.functional.mse_loss, optim).train(3, failing_data(data, 3),
                                                              callbacks=cb)
    expected = ["CKP-1_2.ckpt"] + (["CKP-1_2_breakpoint.ckpt"] if exception_save else [])
    assert ckpt_files(tmp_path) == sorted(expected)
    assert listed(tmp_path) == expected  # the breakpoint is outside keep_checkpoint_max
    if exception_save:
        state = load_checkpoint(tmp_path / "CKP-1_2_breakpoint.ckpt")
        assert state["step_num"] == 2
        assert torch.equal(state["network"]["0.weight"], net[0].weight.detach())


class RaiseAt(Callback):
    """Raises Boom in ``hook`` at (cur_epoch_num, cur_step_in_epoch) == ``at``."""

    def __init__(self, hook: str, at: tuple[int, int]) -> None:
        self.hook, self.at = hook, at

    def _check(self, hook, run_context):
        p = run_context.original_args()
        if hook == self.hook and (p.cur_epoch_num, p.cur_step_in_epoch) == self.at:
            raise Boom(hook)

    def begin(self, run_context):
        self._check("begin", run_context)

    def epoch_begin(self, run_context):
        self._check("epoch_begin", run_context)

    def step_begin(self, run_context):
        self._check("step_begin", run_context)


BREAK = {"exception_save": True, "append_info": ["epoch_num", "step_num"]}


@pytest.mark.parametrize(
    ("hook", "at", "expected", "append"),
    [
        ("begin", (0, 0), "CKP-0_0_breakpoint.ckpt", (0, 0)),
        ("epoch_begin", (2, 0), "CKP-2_0_breakpoint.ckpt", (2, 0)),  # no step of epoch 2 ran
        ("step_begin", (2, 2), "CKP-2_2_breakpoint.ckpt", (2, 2)),  # step_num: within the epoch
    ],
)
def test_breakpoint_names_count_steps_within_the_epoch(tmp_path, hook, at, expected, append):
    net, optim, data = make_run()
    cb = ModelCheckpoint(directory=tmp_path, config=CheckpointConfig(save_checkpoint_steps=10,
                                                                     **BREAK))
    with pytest.raises(Boom):
        Model(net, torch.nn.functional.mse_loss, optim).train(
            3, data, callbacks=[RaiseAt(hook, at), cb])
    assert [n for n in ckpt_files(tmp_path) if "breakpoint" in n] == [expected]
    state = load_checkpoint(tmp_path / expected)
    assert (state["epoch_num"], state["step_num"]) == append


def test_breakpoint_uses_the_original_prefix_and_its_own_counter(tmp_path):
    net, optim, data = make_run()
    (tmp_path / "CKP-1_1.ckpt").write_bytes(b"")  # a regular checkpoint: renames CKP to CKP_1
    (tmp_path / "CKP-1_4_breakpoint.ckpt").write_bytes(b"")  # renames breakpoints to CKP_1
    cb = ModelCheckpoint(directory=tmp_path, config=CheckpointConfig(save_checkpoint_steps=2,
                                                                     **BREAK))
    assert cb.prefix == "CKP_1"
    with pytest.raises(Boom):
        Model(net, torch.nn.functional.mse_loss, optim).train(
            3, data, callbacks=[RaiseAt("step_begin", (2, 1)), cb])
    assert ckpt_files(tmp_path) == ["CKP-1_1.ckpt", "CKP-1_4_breakpoint.ckpt",
                                    "CKP_1-1_2.ckpt", "CKP_1-2_1_breakpoint.ckpt"]


def test_breakpoint_holds_the_train_network_and_optimizer_even_with_saved_network(tmp_path):
    net, optim, data = make_run()
    config = CheckpointConfig(save_checkpoint_steps=2, saved_network=net[0], **BREAK)
    cb = ModelCheckpoint(directory=tmp_path, config=config)
    with pytest.raises(Boom):
        Model(net, torch.nn.functional.mse_loss, optim).train(
            3, data, callbacks=[RaiseAt("step_begin", (2, 1)), cb])
    regular = load_checkpoint(tmp_path / "CKP-1_2.ckpt")
    assert "optimizer" not in regular and set(regular["network"]) == {"weight", "bias"}
    breakpoint_ = load_checkpoint(tmp_path / "CKP-2_1_breakpoint.ckpt")
    assert "optimizer" in breakpoint_ and "0.weight" in breakpoint_["network"]


@pytest.mark.parametrize(("first", "last", "expected"), [
    (True, True, ["B-2_1_breakpoint.ckpt"]),
    (True, False, []),  # the last ModelCheckpoint decides, as in MindSpore
    (False, True, ["B-2_1_breakpoint.ckpt"]),
])
def test_exception_save_is_decided_by_the_last_model_checkpoint(tmp_path, first, last, expected):
    net, optim, data = make_run()
    a = ModelCheckpoint("A", tmp_path, CheckpointConfig(save_checkpoint_steps=2,
                                                        exception_save=first))
    b = ModelCheckpoint("B", tmp_path, CheckpointConfig(save_checkpoint_steps=3,
                                                        exception_save=last))
    with pytest.raises(Boom):
        Model(net, torch.nn.functional.mse_loss, optim).train(
            3, data, callbacks=[a, RaiseAt("step_begin", (2, 1)), b])
    assert [n for n in ckpt_files(tmp_path) if "breakpoint" in n] == expected
    assert "A-1_2.ckpt" in ckpt_files(tmp_path) and "B-1_3.ckpt" in ckpt_files(tmp_path)


def test_resumed_runs_count_steps_from_zero_as_mindspore(tmp_path):
    data = [(torch.randn(2, 3), torch.randn(2, 1)) for _ in range(5)]
    net = torch.nn.Linear(3, 1)
    config = CheckpointConfig(save_checkpoint_steps=3, keep_checkpoint_max=10,
                              append_info=["step_num"])
    cb = ModelCheckpoint(directory=tmp_path, config=config)
    Model(net, torch.nn.functional.mse_loss).train(3, data, callbacks=[cb], initial_epoch=1)
    assert listed(tmp_path) == ["CKP-2_3.ckpt", "CKP-3_1.ckpt", "CKP-3_4.ckpt", "CKP-3_5.ckpt"]
    assert [load_checkpoint(tmp_path / n)["step_num"] for n in listed(tmp_path)] == [3, 6, 9, 10]


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        ((0, []), ValueError, "epoch must be >= 1"),
        ((2, [], None, 2), ValueError, "greater than initial_epoch"),
        ((2, iter([1])), TypeError, "get_dataset_size"),
        ((2, []), ValueError, "at least one batch"),
        ((2, [1], ["cb"]), TypeError, "Callback objects"),
    ],
)
def test_model_train_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        Model(torch.nn.Linear(1, 1)).train(*args)


def test_two_prefixes_share_one_folder_each_with_its_own_rotation(tmp_path):
    # one callback every 2 steps, one every 5 (MindSpore's common set-up), async saves queued
    step_cb = ModelCheckpoint("step", tmp_path, CheckpointConfig(
        save_checkpoint_steps=2, keep_checkpoint_max=2, async_save=True))
    epoch_cb = ModelCheckpoint("epoch", tmp_path, CheckpointConfig(
        save_checkpoint_steps=5, keep_checkpoint_max=1, async_save="thread"))
    net, optim, data = make_run()
    Model(net, torch.nn.functional.mse_loss, optim).train(4, data, callbacks=[step_cb, epoch_cb])
    # 12 steps of 3 per epoch: step saves 2..12 (keep 2), epoch saves 5, 10 and 12 at end (keep 1)
    assert ckpt_files(tmp_path) == ["epoch-4_3.ckpt", "step-4_1.ckpt", "step-4_3.ckpt"]
    with open(tmp_path / "asyncckpt-index.json") as f:
        entries = json.load(f)["entries"]
    assert sorted((e["series"], e["name"]) for e in entries) == [
        ("epoch", "epoch-4_3.ckpt"), ("step", "step-4_1.ckpt"), ("step", "step-4_3.ckpt")
    ]
