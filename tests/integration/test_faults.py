"""Fault injection on top of the real local backend: whatever fails, nothing committed is lost."""

from __future__ import annotations

import errno
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
import torch
from support.helpers import BOOKKEEPING, RenameFailingStorage, folder_files

import asyncckpt
from asyncckpt import Checkpointer, StorageError, TransientStorageError, WriterError
from asyncckpt._format.naming import INDEX_NAME
from asyncckpt.events import Failed


def state(step: int, numel: int = 4096) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(numel, generator=g), "step": step}


def committed_bytes(folder) -> dict[str, bytes]:
    """Every listed checkpoint's bytes plus the index: what a fault must not touch."""
    listing = asyncckpt.checkpoints(folder)
    out = {c.name: Path(c.uri).read_bytes() for c in listing}
    out[INDEX_NAME] = Path(folder, INDEX_NAME).read_bytes()
    return out


def assert_intact(folder, before: dict[str, bytes]) -> None:
    for name, data in before.items():
        if name != INDEX_NAME:
            assert Path(folder, name).read_bytes() == data, f"{name} changed"
    assert asyncckpt.verify(folder).ok


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(errno.EACCES, "permission denied"),
        OSError(errno.EROFS, "read-only file system"),
        OSError(errno.EIO, "input/output error"),
    ],
    ids=["EACCES", "EROFS", "EIO"],
)
def test_permanent_errors_reach_the_loop_and_touch_nothing(wrapped, ckpt_dir, error):
    failed = threading.Event()
    with Checkpointer(wrapped, keep_last=2) as ckpt:
        for step in (1, 2):
            ckpt.save(state(step), step=step)
        ckpt.flush()
        before = committed_bytes(ckpt_dir)
        wrapped.fail_write = lambda name, attempt: error if name.endswith(".pt") else None
        ckpt.subscribe(lambda e: failed.set() if isinstance(e, Failed) else None)
        ckpt.save(state(3), step=3)  # nobody waits on it ...
        assert failed.wait(30)
        wrapped.fail_write = None
        with pytest.raises(WriterError) as info:
            ckpt.save(state(4), step=4)  # ... so the loop hears of it at its next call, once
        assert info.value.__cause__ is error
        assert wrapped.attempts["step_3.pt"] == 1  # permanent: not retried
        assert_intact(ckpt_dir, before)
        assert folder_files(ckpt_dir) == {"step_1.pt", "step_2.pt"}
        ckpt.save(state(4), step=4)  # and saving goes on
    assert [c.step for c in asyncckpt.checkpoints(ckpt_dir)] == [2, 4]


def test_transient_errors_with_latency_all_commit(wrapped, ckpt_dir):
    wrapped.latency = 0.002
    wrapped.fail_write = lambda name, attempt: (
        TransientStorageError("503 slow down") if attempt == 1 else None
    )
    with Checkpointer(wrapped, retry_backoff=0.0, queue_size=2) as ckpt:
        for step in range(1, 6):
            ckpt.save(state(step), step=step)
        ckpt.flush()
        assert ckpt.stats.committed == 5 and ckpt.stats.failed == 0
    assert all(wrapped.attempts[f"step_{s}.pt"] == 2 for s in range(1, 6))
    assert asyncckpt.verify(ckpt_dir).ok


def test_short_write_is_detected_and_removed(wrapped, ckpt_dir):
    with Checkpointer(wrapped) as ckpt:
        ckpt.save(state(1), step=1).wait()
        before = committed_bytes(ckpt_dir)
        wrapped.drop_tail = 100
        with pytest.raises(WriterError, match="accepted"):
            ckpt.save(state(2), step=2).wait()
        ckpt.flush()  # already raised by the handle: not raised again
        wrapped.drop_tail = 0
        ckpt.save(state(3), step=3).wait()
    assert folder_files(ckpt_dir) == {"step_1.pt", "step_3.pt"}  # no truncated step_2.pt
    assert_intact(ckpt_dir, before)


