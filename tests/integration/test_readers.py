"""Readers of folders that are live (a writer rotates them) or hostile (entries that are not
regular files, bytes swapped between check and load)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import asyncckpt
from asyncckpt import Checkpointer
from asyncckpt._core import load as load_module
from asyncckpt._core import verify as verify_module
from asyncckpt._core.folder import CheckpointFolder
from asyncckpt._core.reading import read_index as real_read_index


def _state(step: int) -> dict:
    return {"w": torch.full((64,), float(step)), "step": step}


def test_load_of_a_rotating_folder_chooses_again_when_its_file_is_rotated_away(
    ckpt_dir, monkeypatch
):
    with Checkpointer(ckpt_dir, keep_last=1) as ckpt:
        ckpt.save(_state(1), step=1).wait()
        before = load_module.run_sync(
            lambda: CheckpointFolder(ckpt.storage).read_index(), ckpt.storage
        )
        ckpt.save(_state(2), step=2).wait()  # rotates step_1.pt away
    assert not (ckpt_dir / "step_1.pt").exists()
    real_open_target = load_module.open_target

    async def open_target(source, storage_options):
        target = await real_open_target(source, storage_options)
        target.index = before  # what a reader saw just before the rotation
        return target

    monkeypatch.setattr(load_module, "open_target", open_target)
    assert asyncckpt.load(ckpt_dir)["step"] == 2  # chose step_1, found it gone, chose again


def test_load_of_a_listed_file_that_is_gone_is_listed_but_missing(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(_state(1), step=1).wait()
    os.remove(ckpt_dir / "step_1.pt")
    with pytest.raises(asyncckpt.CheckpointNotFoundError, match="listed but missing"):
        asyncckpt.load(ckpt_dir)


def test_verify_of_a_rotating_folder_tells_rotated_from_missing(ckpt_dir, monkeypatch):
    with Checkpointer(ckpt_dir, keep_last=1) as ckpt:
        ckpt.save(_state(1), step=1).wait()
        before = load_module.run_sync(
            lambda: CheckpointFolder(ckpt.storage).read_index(), ckpt.storage
        )
        ckpt.save(_state(2), step=2).wait()
    reads = []

    async def read_index(storage):
        reads.append(1)
        return before if len(reads) == 1 else await real_read_index(storage)

    monkeypatch.setattr(verify_module, "read_index", read_index)
    report = asyncckpt.verify(ckpt_dir)
    assert report.ok, report.problems
    assert report.rotated == ("step_1.pt",)
    assert report.checked == ()  # step_2 was not listed yet when the index was read


def test_verify_collects_an_unreadable_entry_and_goes_on(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(_state(step), step=step)
    os.remove(ckpt_dir / "step_1.pt")
    os.mkdir(ckpt_dir / "step_1.pt")  # a folder where a file is listed
    with open(ckpt_dir / "step_3.pt", "r+b") as f:  # and a later file corrupted
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = asyncckpt.verify(ckpt_dir)
    kinds = {p.name: p.kind for p in report.problems}
    assert kinds == {"step_1.pt": "unreadable", "step_3.pt": "checksum"}


@pytest.mark.timeout(60)
def test_load_refuses_a_fifo_listed_as_a_checkpoint(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(_state(1), step=1).wait()
    os.remove(ckpt_dir / "step_1.pt")
    os.mkfifo(ckpt_dir / "step_1.pt")  # opening it for reading would wait for a writer
    with pytest.raises(asyncckpt.StorageError, match="not a regular file"):
        asyncckpt.load(ckpt_dir)


@pytest.mark.timeout(60)
def test_load_refuses_a_symlink_to_dev_zero_listed_as_a_checkpoint(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(_state(1), step=1).wait()
    os.remove(ckpt_dir / "step_1.pt")
    os.symlink("/dev/zero", ckpt_dir / "step_1.pt")  # endless bytes: never read them
    with pytest.raises(asyncckpt.StorageError):
        asyncckpt.load(ckpt_dir)


def test_load_checks_and_loads_the_same_bytes(ckpt_dir, tmp_path, monkeypatch):
    """A file swapped in after the check must not be what gets loaded."""
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(_state(1), step=1).wait()
    impostor = tmp_path / "impostor.pt"
    torch.save(_state(666), impostor)
    real_compare = CheckpointFolder.compare_at

    def compare_then_swap(uri, entry, size, checksum):
        real_compare(uri, entry, size, checksum)
        shutil.copy(impostor, tmp_path / "swap.pt")
        os.replace(tmp_path / "swap.pt", ckpt_dir / "step_1.pt")  # swapped after the check

    monkeypatch.setattr(CheckpointFolder, "compare_at", staticmethod(compare_then_swap))
    assert asyncckpt.load(ckpt_dir)["step"] == 1
