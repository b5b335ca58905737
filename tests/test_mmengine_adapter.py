"""AsyncCheckpointHook with the real mmengine Runner, side by side with mmengine's CheckpointHook.

The differential tests train the same model twice, once with each hook, and compare what the two
runs leave behind: checkpoint files, ``last_checkpoint``, every checkpoint's content (tensors,
meta, message hub), the runners' message hubs and the checkpoint log lines. mmengine's own hook
needs ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` to read its checkpoints back under torch >= 2.6
(resume, published_keys); it is set for the mmengine runs only, and removed for ours.
"""

from __future__ import annotations

import errno
import os
import os.path as osp
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

pytest.importorskip("mmengine")

from helpers import WrappedStorage  # noqa: E402
from mm_support import (  # noqa: E402
    build_runner,
    canon,
    captured_logs,
    checkpoint_files,
    checkpoint_lines,
    cleanup_mmengine,
    comparable,
    published_file,
)
from mmengine.config import Config  # noqa: E402
from mmengine.hooks import CheckpointHook, Hook  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import asyncckpt  # noqa: E402
from asyncckpt import WriterError  # noqa: E402
from asyncckpt.adapters import _mmengine_hook  # noqa: E402
from asyncckpt.adapters.mmengine import AsyncCheckpointHook  # noqa: E402
from asyncckpt.storage import LocalStorage  # noqa: E402

ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
OUT = "<out_dir>"  # in a case's hook arguments: a fresh out_dir per run
ignore_env_warning = pytest.mark.filterwarnings(
    f"ignore:Environment variable {ENV} detected:UserWarning"
)


@pytest.fixture(autouse=True)
def _mmengine_singletons():
    yield
    cleanup_mmengine()


@dataclass
class Outcome:
    runner: Runner
    root: str
    folder: str
    logs: list[str]

    @property
    def replace(self) -> dict[str, str]:
        return {self.root: "<ROOT>", self.runner.experiment_name: "<EXP>"}


def checkpoint_hook(runner: Runner) -> Any:
    return next(h for h in runner.hooks if isinstance(h, (CheckpointHook, AsyncCheckpointHook)))


def train(
    root, kind: str, hook_args: dict[str, Any], monkeypatch, *, unsafe_load: bool | None = None,
    **setup: Any,
) -> Outcome:
    """Train with ``kind`` ('CheckpointHook' or 'AsyncCheckpointHook') under ``root``.

    ``unsafe_load`` sets the env var that makes torch.load unpickle anything; by default only for
    mmengine's own hook (see the module docstring).
    """
    args = dict(hook_args)
    if args.get("out_dir") == OUT:
        args["out_dir"] = str(root / "out")
    if unsafe_load is None:
        unsafe_load = kind == "CheckpointHook"
    with monkeypatch.context() as m:
        if unsafe_load:
            m.setenv(ENV, "1")
        else:
            m.delenv(ENV, raising=False)
        runner = build_runner(root / "exp", dict(type=kind, **args), name=kind, **setup)
        with captured_logs(runner.logger) as logs:
            runner.train()
    return Outcome(runner, str(root), checkpoint_hook(runner).out_dir, logs)


def load_both(ref: Outcome, ours: Outcome, name: str) -> tuple[Any, Any]:
    """mmengine's file (which needs weights_only=False) and ours (read with weights_only=True)."""
    if "<sha>" in name:
        stem = name.split("-<sha>")[0]
        ref_path, our_path = published_file(ref.folder, stem), published_file(ours.folder, stem)
    else:
        ref_path, our_path = osp.join(ref.folder, name), osp.join(ours.folder, name)
    return (torch.load(ref_path, weights_only=False), torch.load(our_path, weights_only=True))