def test_failed_rename_leaves_no_temporary_file(ckpt_dir):
    storage = RenameFailingStorage(ckpt_dir, OSError(errno.EXDEV, "cross-device link"))
    storage.error = None
    with Checkpointer(storage) as ckpt:
        ckpt.save(state(1), step=1).wait()
        before = committed_bytes(ckpt_dir)
        storage.error = OSError(errno.EXDEV, "cross-device link")
        with pytest.raises(WriterError) as info:
            ckpt.save(state(2), step=2).wait()
        assert isinstance(info.value.__cause__, StorageError)
        assert "cross-device" in str(info.value.__cause__)
        storage.error = None
        ckpt.flush()  # already raised by the handle: not raised again
    assert folder_files(ckpt_dir) == {"step_1.pt"}
    assert_intact(ckpt_dir, before)


def test_failed_index_write_keeps_the_previous_index(wrapped, ckpt_dir):
    with Checkpointer(wrapped, keep_last=1, max_retries=1, retry_backoff=0.0) as ckpt:
        ckpt.save(state(1), step=1).wait()
        before = committed_bytes(ckpt_dir)
        wrapped.fail_write = lambda name, attempt: (
            TransientStorageError("timeout") if name == INDEX_NAME else None
        )
        with pytest.raises(WriterError, match="timeout"):
            ckpt.save(state(2), step=2).wait()
        assert [c.step for c in ckpt.checkpoints()] == [1]
        wrapped.fail_write = None
        ckpt.flush()  # already raised by the handle: not raised again
    # step_1 was not rotated away: the index that would have dropped it never got published
    assert_intact(ckpt_dir, before)
    assert [c.step for c in asyncckpt.checkpoints(ckpt_dir)] == [1]


# -- a full disk -----------------------------------------------------------------------------------
@pytest.fixture(params=["tmpfs", "injected"])
def small_filesystem(request, tmp_path):
    """A 4 MiB tmpfs (when this process may mount one), or None: inject ENOSPC instead."""
    if request.param == "injected":
        yield None
        return
    mountpoint = tmp_path / f"fs-{uuid.uuid4().hex[:8]}"
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)],
        capture_output=True, check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); "
                    "the injected variant covers ENOSPC")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_disk_full_then_space_freed(small_filesystem, tmp_path):
    """ENOSPC: no partial file or index is left, the loop hears of it, saving resumes later."""
    mib = 1 << 20
    if small_filesystem is not None:  # a real full disk
        folder = small_filesystem / "ckpt"
        filler = small_filesystem / "filler.bin"
        filler.write_bytes(b"\0" * int(1.5 * mib))
        storage = asyncckpt.storage.LocalStorage(folder)
        free_space = filler.unlink
    else:  # no way to mount here: inject ENOSPC after the bytes that would fit
        from support.helpers import WrappedStorage

        folder = tmp_path / "ckpt"
        storage = WrappedStorage(asyncckpt.storage.LocalStorage(folder))
        stored = {"n": 0}

        def enospc(name: str, attempt: int) -> BaseException | None:
            if name.endswith(".pt"):
                stored["n"] += 1
                if stored["n"] == 3:
                    return OSError(errno.ENOSPC, "No space left on device")
            return None

        storage.fail_write = enospc

        def free_space() -> None:
            storage.fail_write = None

    with Checkpointer(storage) as ckpt:
        for step in (1, 2):
            ckpt.save(state(step, numel=mib // 4), step=step).wait()  # 1 MiB each
        before = committed_bytes(folder)
        with pytest.raises(WriterError) as info:
            ckpt.save(state(3, numel=mib // 4), step=3).wait()
        assert "No space left on device" in str(info.value)
        ckpt.flush()  # already raised by the handle: not raised again
        assert folder_files(folder) - BOOKKEEPING == {"step_1.pt", "step_2.pt"}  # nothing partial
        assert_intact(folder, before)
        free_space()
        ckpt.save(state(3, numel=mib // 4), step=3).wait()  # works again
    assert [c.step for c in asyncckpt.checkpoints(folder)] == [1, 2, 3]
    assert asyncckpt.verify(folder, load=True).ok
