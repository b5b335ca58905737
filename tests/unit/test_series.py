"""Several checkpoint series in one folder: retention only ever looks at the writer's own series."""

from __future__ import annotations

import json

import pytest
import torch
from support.helpers import folder_files

import asyncckpt
from asyncckpt import Checkpointer, CorruptIndexError


def tiny(step: int) -> dict:
    return {"w": torch.full((2,), float(step)), "step": step}


def test_rotation_is_per_series_and_latest_is_folder_wide(ckpt_dir):
    with Checkpointer(ckpt_dir, keep_last=2, series="A", filename="A-{step}.pt") as ckpt:
        for step in (1, 2, 3):
            ckpt.save(tiny(step), step=step)
    with Checkpointer(ckpt_dir, keep_last=1) as ckpt:  # the default series
        ckpt.save(tiny(4), step=4)
        ckpt.save(tiny(5), step=5)
    with Checkpointer(ckpt_dir, keep_last=2, series="B", filename="B-{step}.pt") as ckpt:
        for step in (6, 7, 8):
            ckpt.save(tiny(step), step=step)
    assert folder_files(ckpt_dir) == {"A-2.pt", "A-3.pt", "step_5.pt", "B-7.pt", "B-8.pt"}
    assert asyncckpt.load(ckpt_dir)["step"] == 8
    with open(ckpt_dir / "asyncckpt-index.json") as f:
        entries = json.load(f)["entries"]
    assert [(e["name"], e.get("series")) for e in entries] == [
        ("A-2.pt", "A"), ("A-3.pt", "A"), ("step_5.pt", None), ("B-7.pt", "B"), ("B-8.pt", "B")
    ]
    # Resuming series A keeps counting A's entries only.
    with Checkpointer(ckpt_dir, keep_last=2, series="A", filename="A-{step}.pt") as ckpt:
        ckpt.save(tiny(9), step=9)
    assert folder_files(ckpt_dir) == {"A-3.pt", "A-9.pt", "step_5.pt", "B-7.pt", "B-8.pt"}


def test_minute_windows_of_a_named_series_start_at_its_oldest_entry(ckpt_dir):
    now = [1000.0]
    with Checkpointer(ckpt_dir, series="old", filename="old-{step}.pt",
                      clock=lambda: now[0]) as ckpt:
        ckpt.save(tiny(0), step=0)
    now[0] = 1000.0 + 30  # a new series starting half-way through the folder's first minute
    with Checkpointer(ckpt_dir, keep_every_n_minutes=1, series="new", filename="new-{step}.pt",
                      clock=lambda: now[0]) as ckpt:
        for step in range(1, 8):  # every 20 s: windows [1030, 1090), [1090, 1150), ...
            ckpt.save(tiny(step), step=step).wait()
            now[0] += 20
    assert folder_files(ckpt_dir) == {"old-0.pt", "new-1.pt", "new-4.pt", "new-7.pt"}


@pytest.mark.parametrize("series", [None, "s"])
def test_minute_windows_do_not_move_when_the_oldest_entry_goes(ckpt_dir, series):
    """Superseding a series' oldest checkpoint must not shift its window grid (a named series
    keeps its own origin, as the default series does)."""
    now = [0.0]
    with Checkpointer(ckpt_dir, keep_last=1, keep_every_n_minutes=60, series=series,
                      clock=lambda: now[0]) as ckpt:
        for minute in (0, 70, 125, 135):  # hour windows: 0 -> step 0, 1 -> 70, 2 -> 125
            now[0] = minute * 60.0
            ckpt.save(tiny(minute), step=minute).wait()
        now[0] = 136 * 60.0
        ckpt.save(tiny(136), step=136, supersedes=["step_0.pt"]).wait()
    assert [c.step for c in asyncckpt.checkpoints(ckpt_dir)] == [70, 125, 136]
    # and the origin survives a restart
    with Checkpointer(ckpt_dir, keep_last=1, keep_every_n_minutes=60, series=series,
                      clock=lambda: now[0]) as ckpt:
        now[0] = 137 * 60.0
        ckpt.save(tiny(137), step=137).wait()
    assert [c.step for c in asyncckpt.checkpoints(ckpt_dir)] == [70, 125, 137]


@pytest.mark.parametrize("series", ["", "a\nb", "x" * 201])
def test_bad_series_names(ckpt_dir, series):
    with pytest.raises(ValueError, match="series"):
        Checkpointer(ckpt_dir, series=series)


def test_series_must_be_a_str(ckpt_dir):
    with pytest.raises(TypeError, match="series must be a str"):
        Checkpointer(ckpt_dir, series=3)


def test_a_corrupt_series_in_the_index_is_reported(ckpt_dir):
    with Checkpointer(ckpt_dir, series="A") as ckpt:
        ckpt.save(tiny(1), step=1)
    path = ckpt_dir / "asyncckpt-index.json"
    doc = json.loads(path.read_text())
    doc["entries"][0]["series"] = 5
    path.write_text(json.dumps(doc))
    with pytest.raises(CorruptIndexError, match="series"):
        asyncckpt.checkpoints(ckpt_dir)