def assert_same_results(ref: Outcome, ours: Outcome) -> None:
    files = checkpoint_files(ref.folder)
    assert files, "the reference run saved nothing; the case tests nothing"
    assert checkpoint_files(ours.folder) == files
    leftovers = [n for n in os.listdir(ours.folder) if n.startswith(".") and "tmp" in n]
    assert leftovers == []

    def pointer(outcome: Outcome) -> str | None:
        path = osp.join(outcome.runner.work_dir, "last_checkpoint")
        if not osp.exists(path):
            return None
        with open(path) as f:
            return f.read().replace(outcome.root, "<ROOT>")

    assert pointer(ours) == pointer(ref)

    for name in sorted(files):
        ref_ckpt, our_ckpt = load_both(ref, ours, name)
        assert comparable(our_ckpt, ours.replace) == comparable(ref_ckpt, ref.replace), name

    def hub(outcome: Outcome) -> Any:
        info = outcome.runner.message_hub.runtime_info
        keys = ("keep_ckpt_ids", "last_ckpt")
        picked = {k: v for k, v in info.items() if k in keys or k.startswith("best_")}
        return canon(picked, outcome.replace)

    assert hub(ours) == hub(ref)
    assert checkpoint_lines(ours.logs, ours.replace) == checkpoint_lines(ref.logs, ref.replace)


CASES = [
    pytest.param(dict(length=4), dict(interval=1), id="epoch-defaults"),
    pytest.param(
        dict(length=6, scheduler=True),
        dict(interval=2, max_keep_ckpts=2, save_best="auto"),
        id="epoch-keep2-auto",
    ),
    pytest.param(
        dict(length=6),
        dict(interval=1, max_keep_ckpts=1, save_best=["test/acc", "test/mIoU"]),
        id="epoch-keep1-multi",
    ),
    pytest.param(
        dict(length=6),
        dict(interval=3, save_begin=2, save_best="test/err", rule="less",
             filename_tmpl="ckpt_{:03d}.pth"),
        id="epoch-rule-tmpl-begin",
    ),
    pytest.param(
        dict(length=4),
        dict(interval=2, save_best="test/acc", published_keys=["meta", "state_dict"]),
        id="epoch-published",
    ),
    pytest.param(
        dict(length=5), dict(interval=2, save_last=False, save_optimizer=False),
        id="epoch-nolast-noopt",
    ),
    pytest.param(
        dict(by_epoch=False, length=12, val_interval=3),
        dict(by_epoch=False, interval=2, max_keep_ckpts=3, save_best="test/acc"),
        id="iter-keep3-best",
    ),
    pytest.param(
        dict(by_epoch=False, length=12, val_interval=4, scheduler=True),
        dict(by_epoch=False, interval=5, save_begin=3, save_best=["test/acc", "test/err"],
             rule=["greater", "less"], out_dir=OUT, save_param_scheduler=False),
        id="iter-multi-rules-outdir",
    ),
    pytest.param(
        dict(by_epoch=False, length=8, val_interval=2),
        dict(by_epoch=False, interval=3, save_best="auto", published_keys="state_dict"),
        id="iter-auto-published",
    ),
]


@ignore_env_warning
@pytest.mark.parametrize(("setup", "hook_args"), CASES)
def test_same_results_as_checkpoint_hook(tmp_path, monkeypatch, setup, hook_args):
    ref = train(tmp_path / "mm", "CheckpointHook", hook_args, monkeypatch, **setup)
    ours = train(tmp_path / "async", "AsyncCheckpointHook", hook_args, monkeypatch, **setup)
    assert_same_results(ref, ours)


@ignore_env_warning
@pytest.mark.parametrize("by_epoch", [True, False], ids=["epoch", "iter"])
def test_resume_continues_rotation_and_best(tmp_path, monkeypatch, by_epoch):
    """Stop, resume with resume=True and a smaller max_keep_ckpts: the files, the pointer and
    the message hub end up as with mmengine's own hook; ours resumes without the env var."""
    if by_epoch:
        first, second = dict(length=4), dict(length=7)
    else:
        first, second = dict(length=8, val_interval=2), dict(length=14, val_interval=2)
    phase1 = dict(by_epoch=by_epoch, interval=1, max_keep_ckpts=4, save_best="auto")
    phase2 = dict(phase1, max_keep_ckpts=2)
    results = {}
    for kind in ("CheckpointHook", "AsyncCheckpointHook"):
        root = tmp_path / kind
        train(root, kind, phase1, monkeypatch, by_epoch=by_epoch, **first)
        results[kind] = train(root, kind, phase2, monkeypatch, by_epoch=by_epoch, resume=True,
                              **second)
    ours = results["AsyncCheckpointHook"]
    assert ours.runner.iter == (7 * 3 if by_epoch else 14)
    resumed_from = "epoch_4.pth" if by_epoch else "iter_8.pth"
    assert any(line.startswith("Auto resumed") and line.endswith(f"{resumed_from}.")
               for line in ours.logs)
    assert_same_results(results["CheckpointHook"], ours)


