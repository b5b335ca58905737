"""Crash consistency under SIGKILL (see crash_harness.py for what is checked after each kill)."""

from __future__ import annotations

import random

import pytest
from crash_harness import check_folder, reopen_and_continue, run_and_kill


def crash_loop(folder: str, kills: int, seed: int) -> int:
    rng = random.Random(seed)
    commits = 0
    for _ in range(kills):
        commits += run_and_kill(folder, rng).commits_seen
        check_folder(folder)
        reopen_and_continue(folder)
    return commits


def test_sigkill_at_random_moments(tmp_path):
    """20 kills in the default suite (the slow run does 200)."""
    commits = crash_loop(str(tmp_path / "run"), kills=20, seed=20261121)
    assert commits >= 20


@pytest.mark.slow
def test_sigkill_at_random_moments_long(tmp_path):
    commits = crash_loop(str(tmp_path / "run"), kills=200, seed=7)
    assert commits >= 200
