"""SIGKILL one rank at random points of saves through ``asyncckpt.Checkpointer``: the folder
never lists a partial step, every listed step loads bit-exact, survivors get a WriterError."""

from __future__ import annotations

import os
import random
import time

import pytest
import torch
from support import dist_front as df
from support import dist_support as ds

import asyncckpt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torch")

KILL_TIMEOUT = 10.0  # dist_timeout of the ranks: a survivor that waits longer fails the test
RESUMED_STEP = 10_000


def _kill_once(parent: str, rng: random.Random, world: int) -> None:
    ranks = ds.Ranks(world, df.scenario_save_forever, parent, KILL_TIMEOUT)
    # the instant: after a random number of commits (the first says the ranks are up), then a
    # random fraction of a save
    for _ in range(rng.randint(1, 2 * world + 2)):
        ranks.next_event()
    victim = rng.randrange(world)
    time.sleep(rng.uniform(0, 0.05))  # picks the instant; nothing waits on it
    ranks.kill(victim)
    started = time.monotonic()
    survivors = ranks.wait([r for r in range(world) if r != victim])
    waited = time.monotonic() - started
    for rank, outcome in survivors.items():
        assert isinstance(outcome, str), (rank, outcome)  # returned, did not raise or hang
        assert outcome.startswith(("WriterError(CheckpointGroupError)",
                                   "WriterError(DistributedSaveError)")), outcome
    # every survivor returned; ranks.wait bounds this by its join timeout, the dist timeout
    # bounds each collective: both together bound it here
    assert waited < ds.JOIN_TIMEOUT


def _check_folder(parent: str) -> int:
    """Every listed step is complete and loads bit-exact; return how many are listed."""
    listed = asyncckpt.checkpoints(parent)
    report = asyncckpt.verify(parent)
    assert report.ok, report.problems
    for info in listed:
        full = asyncckpt.load(parent, which=info.step)
        if info.step == RESUMED_STEP:  # saved by the restart (scenario_reopen)
            expected = ds.plain_state(info.step)
        else:
            expected = ds.plain_state(info.step, ds.KILL_KEYS, ds.KILL_ROWS)
        assert full["n"] == info.step
        assert sorted(full) == sorted(expected)
        for key in sorted(k for k in expected if k != "n"):
            assert torch.equal(full[key], expected[key]), (info.name, key)
    return len(listed)


def _kill_loop(tmp_path, runs: int, seed: int) -> None:
    rng = random.Random(seed)
    listed = 0
    for i in range(runs):
        parent = str(tmp_path / f"run{i}")
        _kill_once(parent, rng, world=rng.choice([2, 3]))
        listed += _check_folder(parent)
        if i % 2:  # a restart resumes the folder and saves again (leftovers are cleaned)
            ds.run(2, df.scenario_reopen, parent, RESUMED_STEP, {"keep_last": 3})
            assert _check_folder(parent) >= 1
            leftovers = [n for n in os.listdir(parent) if n.startswith(".asyncckpt-tmp.")]
            assert leftovers == []
    assert listed >= runs  # every run committed something before its kill


def test_sigkill_of_a_rank_during_front_door_saves(tmp_path):
    _kill_loop(tmp_path, runs=20, seed=4321)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sigkill_loop_long(tmp_path):
    _kill_loop(tmp_path, runs=200, seed=int.from_bytes(os.urandom(4), "little"))
