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

from mmengine.config import Config  # noqa: E402
from mmengine.hooks import CheckpointHook, Hook  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from support.helpers import WrappedStorage  # noqa: E402
from support.mm_support import (  # noqa: E402
    build_runner,
    canon,
    captured_logs,
    checkpoint_files,
    checkpoint_lines,
    cleanup_mmengine,
    comparable,
    published_file,
)

import asyncckpt  # noqa: E402
from asyncckpt import WriterError  # noqa: E402
from asyncckpt.adapters.mmengine import AsyncCheckpointHook  # noqa: E402

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
        self._writer.storage = WrappedStorage(self._writer.storage)
        self._configure(self._writer.storage)


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
    hook._writer._pointer.wait()  # the pointer's worker thread makes its last move
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
