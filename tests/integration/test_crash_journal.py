"""SIGKILL while the index journal is written or compacted: old or new state, never a mix.

A child process saves with a tiny journal threshold, so every few commits write a new base
document (a compaction). Its storage kills the process itself at an exact moment of a chosen
kind of write: a journal record or a compaction's base, just before the rename that publishes
it, or just after (the stale records of a compaction not yet deleted). The parent then checks
what every reader sees, and that a new writer resumes and cleans up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import asyncckpt
from asyncckpt._format import journal
from asyncckpt._format.naming import INDEX_NAME, TMP_PREFIX

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    import asyncckpt
    from asyncckpt._format import journal
    from asyncckpt._format.naming import INDEX_NAME
    from asyncckpt.events import Committed
    from asyncckpt.storage import LocalStorage

    journal.JOURNAL_FROM, journal.COMPACT_MIN, journal.COMPACT_PER_ENTRIES = 4, 3, 10**6
    folder, kind, moment, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    class Dying(LocalStorage):
        seen = 0

        def _publish(self, tmp, final):
            name = os.path.basename(final)
            records = [n for n in os.listdir(self.path) if journal.record_generation(n)]
            target = (name == INDEX_NAME and records) if kind == "compaction" else (
                journal.record_generation(name) is not None)
            if target:
                self.seen += 1
            if target and self.seen == nth and moment == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            super()._publish(tmp, final)
            if target and self.seen == nth and moment == "after":
                os.kill(os.getpid(), signal.SIGKILL)

    def report(event):
        if isinstance(event, Committed):
            print(event.info.step, flush=True)

    storage = Dying(folder, fsync=False)
    with asyncckpt.Checkpointer(storage, keep_last=3, keep_period=2, best={"acc": "greater"},
                                observers=[report]) as ckpt:
        latest = ckpt.latest()
        step = 0 if latest is None else latest.step + 1
        for step in range(step, step + 40):
            ckpt.save({"w": torch.full((4,), step)}, step=step, metrics={"acc": step % 7}).wait()
    sys.exit(3)  # the kill never came
    """
)


def run_child(folder: str, kind: str, moment: str, nth: int) -> list[int]:
    """Run the child until it kills itself; return the steps it reported committed."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, folder, kind, moment, str(nth)],
        capture_output=True, text=True, timeout=120, cwd=here,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == -9, f"the child was not killed: {proc.returncode} {proc.stderr}"
    return [int(line) for line in proc.stdout.split()]


def check(folder: str, reported: list[int]) -> None:
    listing = asyncckpt.checkpoints(folder)
    # (a child may die at its first index write -- the record of the name it is about to
    # write -- before it reports a commit)
    assert listing and (not reported or listing[-1].step >= reported[-1])
    report = asyncckpt.verify(folder)
    assert report.ok, report.problems
    for info in listing:
        assert torch.equal(asyncckpt.load(folder, info.step)["w"], torch.full((4,), info.step))
    latest = listing[-1].step
    best = asyncckpt.load(folder, "best:acc")["w"][0].item()
    assert best % 7 == max(s % 7 for s in range(latest + 1))


@pytest.mark.parametrize("moment", ["before", "after"])
@pytest.mark.parametrize("kind", ["compaction", "record"])
def test_sigkill_around_an_index_write_leaves_the_old_or_the_new_state(tmp_path, kind, moment):
    folder = str(tmp_path / "run")
    for nth in (1, 2, 3):  # three crashes in a row, each resumed by the next child
        reported = run_child(folder, kind, moment, nth)
        check(folder, reported)
        names = os.listdir(folder)
        base = json.loads((tmp_path / "run" / INDEX_NAME).read_bytes())
        stale = [n for n in names if (g := journal.record_generation(n)) is not None
                 and (base["version"] == 1 or g <= base["generation"])]
        if kind == "compaction" and moment == "after":
            assert stale, "killed after the new base, before its stale records were deleted"
    # A writer opened on the folder removes the leftovers and goes on from the latest.
    latest = asyncckpt.checkpoints(folder)[-1].step
    with asyncckpt.Checkpointer(folder, keep_last=3, keep_period=2, best={"acc": "greater"},
                                storage_options={"fsync": False}) as ckpt:
        ckpt.save({"w": torch.full((4,), latest + 1)}, step=latest + 1,
                  metrics={"acc": (latest + 1) % 7}).wait()
    check(folder, [latest + 1])
    names = os.listdir(folder)
    base = json.loads((tmp_path / "run" / INDEX_NAME).read_bytes())
    assert not [n for n in names if n.startswith(TMP_PREFIX)]
    assert not [n for n in names if (g := journal.record_generation(n)) is not None
                and (base["version"] == 1 or g <= base["generation"])]
