"""Crash-consistency harness: kill a checkpointing process at random moments, check the folder.

A child process resumes from the folder's latest checkpoint and saves every step, each state
derived deterministically from its step so the parent can recompute it. The parent waits for the
child's first commit (reported on its stdout), lets it run for a random time, SIGKILLs it and
checks what a crash may leave behind:

* the index parses; every checkpoint it lists exists, verifies against its checksum, loads with
  plain ``torch.load(weights_only=True)`` and holds exactly the state of its step;
* ``latest`` is the newest listed; best pointers name listed checkpoints; retention holds;
* a new writer opened on the folder removes temporary leftovers and continues rotation.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

import asyncckpt
from asyncckpt._index import IndexState
from asyncckpt._naming import INDEX_NAME

KEEP_LAST = 3
ROWS, COLS = 512, 1024  # 2 MiB per state: big enough that kills land mid-write

CHILD = textwrap.dedent(
    """
    import sys
    import asyncckpt
    from asyncckpt.events import Committed
    sys.path.insert(0, sys.argv[2])
    from crash_harness import OPTIONS, expected_state, score

    def report(event):
        if isinstance(event, Committed):
            print(event.info.step, flush=True)

    folder = sys.argv[1]
    with asyncckpt.Checkpointer(folder, observers=[report], **OPTIONS) as ckpt:
        latest = ckpt.latest()
        step = 0 if latest is None else latest.step
        while True:
            step += 1
            ckpt.save(expected_state(step), step=step, metrics={"score": score(step)})
    """
)

OPTIONS: Mapping[str, Any] = {"keep_last": KEEP_LAST, "best": {"score": "greater"}}


def expected_state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(ROWS, COLS, generator=g),
        "b": torch.arange(step, step + 16),
        "step": step,
    }


def score(step: int) -> float:
    return ((step * 7919) % 101) / 100.0


@dataclass
class KillReport:
    commits_seen: int
    alive_for: float


def run_and_kill(folder: str, rng: random.Random, max_delay: float = 0.3) -> KillReport:
    """Start a child on ``folder``, wait for its first commit, kill it at a random moment."""
    here = os.path.dirname(os.path.abspath(__file__))
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, folder, here],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as child:
        assert child.stdout is not None
        commits = 0
        try:
            if child.stdout.readline().strip():  # the writer is up and committing
                commits = 1
            start = time.monotonic()
            deadline = start + rng.uniform(0.0, max_delay)
            while (left := deadline - time.monotonic()) > 0:  # the random kill moment
                ready, _, _ = select.select([child.stdout], [], [], left)
                if ready and child.stdout.readline():
                    commits += 1
        finally:
            os.kill(child.pid, signal.SIGKILL)
        return KillReport(commits, time.monotonic() - start)


def check_folder(folder: str) -> list[asyncckpt.CheckpointInfo]:
    """Assert every crash-consistency property of ``folder``; return its listing."""
    listing = asyncckpt.checkpoints(folder)  # the index parses
    assert listing, "the child committed before it was killed, so something must be listed"
    steps = [c.step for c in listing]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    for info in listing:
        loaded = asyncckpt.load(folder, info.step)  # exists and verifies its checksum
        plain = torch.load(info.uri, weights_only=True)
        want = expected_state(info.step)
        for state in (loaded, plain):
            assert state["step"] == info.step
            assert torch.equal(state["w"], want["w"]) and torch.equal(state["b"], want["b"])
    with open(os.path.join(folder, INDEX_NAME), "rb") as f:
        parsed = IndexState.from_json(f.read(), folder)
    assert parsed.latest is not None and parsed.latest.name == listing[-1].name
    best_names = {r.name for r in parsed.best.values()}
    assert best_names <= {c.name for c in listing}
    assert len([c for c in listing if c.name not in best_names]) <= KEEP_LAST
    return listing


def reopen_and_continue(folder: str) -> None:
    """A new writer cleans leftovers and continues rotation where the crashed one stopped."""
    with asyncckpt.Checkpointer(folder, **OPTIONS) as ckpt:
        leftovers = [n for n in os.listdir(folder) if n.startswith(".asyncckpt-tmp.")]
        assert not leftovers, f"temporary files survived a writer's open: {leftovers}"
        latest = ckpt.latest()
        assert latest is not None
        step = latest.step + 1
        ckpt.save(expected_state(step), step=step, metrics={"score": score(step)})
    listing = check_folder(folder)
    assert listing[-1].step == step
