"""A kill after a checkpoint file is renamed into place and before the index lists it.

The file is complete, but no index names it. The writer records every name it is about to
write as pending deletion in the index first, so the next writer deletes such a file when it
opens -- and never a file it did not create.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import asyncckpt

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    import asyncckpt
    from asyncckpt.storage import LocalStorage

    folder, first = sys.argv[1], int(sys.argv[2])

    class Dying(LocalStorage):
        def _publish(self, tmp, final):
            super()._publish(tmp, final)
            if os.path.basename(final) == f"step_{first + 1}.pt":  # renamed, not yet listed
                os.kill(os.getpid(), signal.SIGKILL)

    with asyncckpt.Checkpointer(Dying(folder), keep_last=5) as ckpt:
        ckpt.save({"w": torch.full((4,), first)}, step=first).wait()
        ckpt.save({"w": torch.full((4,), first + 1)}, step=first + 1).wait()
    sys.exit(3)  # the kill never came
    """
)


def run_child(folder: str, first: int) -> None:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, folder, str(first)],
        capture_output=True, text=True, timeout=120, cwd=here,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == -9, f"the child was not killed: {proc.returncode} {proc.stderr}"


def test_a_file_renamed_into_place_but_never_listed_is_removed_at_open(tmp_path):
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    with open(os.path.join(folder, "notes.pt"), "wb") as f:  # not the writer's: never touched
        f.write(b"mine")
    run_child(folder, 1)
    assert os.path.exists(os.path.join(folder, "step_2.pt"))  # complete, on disk, unlisted
    assert [c.name for c in asyncckpt.checkpoints(folder)] == ["step_1.pt"]
    with asyncckpt.Checkpointer(folder, keep_last=5) as ckpt:
        assert [c.name for c in ckpt.checkpoints()] == ["step_1.pt"]
    assert sorted(os.listdir(folder)) == [
        ".asyncckpt.lock", "asyncckpt-index.json", "last_checkpoint", "notes.pt", "step_1.pt"
    ]
    assert asyncckpt.verify(folder).ok


def test_the_same_holds_over_many_kills(tmp_path):
    folder = str(tmp_path / "run")
    for first in range(1, 9, 2):
        run_child(folder, first)
        with asyncckpt.Checkpointer(folder, keep_last=5) as ckpt:
            listed = {c.name for c in ckpt.checkpoints()}
        on_disk = {n for n in os.listdir(folder) if n.startswith("step_")}
        assert on_disk == listed, on_disk - listed
    assert [c.step for c in asyncckpt.checkpoints(folder)] == [1, 3, 5, 7]
