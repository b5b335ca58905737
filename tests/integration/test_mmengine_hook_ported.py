"""mmengine's own CheckpointHook test scenarios, in our own words, run on AsyncCheckpointHook.

Most of mmengine's ``tests/test_hooks/test_checkpoint_hook.py`` drives the hook by hand (its
methods called directly, no ``runner.train()``); such use needs more than the training flows:
mmengine's ``file_client`` / ``file_backend`` objects, and hooks that are never closed.
Differences that follow from writing in the background: files and ``last_checkpoint`` appear
when a checkpoint is committed, so these tests ``flush()`` before looking for them.
"""

from __future__ import annotations

import gc
import logging
import os
import os.path as osp
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("mmengine")

from mmengine.fileio import FileClient, LocalBackend  # noqa: E402
from mmengine.hooks import CheckpointHook  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from support.mm_support import build_runner, captured_logs, cleanup_mmengine  # noqa: E402

import asyncckpt  # noqa: E402
from asyncckpt.adapters import _mm_writer  # noqa: E402
from asyncckpt.adapters.mmengine import AsyncCheckpointHook  # noqa: E402
from asyncckpt.storage import LocalStorage  # noqa: E402


@pytest.fixture(autouse=True)
def _mmengine_singletons():
    yield
    cleanup_mmengine()


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

    monkeypatch.setattr(_mm_writer, "storage_for", storage_for)
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


# -- mmengine's file objects -----------------------------------------------------------------------
@pytest.mark.filterwarnings('ignore:"file_client_args" will be deprecated:DeprecationWarning')
def test_file_client_and_file_backend_are_mmengines_for_the_output_folder(tmp_path):
    runner = _unit_runner(tmp_path)
    hook = AsyncCheckpointHook()
    with pytest.raises(AttributeError, match="set by before_train"):
        hook.file_backend  # noqa: B018 - CheckpointHook has none before before_train either
    hook.before_train(runner)
    assert isinstance(hook.file_client, FileClient)
    assert isinstance(hook.file_backend, LocalBackend)
    assert hook.file_backend.join_path(hook.out_dir, "x.pth") == osp.join(runner.work_dir, "x.pth")

    hook = AsyncCheckpointHook(file_client_args={"backend": "disk"})
    hook.before_train(runner)
    assert isinstance(hook.file_client, FileClient)
    assert hook.file_backend is hook.file_client  # as in CheckpointHook

    hook = AsyncCheckpointHook(backend_args={"backend": "local"})
    hook.before_train(runner)
    assert isinstance(hook.file_backend, LocalBackend)

    # the names the message hub gets are the backend's joins, as mmengine's tests expect
    runner.train_loop._epoch = 9
    hook = AsyncCheckpointHook(interval=2, save_best=["acc", "mIoU"])
    hook.before_train(runner)
    hook.after_val_epoch(runner, dict(acc=0.5, mIoU=0.6))
    for key in ("acc", "mIoU"):
        expected = hook.file_client.join_path(hook.out_dir, f"best_{key}_epoch_9.pth")
        assert runner.message_hub.get_info(f"best_ckpt_{key}") == expected
    hook.close()


def test_file_objects_for_a_uri_out_dir_say_why_there_are_none(tmp_path, monkeypatch):
    monkeypatch.setattr(_mm_writer, "storage_for",
                        lambda location, *, storage_options=None: LocalStorage(tmp_path / "x"))
    hook = AsyncCheckpointHook(out_dir="s3://bucket/ckpts", backend_args={"anon": True})
    hook.before_train(_unit_runner(tmp_path))  # training does not need them
    assert hook.out_dir == "s3://bucket/ckpts/exp"
    with pytest.raises(AttributeError, match="mmengine has no file backend for 's3://bucket/ckpts'"):
        hook.file_backend  # noqa: B018
    hook.file_backend = "mine"  # assignable, as on CheckpointHook
    assert hook.file_backend == "mine"


# -- hooks that are never closed ---------------------------------------------------------------
def test_hooks_driven_by_hand_are_closed_when_dropped(tmp_path):
    """As mmengine's tests use hooks: before_train, saves, and the hook is simply dropped (here
    by rebinding the name). Each one's writer closes when it is collected, with everything it
    had queued committed and one log line; the folder is free again afterwards."""
    runner = _unit_runner(tmp_path)
    runner.train_loop._epoch = 9
    with captured_logs(logging.getLogger("asyncckpt")) as logs:
        for metric in ("acc", "loss"):
            runner.message_hub.runtime_info.clear()
            hook = AsyncCheckpointHook(interval=2, save_best=metric)
            hook.before_train(runner)
            hook.after_val_epoch(runner, {metric: 0.5})
            hook.after_train_epoch(runner)
        del hook
        gc.collect()
    assert sorted(c.name for c in asyncckpt.checkpoints(runner.work_dir)) == [
        "best_acc_epoch_9.pth", "best_loss_epoch_9.pth", "epoch_10.pth"
    ]
    line = (f"AsyncCheckpointHook writing to {runner.work_dir} was never closed; closed it now "
            "(queued checkpoints were written)")
    assert [entry for entry in logs if "closed" in entry or "left open" in entry] == [line] * 2
    with open(osp.join(runner.work_dir, "last_checkpoint")) as f:
        assert f.read() == osp.join(runner.work_dir, "epoch_10.pth")
    with asyncckpt.Checkpointer(runner.work_dir):  # the folder's lock was released
        pass


_NEVER_CLOSED = """
import os, shutil, sys
from support.mm_support import build_runner
from asyncckpt.adapters.mmengine import AsyncCheckpointHook
work_dir, mode = sys.argv[1], sys.argv[2]
runner = build_runner(work_dir, dict(type="CheckpointHook"))
runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
hook = AsyncCheckpointHook(interval=1)
hook.before_train(runner)
runner.train_loop._epoch = 1
hook.after_train_epoch(runner)
if mode == "deleted":  # the caller removes the folder while the hook is still alive
    hook.flush()
    shutil.rmtree(work_dir)
    runner.train_loop._epoch = 2
    hook.after_train_epoch(runner)
print("script done", flush=True)
"""


@pytest.mark.parametrize("mode", ["alive", "deleted"])
def test_a_hook_alive_at_interpreter_exit_closes_with_one_line(tmp_path, mode):
    tests = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    work_dir = tmp_path / "exp"
    run = subprocess.run([sys.executable, "-c", _NEVER_CLOSED, str(work_dir), mode],
                         capture_output=True, text=True, env=env, timeout=180)
    assert run.returncode == 0, run.stderr
    assert "script done" in run.stdout
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr
    ours = [line for line in run.stderr.splitlines() if "was never closed" in line]
    assert len(ours) == 1, run.stderr
    if mode == "alive":
        assert ours[0].endswith("closed it now (queued checkpoints were written)")
        assert [c.name for c in asyncckpt.checkpoints(work_dir)] == ["epoch_2.pth"]
    else:
        assert "closing it now failed: WriterError" in ours[0] and "epoch_3.pth" in ours[0]
        assert not work_dir.exists()  # nothing was written into the removed folder
