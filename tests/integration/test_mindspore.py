"""MindSpore-style callbacks: CheckpointConfig and ModelCheckpoint behaviour as in MindSpore 2.10
(its tests/ut/python/train/test_run_config.py, utils/test_callback.py and the checkpoint-manager /
encryption cases of utils/test_serialize.py), plus a PyTorch resume. tests/mindspore_diff runs
the same behaviours side by side with MindSpore itself."""

from __future__ import annotations

import json
import logging
import os
import threading
import zipfile

import pytest
import torch
from support.helpers import WrappedStorage

import asyncckpt
from asyncckpt import CheckpointError, DecryptionError, WriterError
from asyncckpt.adapters._mindspore_folder import next_free_prefix
from asyncckpt.adapters.mindspore import (
    CallbackParam,
    CheckpointConfig,
    ModelCheckpoint,
    RunContext,
    _next_free_prefix,
    load_checkpoint,
)
from asyncckpt.storage import LocalStorage

LOGGER = "asyncckpt.adapters.mindspore"
KEY = bytes(range(16))


class FakeClock:
    """Seconds since the epoch, moved by the test."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ckpt_files(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".ckpt"))


def listed(folder) -> list[str]:
    return [c.name for c in asyncckpt.checkpoints(folder)]


def params(net: torch.nn.Module | None = None, **fields) -> CallbackParam:
    base = CallbackParam(
        train_network=net if net is not None else torch.nn.Linear(2, 2),
        epoch_num=10, cur_epoch_num=1, cur_step_num=0, batch_num=32,
    )
    base.update(fields)
    return base


def run_steps(cb: ModelCheckpoint, p: CallbackParam, steps, clock: FakeClock | None = None,
              dt: float = 0.0) -> None:
    """Call step_end for each global step (epoch derived from batch_num), advancing the clock."""
    ctx = RunContext(p)
    for step in steps:
        if clock is not None:
            clock.now += dt
        p.cur_step_num = step
        p.cur_epoch_num = (step - 1) // p.batch_num + 1
        cb.step_end(ctx)


# -- CheckpointConfig (test_run_config.py) -----------------------------------------------------
def test_config_defaults_and_policy():
    config = CheckpointConfig()
    assert config.save_checkpoint_steps == 1
    assert config.save_checkpoint_seconds is None
    assert config.keep_checkpoint_max == 5
    assert config.keep_checkpoint_per_n_minutes is None
    assert config.integrated_save is True and config.async_save is False
    assert config.append_dict is None and config.enc_key is None and config.enc_mode == "AES-GCM"
    assert config.get_checkpoint_policy() == {
        "save_checkpoint_steps": 1, "save_checkpoint_seconds": None, "keep_checkpoint_max": 5,
        "keep_checkpoint_per_n_minutes": None, "saved_network": None,
    }


def test_config_positional_arguments_follow_mindspore_order(caplog):
    with caplog.at_level(logging.WARNING, LOGGER):
        config = CheckpointConfig(1, 5)  # save_checkpoint_steps=1, save_checkpoint_seconds=5
    assert config.save_checkpoint_steps == 1 and config.save_checkpoint_seconds is None
    assert config.get_checkpoint_policy()["keep_checkpoint_max"] == 5
    assert "save_checkpoint_seconds=5 is ignored" in caplog.text


@pytest.mark.parametrize(
    "name",
    ["save_checkpoint_steps", "save_checkpoint_seconds", "keep_checkpoint_max",
     "keep_checkpoint_per_n_minutes"],
)
def test_config_counts_are_validated(name):
    with pytest.raises(TypeError, match=name):
        CheckpointConfig(**{name: "abc"})
    with pytest.raises(TypeError, match=name):
        CheckpointConfig(**{name: True})
    with pytest.raises(ValueError, match=name):
        CheckpointConfig(**{name: -1})


def test_steps_win_over_seconds_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, LOGGER):
        config = CheckpointConfig(save_checkpoint_steps=200, save_checkpoint_seconds=100)
    assert config.save_checkpoint_steps == 200 and config.save_checkpoint_seconds is None
    assert "save_checkpoint_steps=200 takes precedence" in caplog.text


def test_seconds_are_used_without_steps(caplog):
    with caplog.at_level(logging.WARNING, LOGGER):
        config = CheckpointConfig(save_checkpoint_steps=None, save_checkpoint_seconds=100)
        config0 = CheckpointConfig(save_checkpoint_steps=0, save_checkpoint_seconds=100)
    assert config.save_checkpoint_seconds == 100 and config0.save_checkpoint_seconds == 100
    assert caplog.text == ""


def test_max_wins_over_per_n_minutes_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, LOGGER):
        config = CheckpointConfig(keep_checkpoint_max=5, keep_checkpoint_per_n_minutes=100)
    assert config.keep_checkpoint_max == 5 and config.keep_checkpoint_per_n_minutes is None
    assert "keep_checkpoint_per_n_minutes=100 is ignored" in caplog.text


def test_per_n_minutes_is_used_without_max():
    config = CheckpointConfig(keep_checkpoint_max=None, keep_checkpoint_per_n_minutes=100)
    assert config.keep_checkpoint_per_n_minutes == 100 and config.keep_checkpoint_max is None


def test_no_keep_option_keeps_one_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, LOGGER):
        config = CheckpointConfig(keep_checkpoint_max=0, keep_checkpoint_per_n_minutes=0)
    assert config.keep_checkpoint_max == 1
    assert "keep_checkpoint_max=1" in caplog.text


@pytest.mark.parametrize("args", [(0, 0, 0, 0, True), (0, None, 0, 0, True), (None,) * 4])
def test_all_zero_config_is_a_value_error(args):
    with pytest.raises(ValueError, match="can't all be None or 0"):
        CheckpointConfig(*args)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"integrated_save": 1}, TypeError, "integrated_save must be a bool"),
        ({"async_save": "yes"}, ValueError, "'thread' or 'process', got 'yes'"),
        ({"async_save": 1}, TypeError, "async_save must be a bool or str"),
        ({"exception_save": None}, TypeError, "exception_save must be a bool"),
        ({"saved_network": "net"}, TypeError, "saved_network must be None or a torch.nn.Module"),
        # MindSpore raises ValueError for these type errors; so do we
        ({"enc_key": "secret-16-bytes!"}, ValueError, "enc_key must be None or bytes"),
        ({"enc_key": bytearray(16)}, ValueError, "enc_key must be None or bytes"),
        ({"enc_mode": 1}, ValueError, "enc_mode must be a str"),
        ({"crc_check": 1}, ValueError, "crc_check must be a bool"),
        ({"format": 1}, ValueError, "format must be a str"),
        ({"remove_redundancy": "no"}, ValueError, "remove_redundancy must be a bool"),
        ({"format": "safetensors"}, ValueError, "format='safetensors' is not available"),
        ({"enc_key": b"short"}, ValueError, "16, 24 or 32 bytes"),
        ({"enc_key": KEY, "enc_mode": "AES-ECB"}, ValueError, "'AES-GCM' or 'AES-CBC'"),
    ],
)
def test_config_type_and_value_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CheckpointConfig(**kwargs)


def test_mindspore_options_without_a_pytorch_meaning_are_accepted_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, LOGGER):
        config = CheckpointConfig(integrated_save=False, remove_redundancy=True,
                                  async_save="process", incremental=True, enable_redundance=1)
    assert config.async_save == "process"
    assert config.extra_options == {"incremental": True, "enable_redundance": 1}
    for name in ("integrated_save=False", "remove_redundancy=True", "async_save='process'",
                 "incremental=True", "enable_redundance=1"):
        assert f"{name} is accepted and ignored" in caplog.text, name
    caplog.clear()
    with caplog.at_level(logging.WARNING, LOGGER):
        CheckpointConfig(async_save="thread", crc_check=True, format="ckpt")  # all meaningful
    assert caplog.text == ""


def test_crc_check_records_torchs_crc32_in_the_file(tmp_path):
    for crc_check in (False, True):
        with ModelCheckpoint(f"crc{int(crc_check)}", tmp_path,
                             CheckpointConfig(crc_check=crc_check)) as cb:
            run_steps(cb, params(), [1])
        with zipfile.ZipFile(cb.latest_ckpt_file_name) as z:
            crcs = {info.CRC for info in z.infolist()}
        assert (crcs != {0}) is crc_check
        assert torch.load(cb.latest_ckpt_file_name, weights_only=True)["network"]


def test_enc_mode_is_only_checked_with_a_key_and_the_key_is_not_shown():
    CheckpointConfig(enc_mode="anything")  # MindSpore ignores enc_mode without enc_key
    config = CheckpointConfig(enc_key=KEY, enc_mode="AES-CBC")
    assert config.encryption is not None and config.encryption.mode == "AES-CBC"
    assert repr(KEY) not in repr(config) and KEY.hex() not in repr(config)


@pytest.mark.parametrize(
    ("append_info", "expected"),
    [
        (None, None),
        ([], None),
        (["epoch_num"], {"epoch_num": 0}),
        (["step_num", "epoch_num"], {"epoch_num": 0, "step_num": 0}),
        (["epoch_num", {"lr": 0.01, "flag": True, "n": 3}],
         {"epoch_num": 0, "lr": 0.01, "flag": True, "n": 3}),
        ([{"epoch_num": 10}, "epoch_num"], {"epoch_num": 10}),
        ([{"tag": "run-1"}], {"tag": "run-1"}),
    ],
)
def test_append_info_is_turned_into_append_dict(append_info, expected):
    config = CheckpointConfig(append_info=append_info)
    assert config.append_dict == expected
    if expected is not None:
        config.append_dict["x"] = 1  # a copy: the config stays as built
        assert "x" not in config.append_dict


@pytest.mark.parametrize(
    ("append_info", "exc", "match"),
    [
        ("epoch_num", TypeError, "append_info must be a list"),
        (["epoch"], ValueError, "must be one of"),
        (("epoch_num",), TypeError, "append_info must be a list"),
        ([1], TypeError, "elements must be str or dict"),
        ([{"a": 1}, {"b": 2}], TypeError, "only one dict"),
        ([{"a": [1]}], TypeError, "map str to int, float, bool, str or Tensor"),
        ([{1: 1}], TypeError, "map str to int, float, bool, str or Tensor"),
        ([{"network": 1}], ValueError, "reserved"),
    ],
)
def test_bad_append_info(append_info, exc, match):
    with pytest.raises(exc, match=match):
        CheckpointConfig(append_info=append_info)


# -- ModelCheckpoint construction (test_callback.py) ------------------------------------------
def test_model_checkpoint_arguments(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="prefix 123"):
        ModelCheckpoint(123)
    with pytest.raises(ValueError, match="invalid"):
        ModelCheckpoint("a/b", directory=tmp_path)
    with pytest.raises(ValueError, match="reserved for temporary files"):
        ModelCheckpoint(".hidden", directory=tmp_path)
    with pytest.raises(TypeError, match="CheckpointConfig type"):
        ModelCheckpoint(config="type_error", directory=tmp_path)
    with pytest.raises(TypeError, match="directory must be"):
        ModelCheckpoint(directory=123)
    monkeypatch.chdir(tmp_path)
    cb = ModelCheckpoint()  # MindSpore's defaults: prefix CKP, the current directory
    assert cb.prefix == "CKP" and cb.directory == str(tmp_path)
    cb2 = ModelCheckpoint(prefix="ckpt_2", directory=tmp_path / "test_files",
                          config=CheckpointConfig())
    assert (tmp_path / "test_files").is_dir() and cb2.latest_ckpt_file_name == ""


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ([], "CKP"),
        (["CKP-1_1.ckpt"], "CKP_1"),
        (["CKP_1-1_1.ckpt", "CKP-1_1.ckpt"], "CKP_2"),
        (["CKP_3-2_5.ckpt", "CKP-1_1.ckpt", "CKP_1-1_1.ckpt"], "CKP_4"),
        (["CKPX-1_1.ckpt", "CKPnet-1_1.ckpt"], "CKP"),  # another prefix
        (["CKP-1_1.pt", "CKP-graph.meta", "CKP"], "CKP"),  # not checkpoints
        (["CKP_a-1_1.ckpt"], "CKP"),  # no number between '_' and '-'
        (["CKP-1_1_breakpoint.ckpt"], "CKP"),  # breakpoints have their own counter
        (["CKP-1_1.safetensors"], "CKP_1"),  # MindSpore's other checkpoint format counts
    ],
)
def test_prefix_collision_rule(names, expected):
    assert _next_free_prefix(names, "CKP") == expected


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["CKP-1_1.ckpt", "CKP_4-1_1.ckpt"], "CKP"),  # regular checkpoints do not count
        (["CKP-1_1_breakpoint.ckpt"], "CKP_1"),
        (["CKP_2-3_0_breakpoint.ckpt", "CKPX-1_1_breakpoint.ckpt"], "CKP_3"),
    ],
)
def test_breakpoint_prefix_rule(names, expected):
    assert next_free_prefix(names, "CKP", breakpoints=True) == expected


def test_empty_and_long_prefixes_save_as_in_mindspore(tmp_path):
    config = CheckpointConfig(save_checkpoint_steps=2, keep_checkpoint_max=1)
    for prefix, expected in [("", "_1-1_2.ckpt"), ("p" * 230, "p" * 230 + "-1_2.ckpt")]:
        with ModelCheckpoint(prefix="", directory=tmp_path, config=config) as first:
            run_steps(first, params(batch_num=10), [2])  # "-1_2.ckpt"
        with ModelCheckpoint(prefix=prefix, directory=tmp_path, config=config) as cb:
            run_steps(cb, params(batch_num=10), [2])
        assert os.path.basename(cb.latest_ckpt_file_name) == expected
        assert (tmp_path / expected).is_file() and expected in listed(tmp_path)


# -- saving by steps and by seconds ------------------------------------------------------------
def test_save_by_steps_names_files_by_epoch_and_step_in_epoch(tmp_path):
    config = CheckpointConfig(save_checkpoint_steps=16, keep_checkpoint_max=5)
    with ModelCheckpoint(prefix="test_ckpt", directory=tmp_path, config=config) as cb:
        run_steps(cb, params(), range(1, 65))
        assert cb.latest_ckpt_file_name == str(tmp_path / "test_ckpt-2_32.ckpt")
    assert ckpt_files(tmp_path) == [
        "test_ckpt-1_16.ckpt", "test_ckpt-1_32.ckpt", "test_ckpt-2_16.ckpt", "test_ckpt-2_32.ckpt"
    ]
    steps = [(c.step, c.epoch) for c in asyncckpt.checkpoints(tmp_path)]
    assert steps == [(16, 1), (32, 1), (48, 2), (64, 2)]


def test_save_by_steps_as_in_mindspores_test(tmp_path):
    config = CheckpointConfig(save_checkpoint_steps=16, save_checkpoint_seconds=0,
                              keep_checkpoint_max=5, keep_checkpoint_per_n_minutes=0)
    p = params(cur_epoch_num=5, cur_step_num=160, batch_num=32)
    with ModelCheckpoint(directory=tmp_path, config=config) as cb:
        cb.step_end(RunContext(p))
    assert ckpt_files(tmp_path) == ["CKP-5_32.ckpt"]
    p.cur_epoch_num, p.cur_step_num = 1, 15
    with ModelCheckpoint(directory=tmp_path, config=config) as cb2:
        cb2.step_end(RunContext(p))  # 15 < 16 steps since its start: nothing
        assert cb2.prefix == "CKP_1"
    assert ckpt_files(tmp_path) == ["CKP-5_32.ckpt"]


def test_save_by_seconds_with_an_injected_clock(tmp_path):
    clock = FakeClock()
    config = CheckpointConfig(save_checkpoint_steps=None, save_checkpoint_seconds=100,
                              keep_checkpoint_max=10)
    cb = ModelCheckpoint(directory=tmp_path, config=config, clock=clock)
    p, ctx = params(batch_num=100), None
    ctx = RunContext(p)
    for step, t in [(1, 50), (2, 100), (3, 100.5), (4, 150), (5, 200.4), (6, 200.6)]:
        clock.now = 1_000_000 + t
        p.cur_step_num = step
        cb.step_end(ctx)
    clock.now += 1
    p.cur_step_num = 7
    cb.end(ctx)  # forced: the last step is saved whatever the time
    assert [c.step for c in asyncckpt.checkpoints(tmp_path)] == [3, 6, 7]


def test_end_saves_the_last_step_once_and_drains(tmp_path):
    config = CheckpointConfig(save_checkpoint_steps=4, async_save=True)
    cb = ModelCheckpoint(directory=tmp_path, config=config)
    p = params(batch_num=10)
    run_steps(cb, p, range(1, 9))
    cb.end(RunContext(p))  # step 8 was just saved: nothing new
    assert listed(tmp_path) == ["CKP-1_4.ckpt", "CKP-1_8.ckpt"]
    run_steps(cb, p, [9])
    cb.end(RunContext(p))  # a new writer opens for the extra step and drains at end
    assert listed(tmp_path) == ["CKP-1_4.ckpt", "CKP-1_8.ckpt", "CKP-1_9.ckpt"]


def test_force_only_applies_within_a_configured_trigger(tmp_path):
    # MindSpore's _check_save_ckpt: with neither steps nor seconds, end() saves nothing either.
    config = CheckpointConfig(save_checkpoint_steps=0, save_checkpoint_seconds=0,
                              keep_checkpoint_max=5)
    cb = ModelCheckpoint(directory=tmp_path, config=config)
    p = params()
    run_steps(cb, p, range(1, 5))
    cb.end(RunContext(p))
    assert ckpt_files(tmp_path) == []


def test_missing_run_context_fields_are_named(tmp_path):
    with ModelCheckpoint(directory=tmp_path) as cb:
        with pytest.raises(TypeError, match="'cur_step_num'"):
            cb.step_end(RunContext(object()))
        with pytest.raises(ValueError, match="batch_num must be an int >= 1"):
            cb.step_end(RunContext(params(cur_step_num=1, batch_num=0)))


# -- rotation (CheckpointManager cases) ---------------------------------------------------------
def test_keep_checkpoint_max_rotates_through_the_index_not_mtimes(tmp_path):
    config = CheckpointConfig(save_checkpoint_steps=1, keep_checkpoint_max=3)
    with ModelCheckpoint(directory=tmp_path, config=config) as cb:
        p = params(batch_num=100)
        run_steps(cb, p, range(1, 4))
        cb.close()
        # Make the newest file look like the oldest; MindSpore's manager would delete it next.
        os.utime(tmp_path / "CKP-1_3.ckpt", (1, 1))
        run_steps(cb, p, range(4, 7))
    assert ckpt_files(tmp_path) == ["CKP-1_4.ckpt", "CKP-1_5.ckpt", "CKP-1_6.ckpt"]
    assert listed(tmp_path) == ["CKP-1_4.ckpt", "CKP-1_5.ckpt", "CKP-1_6.ckpt"]


def test_keep_checkpoint_per_n_minutes_with_an_injected_clock(tmp_path):
    clock = FakeClock()
    config = CheckpointConfig(save_checkpoint_steps=1, keep_checkpoint_max=None,
                              keep_checkpoint_per_n_minutes=1)
    with ModelCheckpoint(directory=tmp_path, config=config, clock=clock) as cb:
        # one save every 25 s: t = 0, 25, 50 | 75, 100 | 125, 150, 175 | 200 (minute windows)
        run_steps(cb, params(batch_num=100), range(1, 10), clock, dt=25)
    kept = [(c.step, c.time - 1_000_025) for c in asyncckpt.checkpoints(tmp_path)]
    assert kept == [(1, 0), (4, 75), (6, 125), (9, 200)]


def test_rotation_never_touches_another_prefix(tmp_path):
    (tmp_path / "CKP-9_9.ckpt").write_bytes(b"not ours")  # unlisted: never deleted
    config = CheckpointConfig(save_checkpoint_steps=1, keep_checkpoint_max=2)
    with ModelCheckpoint(directory=tmp_path, config=config) as first:
        assert first.prefix == "CKP_1"
        run_steps(first, params(batch_num=100), range(1, 5))
    with ModelCheckpoint(directory=tmp_path, config=config) as second:
        assert second.prefix == "CKP_2"
        run_steps(second, params(batch_num=100), range(1, 5))
    assert ckpt_files(tmp_path) == [
        "CKP-9_9.ckpt", "CKP_1-1_3.ckpt", "CKP_1-1_4.ckpt", "CKP_2-1_3.ckpt", "CKP_2-1_4.ckpt"
    ]
    with open(tmp_path / "asyncckpt-index.json") as f:
        series = [e["series"] for e in json.load(f)["entries"]]
    assert series == ["CKP_1", "CKP_1", "CKP_2", "CKP_2"]


def test_a_folder_held_by_another_writer_fails_at_the_save(tmp_path):
    with asyncckpt.Checkpointer(tmp_path):
        cb = ModelCheckpoint(directory=tmp_path)
        with pytest.raises(CheckpointError, match="already open by another writer"):
            run_steps(cb, params(), [1])


# -- what is saved ------------------------------------------------------------------------------
def test_append_info_values_are_saved_with_offsets(tmp_path):
    config = CheckpointConfig(
        save_checkpoint_steps=5,
        append_info=["epoch_num", "step_num", {"epoch_num": 10, "lr": 0.01, "flag": True}],
    )
    net = torch.nn.Linear(3, 2)
    optim = torch.optim.SGD(net.parameters(), lr=0.01)
    with ModelCheckpoint(directory=tmp_path, config=config) as cb:
        run_steps(cb, params(net, optimizer=optim, batch_num=4), range(1, 6))
        latest = cb.latest_ckpt_file_name
    state = load_checkpoint(latest)
    assert latest.endswith("CKP-2_1.ckpt")
    assert set(state) == {"network", "optimizer", "epoch_num", "step_num", "lr", "flag"}
    values = (state["epoch_num"], state["step_num"], state["lr"], state["flag"])
    assert values == (12, 5, 0.01, True)  # epoch 10 + 2, step 0 + 5
    assert torch.equal(state["network"]["weight"], net.weight.detach())
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.01
    plain = torch.load(latest, weights_only=True)  # a plain torch.save file without enc_key
    assert plain["step_num"] == 5


def test_saved_network_replaces_the_train_network(tmp_path):
    backbone = torch.nn.Linear(2, 3)
    config = CheckpointConfig(saved_network=backbone)
    with ModelCheckpoint(directory=tmp_path, config=config) as cb:
        p = params(torch.nn.Sequential(backbone, torch.nn.ReLU()),
                   optimizer=torch.optim.SGD(backbone.parameters(), lr=0.1))
        run_steps(cb, p, [1])
    state = load_checkpoint(cb.latest_ckpt_file_name)
    assert set(state) == {"network"} and set(state["network"]) == {"weight", "bias"}


# -- async_save -------------------------------------------------------------------------------
def test_async_save_true_returns_before_the_commit(tmp_path):
    storage = WrappedStorage(LocalStorage(tmp_path))
    storage.gate = threading.Event()  # the writer waits here until the test opens it
    config = CheckpointConfig(save_checkpoint_steps=1, async_save=True)
    try:
        with ModelCheckpoint(directory=storage, config=config) as cb:
            run_steps(cb, params(), [1])  # returns although the write cannot finish yet
            assert storage.entered.wait(30)
            assert not (tmp_path / "CKP-1_1.ckpt").exists()
            assert cb.latest_ckpt_file_name == str(tmp_path / "CKP-1_1.ckpt")
            storage.gate.set()
    finally:
        storage.gate.set()
    assert listed(tmp_path) == ["CKP-1_1.ckpt"]


def test_async_save_false_returns_after_the_commit(tmp_path):
    storage = WrappedStorage(LocalStorage(tmp_path))
    storage.gate = threading.Event()
    returned = threading.Event()
    seen_at_release: list[bool] = []

    def release() -> None:
        storage.entered.wait(30)  # the write is held at the gate
        seen_at_release.append(returned.is_set())
        storage.gate.set()

    releaser = threading.Thread(target=release)
    releaser.start()
    config = CheckpointConfig(save_checkpoint_steps=1, async_save=False)
    try:
        with ModelCheckpoint(directory=storage, config=config) as cb:
            run_steps(cb, params(), [1])
            returned.set()
            assert listed(tmp_path) == ["CKP-1_1.ckpt"]  # committed before step_end returned
    finally:
        storage.gate.set()
        releaser.join()
    assert seen_at_release == [False]


@pytest.mark.parametrize("async_save", [False, True])
def test_a_failed_save_is_raised_once_and_saving_goes_on(tmp_path, async_save):
    storage = WrappedStorage(LocalStorage(tmp_path))
    storage.fail_write = lambda name, attempt: (
        OSError(5, "injected") if name == "CKP-1_1.ckpt" else None
    )
    config = CheckpointConfig(save_checkpoint_steps=1, async_save=async_save)
    cb = ModelCheckpoint(directory=storage, config=config)
    p = params()
    with pytest.raises(WriterError, match="injected"):
        run_steps(cb, p, [1])  # async_save=False: raised by this step_end
        cb.close()  # async_save=True: by a later step_end or, at the latest, here
    run_steps(cb, p, [3])
    cb.end(RunContext(p))  # the failure was reported once, and not again
    assert listed(tmp_path) == ["CKP-1_3.ckpt"]


# -- encryption (test_serialize.py cases) -------------------------------------------------------
@pytest.mark.parametrize("mode", ["AES-GCM", "AES-CBC"])
def test_encrypted_checkpoints_round_trip_and_refuse_bad_keys(tmp_path, mode):
    net = torch.nn.Linear(4, 4)
    config = CheckpointConfig(save_checkpoint_steps=1, enc_key=KEY, enc_mode=mode,
                              append_info=["step_num"])
    with ModelCheckpoint(directory=tmp_path, config=config) as cb:
        run_steps(cb, params(net), [1, 2])
    path = cb.latest_ckpt_file_name
    with open(path, "rb") as f:
        assert f.read(8) == b"ACKPTENC"
    state = load_checkpoint(path, dec_key=KEY, dec_mode=mode)
    assert state["step_num"] == 2 and torch.equal(state["network"]["weight"], net.weight.detach())
    other = "AES-CBC" if mode == "AES-GCM" else "AES-GCM"
    with pytest.raises(DecryptionError, match="wrong dec_key"):
        load_checkpoint(path, dec_key=bytes(16), dec_mode=mode)
    with pytest.raises(DecryptionError, match=f"dec_mode='{other}'"):
        load_checkpoint(path, dec_key=KEY, dec_mode=other)
    with pytest.raises(DecryptionError, match="encrypted"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="16, 24 or 32 bytes"):
        load_checkpoint(path, dec_key=KEY[:10])
    with open(tmp_path / "asyncckpt-index.json") as f:
        assert {e["encryption"] for e in json.load(f)["entries"]} == {mode}
