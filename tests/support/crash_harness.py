"""Crash-consistency harness: kill a checkpointing process at random moments, check what is left.

A child process resumes from the location's latest checkpoint and saves every step, each state
derived deterministically from its step so the parent can recompute it. The parent waits for the
child's first commit (reported on its stdout), lets it run for a random time, SIGKILLs it and
checks what a crash may leave behind:

* the index parses; every checkpoint it lists exists, verifies against its checksum, loads with
  plain ``torch.load(weights_only=True)`` and holds exactly the state of its step;
* ``latest`` is the newest listed; best pointers name listed checkpoints; retention holds;
* a new writer opened on the location removes in-flight leftovers (temporary files, pending
  multipart uploads) and continues rotation.

Works on a local folder or any URI (``s3://...`` with ``storage_options``).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

import asyncckpt
from asyncckpt._core.folder import CheckpointFolder
from asyncckpt._core.load import run_sync
from asyncckpt._format.index import IndexState
from asyncckpt.storage import storage_for

KEEP_LAST = 3
COLS = 1024
ROWS = 512  # 2 MiB per state by default: big enough that kills land mid-write

CHILD = textwrap.dedent(
    """
    import json, sys
    import asyncckpt
    from asyncckpt.events import Committed
    sys.path.insert(0, sys.argv[2])
    from support.crash_harness import OPTIONS, expected_state, score

    def report(event):
        if isinstance(event, Committed):
            print(event.info.step, flush=True)

    location, options, rows = sys.argv[1], json.loads(sys.argv[3]), int(sys.argv[4])
    with asyncckpt.Checkpointer(location, observers=[report], storage_options=options or None,
                                **OPTIONS) as ckpt:
        latest = ckpt.latest()
        step = 0 if latest is None else latest.step
        while True:
            step += 1
            ckpt.save(expected_state(step, rows), step=step, metrics={"score": score(step)})
    """
)

#: the file names the child's template gives (step_<n>.pt)
CHECKPOINT_NAME = re.compile(r"step_[0-9]+\.pt")
OPTIONS: Mapping[str, Any] = {"keep_last": KEEP_LAST, "best": {"score": "greater"}}


def expected_state(step: int, rows: int = ROWS) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(rows, COLS, generator=g),
        "b": torch.arange(step, step + 16),
        "step": step,
    }


def score(step: int) -> float:
    return ((step * 7919) % 101) / 100.0


@dataclass
class Target:
    """Where the child writes, and how to look for what an unfinished write leaves behind."""

    location: str
    storage_options: Mapping[str, Any] | None = None
    #: names/keys of in-flight leftovers at ``location`` right now
    leftovers: Callable[[], list[str]] | None = None
    #: names of every checkpoint-named file (``step_*.pt``) at ``location`` right now
    files: Callable[[], list[str]] | None = None
    #: rows of the 1024-column float32 tensor in each state (4 KiB a row)
    rows: int = ROWS

    @property
    def options(self) -> dict[str, Any] | None:
        return dict(self.storage_options) if self.storage_options else None


def local_target(folder: str) -> Target:
    def leftovers() -> list[str]:
        return [n for n in os.listdir(folder) if n.startswith(".asyncckpt-tmp.")]

    def files() -> list[str]:
        return [n for n in os.listdir(folder) if CHECKPOINT_NAME.fullmatch(n)]

    return Target(folder, None, leftovers, files)


@dataclass
class KillReport:
    commits_seen: int
    alive_for: float


def run_and_kill(target: Target, rng: random.Random, max_delay: float = 0.3) -> KillReport:
    """Start a child on ``target``, wait for its first commit, kill it at a random moment."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
    options = json.dumps(target.options or {})
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, target.location, here, options, str(target.rows)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as child:
        assert child.stdout is not None
        commits = 0
        start = time.monotonic()
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


def _read(target: Target, name: str) -> bytes:
    async def read() -> bytes:
        storage = storage_for(target.location, storage_options=target.options)
        await storage.open(writer=False)
        try:
            return await storage.read_bytes(name)
        finally:
            await storage.aclose()

    return run_sync(read)


def _read_index(target: Target) -> IndexState | None:
    """The index as a reader sees it (the document, and journal records if it has any)."""

    async def read() -> IndexState | None:
        storage = storage_for(target.location, storage_options=target.options)
        await storage.open(writer=False)
        try:
            return await CheckpointFolder(storage).read_index()
        finally:
            await storage.aclose()

    return run_sync(read)


def check(target: Target) -> list[asyncckpt.CheckpointInfo]:
    """Assert every crash-consistency property of ``target``; return its listing."""
    listing = asyncckpt.checkpoints(target.location, storage_options=target.options)
    assert listing, "the child committed before it was killed, so something must be listed"
    steps = [c.step for c in listing]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    for info in listing:
        loaded = asyncckpt.load(target.location, info.step, storage_options=target.options)
        plain = torch.load(io.BytesIO(_read(target, info.name)), weights_only=True)
        want = expected_state(info.step, target.rows)
        for state in (loaded, plain):
            assert state["step"] == info.step
            assert torch.equal(state["w"], want["w"]) and torch.equal(state["b"], want["b"])
    parsed = _read_index(target)
    assert parsed is not None and parsed.latest is not None
    assert parsed.latest.name == listing[-1].name
    best_names = {r.name for r in parsed.best.values()}
    assert best_names <= {c.name for c in listing}
    assert len([c for c in listing if c.name not in best_names]) <= KEEP_LAST
    return listing


def reopen_and_continue(target: Target) -> None:
    """A new writer cleans leftovers and continues rotation where the crashed one stopped."""
    with asyncckpt.Checkpointer(target.location, storage_options=target.options,
                                **OPTIONS) as ckpt:
        if target.leftovers is not None:
            left = target.leftovers()
            assert not left, f"in-flight leftovers survived a writer's open: {left}"
        if target.files is not None:  # a kill after a rename, before the commit listed it
            unlisted = set(target.files()) - {c.name for c in ckpt.checkpoints()}
            assert not unlisted, f"unlisted checkpoint files survived a writer's open: {unlisted}"
        latest = ckpt.latest()
        assert latest is not None
        step = latest.step + 1
        ckpt.save(expected_state(step, target.rows), step=step, metrics={"score": score(step)})
    listing = check(target)
    assert listing[-1].step == step


def crash_loop(target: Target, kills: int, seed: int) -> int:
    """``kills`` times: run a child, kill it, check, reopen and continue. Return commits seen."""
    rng = random.Random(seed)
    commits = 0
    for done in range(kills):
        try:
            commits += run_and_kill(target, rng).commits_seen
            check(target)
            reopen_and_continue(target)
        except BaseException as exc:  # a failure, or the test's timeout: say how far it got
            if hasattr(exc, "add_note"):
                exc.add_note(f"crash loop stopped after {done} of {kills} kills "
                             f"({commits} commits seen)")
            raise
    return commits