@ignore_env_warning
def test_resume_a_run_that_checkpoint_hook_started(tmp_path, monkeypatch):
    """Switching hooks mid-experiment: rotation and best replacement also remove the files
    mmengine's hook wrote (which asyncckpt's index never listed)."""
    phase1 = dict(interval=1, max_keep_ckpts=3, save_best="test/acc")
    phase2 = dict(phase1, max_keep_ckpts=2)
    ref_root, our_root = tmp_path / "ref", tmp_path / "switch"
    train(ref_root, "CheckpointHook", phase1, monkeypatch, length=3)
    ref = train(ref_root, "CheckpointHook", phase2, monkeypatch, length=6, resume=True)
    train(our_root, "CheckpointHook", phase1, monkeypatch, length=3)
    # the checkpoint we resume from was written by mmengine's hook: it needs the unsafe load
    ours = train(our_root, "AsyncCheckpointHook", phase2, monkeypatch, unsafe_load=True,
                 length=6, resume=True)
    assert checkpoint_files(ours.folder) == checkpoint_files(ref.folder)
    hub = ours.runner.message_hub
    assert hub.get_info("keep_ckpt_ids") == ref.runner.message_hub.get_info("keep_ckpt_ids")
    assert hub.get_info("best_score") == ref.runner.message_hub.get_info("best_score")


def test_checkpoints_load_with_weights_only_but_mmengine_ones_do_not(tmp_path, monkeypatch):
    """We allowlist HistoryBuffer and numpy's array globals, never builtins.getattr."""
    args = dict(interval=1, save_best="auto")
    monkeypatch.delenv(ENV, raising=False)
    ours = build_runner(tmp_path / "a" / "exp", dict(type="AsyncCheckpointHook", **args))
    ours.train()
    ref = build_runner(tmp_path / "m" / "exp", dict(type="CheckpointHook", **args))
    ref.train()
    ckpt = torch.load(osp.join(ours.work_dir, "epoch_6.pth"), weights_only=True)
    buffers = ckpt["message_hub"]["log_scalars"]
    assert type(buffers["train/loss"]).__name__ == "HistoryBuffer"
    assert buffers["train/loss"].current() == ours.message_hub.get_scalar("train/loss").current()
    with pytest.raises(pickle.UnpicklingError, match="getattr"):
        torch.load(osp.join(ref.work_dir, "epoch_6.pth"), weights_only=True)


def test_importing_asyncckpt_does_not_import_mmengine():
    code = "import sys, asyncckpt, asyncckpt.adapters; print('mmengine' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_config_with_custom_imports_builds_the_hook(tmp_path):
    cfg = Config(dict(
        work_dir=str(tmp_path / "exp"),
        model=dict(type="mmengine.testing.runner_test_case.ToyModel"),
        custom_imports=dict(imports=["asyncckpt.adapters.mmengine"], allow_failed_imports=False),
        default_hooks=dict(checkpoint=dict(type="AsyncCheckpointHook", interval=2)),
    ))
    runner = Runner.from_cfg(cfg)
    assert type(checkpoint_hook(runner)) is AsyncCheckpointHook


# -- asynchronous behaviour --------------------------------------------------------------------
class _Recorder(Hook):
    """Runs after the checkpoint hook: records the weights each epoch's checkpoint must hold and
    lets the (held) writer go once the last checkpoint is queued."""

    priority = "LOWEST"

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def after_train_epoch(self, runner: Runner) -> None:
        epoch = runner.epoch + 1
        self.weights[epoch] = {k: v.clone() for k, v in runner.model.state_dict().items()}
        if runner.epoch + 1 == runner.max_epochs:
            self.gate.set()


