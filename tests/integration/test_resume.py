"""Resume: reopening a folder continues it, after a clean exit or a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from support.helpers import folder_files

import asyncckpt
from asyncckpt import Checkpointer, CorruptIndexError


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 64, generator=g), "step": step}


def test_best_and_latest_survive_a_restart(tmp_path):
    with Checkpointer(tmp_path, keep_last=1, best={"acc": "greater"}) as ckpt:
        ckpt.save(state(1), step=1, metrics={"acc": 0.9})
        ckpt.save(state(2), step=2, metrics={"acc": 0.1})
    with Checkpointer(tmp_path, keep_last=1, best={"acc": "greater"}) as ckpt:
        assert ckpt.latest().step == 2 and ckpt.best("acc").step == 1
        ckpt.save(state(3), step=3, metrics={"acc": 0.5})  # not better than 0.9
        ckpt.flush()
        assert [c.step for c in ckpt.checkpoints()] == [1, 3]
        ckpt.save(state(4), step=4, metrics={"acc": 0.95})
    assert [c.step for c in asyncckpt.checkpoints(tmp_path)] == [4]
    assert torch.equal(asyncckpt.load(tmp_path, "best:acc")["w"], state(4)["w"])


def test_a_best_metric_added_on_resume_counts_the_listed_checkpoints(tmp_path):
    """Tracking best 'acc' from a restart on: a listed checkpoint with a better recorded acc
    is the best, and rotation keeps it."""
    with Checkpointer(tmp_path, keep_last=3) as ckpt:  # acc recorded, not tracked
        for step, acc in [(1, 0.2), (2, 0.9), (3, 0.3)]:
            ckpt.save(state(step), step=step, metrics={"acc": acc})
    with Checkpointer(tmp_path, keep_last=3, best={"acc": "greater"}) as ckpt:
        assert ckpt.best("acc").step == 2
        for step in (4, 5, 6):
            ckpt.save(state(step), step=step, metrics={"acc": 0.5})
    assert [c.step for c in asyncckpt.checkpoints(tmp_path)] == [2, 4, 5, 6]
    assert torch.equal(asyncckpt.load(tmp_path, "best:acc")["w"], state(2)["w"])


def test_dropping_a_best_metric_releases_its_checkpoint(tmp_path):
    with Checkpointer(tmp_path, keep_last=1, best=["acc"]) as ckpt:
        ckpt.save(state(1), step=1, metrics={"acc": 0.9})
        ckpt.save(state(2), step=2, metrics={"acc": 0.1})
    with pytest.warns(asyncckpt.UntrackedBestWarning, match="'acc'.*ordinary rotation"):
        ckpt = Checkpointer(tmp_path, keep_last=1)  # acc no longer tracked
    with ckpt:
        ckpt.save(state(3), step=3)
    assert [c.step for c in asyncckpt.checkpoints(tmp_path)] == [3]


def test_a_flipped_rule_is_a_conflict(tmp_path):
    with Checkpointer(tmp_path, best={"score": "greater"}) as ckpt:
        ckpt.save(state(1), step=1, metrics={"score": 1.0})
    with pytest.raises(ValueError, match="tracks best 'score' as 'greater'"):
        Checkpointer(tmp_path, best={"score": "less"})
    assert [c.step for c in asyncckpt.checkpoints(tmp_path)] == [1]  # untouched


def test_leftovers_of_a_crashed_writer_are_cleaned_on_open(tmp_path):
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        for step in (1, 2):
            ckpt.save(state(step), step=step)
    # What a crash leaves: a half-written temporary file, and a file the index already dropped
    # (listed as a pending deletion) but that was not deleted yet.
    (tmp_path / ".asyncckpt-tmp.0123456789abcdef").write_bytes(b"half a checkpoint")
    (tmp_path / "step_0.pt").write_bytes(b"rotated out")
    index_path = tmp_path / "asyncckpt-index.json"
    index = json.loads(index_path.read_text())
    index["rotation"]["pending_deletes"] = ["step_0.pt"]
    index_path.write_text(json.dumps(index))
    (tmp_path / "notes.txt").write_text("a file asyncckpt never wrote")
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        assert folder_files(tmp_path) == {"step_1.pt", "step_2.pt", "notes.txt"}
        ckpt.save(state(3), step=3)
    assert folder_files(tmp_path) == {"step_2.pt", "step_3.pt", "notes.txt"}
    assert json.loads(index_path.read_text())["rotation"]["pending_deletes"] == []


def test_failed_deletions_are_retried_and_reported(wrapped, ckpt_dir):
    from asyncckpt.events import DeleteFailed

    failed: list[str] = []
    wrapped.fail_delete = lambda name: PermissionError(13, "busy") if name == "step_1.pt" else None
    observer = [lambda e: failed.append(e.name) if isinstance(e, DeleteFailed) else None]
    with Checkpointer(wrapped, keep_last=1, observers=observer) as ckpt:
        ckpt.save(state(1), step=1)
        ckpt.save(state(2), step=2)
        ckpt.flush()
        assert [c.step for c in ckpt.checkpoints()] == [2]  # dropped from the index anyway
        assert failed == ["step_1.pt"] and ckpt.stats.delete_failures == 1
        assert "step_1.pt" in folder_files(ckpt_dir)
        wrapped.fail_delete = None
        ckpt.save(state(3), step=3)  # the next rotation retries it
    assert folder_files(ckpt_dir) == {"step_3.pt"}


def test_corrupt_index_is_refused_not_overwritten(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(state(1), step=1)
    index_path = tmp_path / "asyncckpt-index.json"
    index_path.write_text('{"format": "asyncckpt.index", "version": 1, "entries": [')
    with pytest.raises(CorruptIndexError, match="not a JSON document"):
        Checkpointer(tmp_path)
    with pytest.raises(CorruptIndexError):
        asyncckpt.load(tmp_path)
    with pytest.raises(CorruptIndexError):
        asyncckpt.checkpoints(tmp_path)
    assert index_path.read_text().endswith("[")  # nothing was overwritten
    assert (tmp_path / "step_1.pt").exists()


CHILD = textwrap.dedent(
    """
    import sys, torch, asyncckpt
    from asyncckpt.events import Committed

    def on_event(event):
        if isinstance(event, Committed):
            print(event.info.step, flush=True)

    with asyncckpt.Checkpointer(sys.argv[1], keep_last=3, best={"score": "greater"},
                                observers=[on_event]) as ckpt:
        step = 0
        while True:
            step += 1
            g = torch.Generator().manual_seed(step)
            state = {"w": torch.randn(256, 1024, generator=g), "step": step}
            ckpt.save(state, step=step, metrics={"score": float(step % 7)})
    """
)


@pytest.mark.parametrize("commits_before_kill", [1, 4])
def test_resume_after_sigkill(tmp_path, commits_before_kill):
    """A writer killed mid-flight leaves a folder that loads, verifies and can be continued."""
    folder = tmp_path / "run"
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(folder)], stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            for _ in range(commits_before_kill):  # synchronise on the child's commit reports
                assert child.stdout is not None and child.stdout.readline().strip()
        finally:
            os.kill(child.pid, signal.SIGKILL)
    listing = asyncckpt.checkpoints(folder)
    assert listing and len(listing) <= 4
    for info in listing:  # everything listed is complete, verifies, and holds that step's state
        loaded = asyncckpt.load(folder, info.step)
        g = torch.Generator().manual_seed(info.step)
        assert torch.equal(loaded["w"], torch.randn(256, 1024, generator=g))
        assert loaded["step"] == info.step
        assert torch.load(info.uri, weights_only=True)["step"] == info.step
    latest = listing[-1].step
    with Checkpointer(folder, keep_last=3, best={"score": "greater"}) as ckpt:
        assert not [n for n in os.listdir(folder) if n.startswith(".asyncckpt-tmp.")]
        assert ckpt.latest().step == latest
        ckpt.save(state(latest + 1), step=latest + 1, metrics={"score": -1.0})
    after = asyncckpt.checkpoints(folder)
    assert after[-1].step == latest + 1
    assert len([c for c in after if c.step != asyncckpt.load(folder, "best:score")["step"]]) <= 3
