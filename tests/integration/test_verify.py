"""verify(): every listed checkpoint is checked; problems are collected, not raised."""

from __future__ import annotations

import json

import pytest
import torch

import asyncckpt
from asyncckpt import Checkpointer
from asyncckpt._cli import main
from asyncckpt._format.hashing import checksum_of


@pytest.fixture
def folder(tmp_path):
    with Checkpointer(tmp_path / "run") as ckpt:
        for step in (1, 2, 3):
            ckpt.save({"w": torch.full((256,), float(step))}, step=step)
    return tmp_path / "run"


def test_a_healthy_folder_verifies(folder, capsys):
    report = asyncckpt.verify(folder, load=True)
    assert report.ok and report.checked == ("step_1.pt", "step_2.pt", "step_3.pt")
    assert main(["verify", str(folder)]) == 0
    assert "3 checkpoint(s) checked, OK" in capsys.readouterr().out


def test_each_kind_of_damage_is_reported(folder, capsys):
    one = folder / "step_1.pt"
    data = bytearray(one.read_bytes())
    data[-30] ^= 0x80
    one.write_bytes(bytes(data))  # bit flip
    two = folder / "step_2.pt"
    two.write_bytes(two.read_bytes()[:-1])  # truncated
    (folder / "step_3.pt").unlink()  # gone
    (folder / ".asyncckpt-tmp.feedfacecafebeef").write_bytes(b"x")
    report = asyncckpt.verify(folder)
    assert [(p.kind, p.name) for p in report.problems] == [
        ("checksum", "step_1.pt"), ("size", "step_2.pt"), ("missing", "step_3.pt")
    ]
    assert report.leftovers == (".asyncckpt-tmp.feedfacecafebeef",)
    assert main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "CHECKSUM" in out and "SIZE" in out and "MISSING" in out and "3 problem(s)" in out


def test_load_catches_files_that_verify_but_do_not_unpickle(folder):
    index_path = folder / "asyncckpt-index.json"
    garbage = b"not a zip archive at all"
    (folder / "step_2.pt").write_bytes(garbage)
    index = json.loads(index_path.read_text())
    index["entries"][1].update(size=len(garbage), checksum=checksum_of(garbage))
    index_path.write_text(json.dumps(index))
    assert asyncckpt.verify(folder).ok  # the bytes are what the index says ...
    report = asyncckpt.verify(folder, load=True)  # ... but torch cannot read them
    assert [(p.kind, p.name) for p in report.problems] == [("unreadable", "step_2.pt")]


def test_an_unreadable_index_is_a_problem_not_a_crash(folder, capsys):
    (folder / "asyncckpt-index.json").write_text("{ truncated")
    report = asyncckpt.verify(folder)
    assert [p.kind for p in report.problems] == ["index"]
    assert main(["verify", str(folder)]) == 1
    assert "INDEX" in capsys.readouterr().out


def test_not_a_checkpoint_folder(tmp_path, capsys):
    with pytest.raises(asyncckpt.CheckpointNotFoundError):
        asyncckpt.verify(tmp_path)
    assert main(["verify", str(tmp_path)]) == 2
    assert "no asyncckpt-index.json" in capsys.readouterr().err