class _WrappedStorageHook(AsyncCheckpointHook):
    """The real hook writing through helpers.WrappedStorage, which a test can hold or break."""

    def __init__(self, configure: Callable[[WrappedStorage], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._configure = configure

    def before_train(self, runner: Runner) -> None:
        super().before_train(runner)
        self._storage = WrappedStorage(self._storage)
        self._configure(self._storage)


def test_snapshot_is_taken_in_the_hook_call(tmp_path):
    """The writer is held until training ends; each checkpoint still holds the weights of the
    epoch that saved it, not the ones training went on to."""
    gate = threading.Event()
    hook = _WrappedStorageHook(lambda storage: setattr(storage, "gate", gate),
                               interval=1, queue_size=4)
    recorder = _Recorder(gate)
    runner = build_runner(tmp_path / "exp", hook, length=3, custom_hooks=[recorder])
    runner.train()
    for epoch in (1, 2, 3):
        saved = torch.load(osp.join(runner.work_dir, f"epoch_{epoch}.pth"), weights_only=True)
        for key, value in recorder.weights[epoch].items():
            assert torch.equal(saved["state_dict"][key], value), (epoch, key)
    assert not torch.equal(recorder.weights[1]["linear1.weight"],
                           recorder.weights[3]["linear1.weight"])


def test_writer_failure_fails_the_run_and_is_not_pointed_at(tmp_path):
    def fail_epoch_2(storage: WrappedStorage) -> None:
        storage.fail_write = lambda name, attempt: (
            OSError(errno.ENOSPC, "disk full") if name == "epoch_2.pth" else None
        )

    hook = _WrappedStorageHook(fail_epoch_2, interval=1)
    runner = build_runner(tmp_path / "exp", hook, length=2)
    with pytest.raises(WriterError, match="epoch_2.pth"):
        runner.train()
    with open(osp.join(runner.work_dir, "last_checkpoint")) as f:
        assert f.read() == osp.join(runner.work_dir, "epoch_1.pth")
    assert hook.checkpointer is None  # closed on the way out


def test_training_ends_with_everything_written_and_the_writer_closed(tmp_path):
    runner = build_runner(tmp_path / "exp", dict(type="AsyncCheckpointHook", interval=1), length=3)
    runner.train()
    hook = checkpoint_hook(runner)
    assert hook.checkpointer is None
    assert [c.name for c in asyncckpt.checkpoints(runner.work_dir)] == [
        "epoch_1.pth", "epoch_2.pth", "epoch_3.pth"
    ]
    state = asyncckpt.load(runner.work_dir, "epoch_2.pth")  # verified against the index
    assert state["meta"]["epoch"] == 2


# -- ported from mmengine's tests/test_hooks/test_checkpoint_hook.py ------------------------------
@pytest.mark.filterwarnings('ignore:"file_client_args" will be deprecated:DeprecationWarning')
@pytest.mark.parametrize(
    "args",
    [
        dict(file_client_args={"backend": "disk"}, backend_args={"backend": "local"}),
        dict(save_best=dict(acc="acc")),
        dict(interval=2, save_best=["auto", "acc"]),
        dict(interval=2, save_best=["acc", "acc"]),
        dict(save_best=["acc"], rule=1),
        dict(save_best=["acc"], rule=["greater", "loss"]),
        dict(save_best="acc", rule="bigger"),
        dict(save_best="foo"),
        dict(published_keys=1),
        dict(published_keys=["meta", "meta"]),
        dict(save_begin=-1),
        dict(greater_keys=[1]),
        dict(less_keys=("loss", None)),
    ],
)
def test_init_raises_what_checkpoint_hook_raises(args):
    with pytest.raises(Exception) as expected:
        CheckpointHook(**args)
    with pytest.raises(type(expected.value)) as got:
        AsyncCheckpointHook(**args)
    if isinstance(got.value, AssertionError):  # raised, not asserted: also the proper type
        assert isinstance(got.value, (TypeError, ValueError))


def test_init_ported():
    AsyncCheckpointHook(save_best="acc")
    AsyncCheckpointHook(save_best=["acc"])
    AsyncCheckpointHook(save_best=["acc", "mAcc"], rule="greater")
    assert AsyncCheckpointHook(greater_keys="acc").greater_keys == ("acc",)
    assert AsyncCheckpointHook(greater_keys=["acc"]).greater_keys == ["acc"]
    hook = AsyncCheckpointHook(interval=2, by_epoch=False, save_best=["acc", "mIoU"])
    assert hook.key_indicators == ["acc", "mIoU"]
    assert hook.rules == ["greater", "greater"]
    assert AsyncCheckpointHook(less_keys="loss_cls").less_keys == ("loss_cls",)
    assert AsyncCheckpointHook(less_keys=["loss_cls"]).less_keys == ["loss_cls"]
    assert AsyncCheckpointHook(interval=1, save_best="acc").best_ckpt_path is None
    assert AsyncCheckpointHook(save_best=["FID", "IS"], rule=["less", "greater"]).rules == [
        "less", "greater"
    ]
    assert AsyncCheckpointHook(by_epoch=False).filename_tmpl == "iter_{}.pth"


def test_init_deviations_from_checkpoint_hook():
    # mmengine infers 'greater' for heatmap_loss (substring 'map'); we refuse to guess
    assert CheckpointHook(save_best="heatmap_loss").rules == ["greater"]
    with pytest.raises(ValueError, match="Cannot infer the rule for key heatmap_loss"):
        AsyncCheckpointHook(save_best="heatmap_loss")
    assert AsyncCheckpointHook(save_best="heatmap_loss", rule="less").rules == ["less"]
    # arguments mmengine would only trip over at the first save
    with pytest.raises(TypeError, match="unexpected argument"):
        AsyncCheckpointHook(interval=1, sync_buffer=True)
    with pytest.raises(ValueError, match='exactly one "{}"'):
        AsyncCheckpointHook(filename_tmpl="ckpt.pth")
    with pytest.raises(ValueError, match="path separator"):
        AsyncCheckpointHook(filename_tmpl="sub/epoch_{}.pth")
    with pytest.warns(DeprecationWarning, match="file_client_args"):
        AsyncCheckpointHook(file_client_args={"backend": "disk"})


def _unit_runner(tmp_path, by_epoch: bool = True) -> Runner:
    runner = build_runner(tmp_path / "exp", dict(type="CheckpointHook"), by_epoch=by_epoch)
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    return runner


def test_before_train_ported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = _unit_runner(tmp_path)
    hook = AsyncCheckpointHook(interval=1, by_epoch=True)
    hook.before_train(runner)
    assert hook.out_dir == runner.work_dir

    hook = AsyncCheckpointHook(interval=1, by_epoch=True, out_dir="test_dir")
    hook.before_train(runner)
    hook.before_train(runner)  # mmengine would append the basename a second time
    assert hook.out_dir == osp.join("test_dir", osp.basename(runner.work_dir))
    assert not osp.exists("test_dir")  # created at the first save, not before

    hook = AsyncCheckpointHook(interval=1, save_best=["acc", "mIoU"])
    hook.before_train(runner)
    assert hook.best_ckpt_path_dict == dict(acc=None, mIoU=None)
    assert not hasattr(hook, "best_ckpt_path")
    runner.message_hub.update_info("best_ckpt_acc", "best_acc")
    hook.before_train(runner)
    assert hook.best_ckpt_path_dict == dict(acc="best_acc", mIoU=None)

    hook = AsyncCheckpointHook(interval=1, save_best="acc")
    hook.before_train(runner)
    assert hook.best_ckpt_path is None
    assert not hasattr(hook, "best_ckpt_path_dict")
    runner.message_hub.update_info("best_ckpt", "best_ckpt")
    hook.before_train(runner)
    assert hook.best_ckpt_path == "best_ckpt"


def test_before_train_passes_uris_and_backend_args_to_the_core(tmp_path, monkeypatch):
    seen = []

    def storage_for(location, *, storage_options=None):
        seen.append((location, storage_options))
        return LocalStorage(tmp_path / "stand-in")

    monkeypatch.setattr(_mmengine_hook, "storage_for", storage_for)
    runner = _unit_runner(tmp_path)
    hook = AsyncCheckpointHook(out_dir="s3://bucket/ckpts/",
                               backend_args=dict(backend="s3", anon=False))
    hook.before_train(runner)
    assert hook.out_dir == "s3://bucket/ckpts/exp"
    assert seen == [("s3://bucket/ckpts/exp", {"anon": False})]
    with pytest.raises(ValueError, match="petrel"):
        AsyncCheckpointHook(backend_args=dict(backend="petrel")).before_train(runner)


def test_after_val_epoch_ported(tmp_path):
    runner = _unit_runner(tmp_path)
    runner.train_loop._epoch = 9
    hooks = []

    def hook(**kwargs: Any) -> AsyncCheckpointHook:
        h = AsyncCheckpointHook(**kwargs)
        h.before_train(runner)
        hooks.append(h)
        return h

    with captured_logs(runner.logger) as logs:
        hook(interval=2, by_epoch=True, save_best="auto").after_val_epoch(runner, {})
    assert any("`metrics` is an empty dict" in line for line in logs)

    hook(interval=2, by_epoch=True, save_best=None).after_val_epoch(runner, {})
    assert "best_score" not in runner.message_hub.runtime_info
    assert "best_ckpt" not in runner.message_hub.runtime_info

    metrics = {"acc": 0.5, "map": 0.3}
    h = hook(interval=2, by_epoch=True, save_best="auto")
    h.after_val_epoch(runner, metrics)
    assert h.key_indicators == ["acc"] and h.rules == ["greater"]
    assert runner.message_hub.get_info("best_score") == 0.5
    assert runner.message_hub.get_info("best_ckpt") == osp.join(h.out_dir, "best_acc_epoch_9.pth")
    h.close()

    h = hook(interval=2, by_epoch=True, save_best="acc")
    metrics["acc"] = 0.8
    h.after_val_epoch(runner, metrics)
    assert runner.message_hub.get_info("best_score") == 0.8
    h.close()

    h = hook(interval=2, by_epoch=True, save_best="loss")
    metrics["loss"] = 0.8
    h.after_val_epoch(runner, metrics)
    metrics["loss"] = 0.5
    h.after_val_epoch(runner, metrics)
    assert runner.message_hub.get_info("best_score") == 0.5
    h.close()

    h = hook(interval=2, by_epoch=True, save_best="acc", rule="less")
    metrics["acc"] = 0.3
    h.after_val_epoch(runner, metrics)
    assert runner.message_hub.get_info("best_score") == 0.3
    h.close()

    h = hook(interval=2, by_epoch=True, save_best="loss", rule="greater")
    metrics["loss"] = 1.0
    h.after_val_epoch(runner, metrics)
    assert runner.message_hub.get_info("best_score") == 1.0
    h.close()

    runner.message_hub.runtime_info.clear()
    h = hook(interval=2, save_best=["acc", "mIoU"])
    h.after_val_epoch(runner, dict(acc=0.5, mIoU=0.6))
    assert runner.message_hub.get_info("best_score_acc") == 0.5
    assert runner.message_hub.get_info("best_score_mIoU") == 0.6
    assert runner.message_hub.get_info("best_ckpt_acc") == osp.join(h.out_dir,
                                                                    "best_acc_epoch_9.pth")
    assert runner.message_hub.get_info("best_ckpt_mIoU") == osp.join(h.out_dir,
                                                                     "best_mIoU_epoch_9.pth")
    h.flush()
    # one best file per metric; the earlier hooks' best files were replaced by name
    assert sorted(n for n in os.listdir(runner.work_dir) if n.startswith("best")) == [
        "best_acc_epoch_9.pth", "best_loss_epoch_9.pth", "best_mIoU_epoch_9.pth"
    ]
    for h in hooks:
        h.close()
    # after_val_epoch does not write last_checkpoint
    assert not osp.exists(osp.join(runner.work_dir, "last_checkpoint"))


def test_after_val_epoch_by_iter_keeps_one_best_file(tmp_path):
    runner = _unit_runner(tmp_path, by_epoch=False)
    runner.train_loop._iter = 9
    h = AsyncCheckpointHook(interval=2, by_epoch=False, save_best="acc", rule="greater")
    h.before_train(runner)
    h.after_val_epoch(runner, {"acc": 0.5})
    assert runner.message_hub.get_info("best_ckpt") == osp.join(h.out_dir, "best_acc_iter_9.pth")
    h.after_val_epoch(runner, {"acc": 0.666})  # same iteration: the file is replaced
    assert runner.message_hub.get_info("best_score") == 0.666
    runner.train_loop._iter = 10
    h.after_val_epoch(runner, {"acc": 0.7})
    h.close()
    best = [n for n in os.listdir(runner.work_dir) if n.startswith("best")]
    assert best == ["best_acc_iter_10.pth"]


def test_after_train_epoch_ported(tmp_path):
    runner = _unit_runner(tmp_path)
    runner.train_loop._epoch = 9
    hook = AsyncCheckpointHook(interval=2, by_epoch=True)
    hook.before_train(runner)
    hook.after_train_epoch(runner)
    expected = osp.join(runner.work_dir, "epoch_10.pth")
    assert runner.message_hub.get_info("last_ckpt") == expected
    hook.flush()
    with open(osp.join(runner.work_dir, "last_checkpoint")) as f:
        assert f.read() == expected
    runner.train_loop._epoch = 10  # 11 is not a multiple of 2
    hook.after_train_epoch(runner)
    assert runner.message_hub.get_info("last_ckpt") == expected
    hook.close()
    runner.message_hub.runtime_info.clear()

    runner.train_loop._epoch = 9
    hook = AsyncCheckpointHook(interval=2, by_epoch=False)
    hook.before_train(runner)
    hook.after_train_epoch(runner)
    assert "last_ckpt" not in runner.message_hub.runtime_info
    hook.close()


def test_after_train_iter_ported(tmp_path):
    runner = _unit_runner(tmp_path)
    runner.train_loop._iter = 9
    hook = AsyncCheckpointHook(interval=2, by_epoch=True)
    hook.before_train(runner)
    hook.after_train_iter(runner, batch_idx=9)
    assert "last_ckpt" not in runner.message_hub.runtime_info
    hook.close()

    hook = AsyncCheckpointHook(interval=2, by_epoch=False)
    hook.before_train(runner)
    hook.after_train_iter(runner, batch_idx=9)
    assert runner.message_hub.get_info("last_ckpt") == osp.join(runner.work_dir, "iter_10.pth")
    runner.train_loop._iter = 10
    hook.after_train_epoch(runner)
    assert runner.message_hub.get_info("last_ckpt") == osp.join(runner.work_dir, "iter_10.pth")
    hook.close()
    assert os.listdir(runner.work_dir).count("iter_10.pth") == 1


@pytest.mark.parametrize("kind", ["iter", "epoch"])
def test_with_runner_ported(tmp_path, kind):
    by_epoch = kind == "epoch"
    n = 0

    def run(length: int = 11, setup: dict[str, Any] | None = None, **hook_args: Any) -> Runner:
        nonlocal n
        n += 1
        args = dict(type="AsyncCheckpointHook", interval=1, by_epoch=by_epoch)
        args.update(hook_args)
        runner = build_runner(tmp_path / str(n) / "exp", args, by_epoch=by_epoch, length=length,
                              **(setup or {}))
        runner.train()
        return runner

    def exists(runner: Runner, name: str) -> bool:
        return osp.isfile(osp.join(runner.work_dir, name))

    runner = run(interval=2)
    for i in range(1, 11):
        assert exists(runner, f"{kind}_{i}.pth") == (i % 2 == 0)
    assert exists(runner, f"{kind}_11.pth")  # save_last

    runner = run()
    assert "optimizer" in torch.load(osp.join(runner.work_dir, f"{kind}_11.pth"))
    runner = run(save_optimizer=False)
    assert "optimizer" not in torch.load(osp.join(runner.work_dir, f"{kind}_11.pth"))

    runner = run(setup=dict(scheduler=True))
    assert "param_schedulers" in torch.load(osp.join(runner.work_dir, f"{kind}_11.pth"))
    runner = run(setup=dict(scheduler=True), save_param_scheduler=False)
    assert "param_schedulers" not in torch.load(osp.join(runner.work_dir, f"{kind}_11.pth"))

    out_dir = tmp_path / "out_dir"
    runner = run(out_dir=str(out_dir))
    assert osp.isfile(out_dir / "exp" / f"{kind}_11.pth")

    runner = run(max_keep_ckpts=1)
    assert exists(runner, f"{kind}_11.pth")
    assert not any(exists(runner, f"{kind}_{i}.pth") for i in range(11))

    runner = run(filename_tmpl="test_{}.pth")
    assert exists(runner, "test_11.pth")

    runner = run(save_best="test/acc")
    best = osp.join(runner.work_dir, f"best_test_acc_{kind}_5.pth")
    assert osp.isfile(best)
    ckpt = torch.load(osp.join(runner.work_dir, f"{kind}_5.pth"))
    assert ckpt["message_hub"]["runtime_info"]["best_ckpt"] == best

    runner = run(published_keys=["meta", "state_dict"])
    published = [n for n in os.listdir(runner.work_dir) if n.startswith(f"{kind}_11-")]
    assert len(published) == 1 and len(published[0]) == len(f"{kind}_11-01234567.pth")
    assert set(torch.load(osp.join(runner.work_dir, published[0]))) == {"meta", "state_dict"}

    runner = run(interval=2, save_begin=5)
    for i in range(1, 11):
        assert exists(runner, f"{kind}_{i}.pth") == (i >= 5 and (i - 5) % 2 == 0)
    assert exists(runner, f"{kind}_11.pth")

    # resume from the last checkpoint with fewer to keep; one more epoch/iteration
    runner = run(max_keep_ckpts=3)
    work = runner.work_dir
    resumed = build_runner(work, dict(type="AsyncCheckpointHook", interval=1, by_epoch=by_epoch,
                                      max_keep_ckpts=2),
                           by_epoch=by_epoch, length=12, resume=True)
    resumed.train()
    assert sorted(n for n in os.listdir(work) if n.endswith(".pth")) == [
        f"{kind}_11.pth", f"{kind}_12.pth"
    ]


class _FailValidation(Hook):
    """Raises before the ``epoch``-th validation (after that epoch's checkpoint was saved)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def before_val_epoch(self, runner: Any) -> None:
        if runner.epoch == self.epoch:
            raise RuntimeError("validation crashed")


@ignore_env_warning
def test_a_run_that_crashes_between_hook_calls_auto_resumes_from_its_newest_checkpoint(
    tmp_path, monkeypatch
):
    """last_checkpoint follows the commits, not the hook calls: a run that dies right after a
    save (here an exception in validation) still names that checkpoint, and a retry in the same
    process resumes from it (the crashed run's writer, left open, is closed for it)."""
    monkeypatch.delenv(ENV, raising=False)
    crashed = build_runner(tmp_path / "exp", dict(type="AsyncCheckpointHook", interval=1),
                           length=3, custom_hooks=[_FailValidation(epoch=2)])
    with pytest.raises(RuntimeError, match="validation crashed"):
        crashed.train()
    hook = checkpoint_hook(crashed)
    assert hook.checkpointer is not None  # mmengine calls no hook on the way out
    hook.checkpointer.flush()  # the writer's own flush: no hook code runs on this thread
    with open(osp.join(crashed.work_dir, "last_checkpoint")) as f:
        assert f.read() == osp.join(crashed.work_dir, "epoch_2.pth")

    retry = build_runner(tmp_path / "exp", dict(type="AsyncCheckpointHook", interval=1),
                         length=3, resume=True)
    with captured_logs(retry.logger) as logs:
        retry.train()
    assert any(line.startswith("Auto resumed") and line.endswith("epoch_2.pth.")
               for line in logs)
    assert hook.checkpointer is None  # closed by the retry
    assert [c.name for c in asyncckpt.checkpoints(crashed.work_dir)] == [
        "epoch_1.pth", "epoch_2.pth", "epoch_3.pth"
    ]


def test_validation_after_training_saves_a_new_best(tmp_path):
    """runner.val() after runner.train(): after_run closed the writer, and an improving metric
    saves its best file again (as CheckpointHook does) instead of failing."""
    runner = build_runner(tmp_path / "exp", dict(type="AsyncCheckpointHook", interval=1,
                                                 save_best="test/acc", rule="less"),
                          length=4)
    runner.train()  # acc per evaluation: .75, 1, .75, .5 -- the least at epoch 4
    hook = checkpoint_hook(runner)
    assert runner.message_hub.get_info("best_score") == 0.5
    runner.val()  # the 5th evaluation: .25, the least yet
    hook.close()
    assert runner.message_hub.get_info("best_score") == 0.25
    best = asyncckpt.load(runner.work_dir, "best_test_acc_epoch_4.pth")
    assert best["message_hub"]["runtime_info"]["best_score"] == 0.25


def test_evaluation_outside_training_saves_nothing(tmp_path):
    """runner.val() runs after_val_epoch without before_train; CheckpointHook would crash."""
    hook = AsyncCheckpointHook(save_best="test/acc", out_dir=str(tmp_path / "out"))
    runner = build_runner(tmp_path / "exp", hook)
    metrics = runner.val()
    assert "test/acc" in metrics
    assert "best_ckpt" not in runner.message_hub.runtime_info
    assert not osp.exists(tmp_path / "out")
