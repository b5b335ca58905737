"""LocalStorage on folders from anyone: FIFOs, links, devices and odd leftovers never hang a
reader, leak a write outside the folder, or stop a writer from opening the folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anyio
import pytest
import torch

import asyncckpt
from asyncckpt import StorageError
from asyncckpt._format.naming import LOCK_NAME, TMP_PREFIX
from asyncckpt.storage import LocalStorage, NotARegularFileError, ObjectTooLargeError

pytestmark = pytest.mark.anyio

#: A generous bound that turns a hang into a failure (the refusals below are immediate).
HANG = 60


async def refusal(storage: LocalStorage, name: str) -> list[NotARegularFileError]:
    """Read ``name`` every way a loader can; return the errors (each must be a refusal)."""
    errors = []
    with anyio.fail_after(HANG):
        with pytest.raises(NotARegularFileError) as err:
            await storage.read_bytes(name, max_bytes=1 << 20)
        errors.append(err.value)
        with pytest.raises(NotARegularFileError) as err:
            async for _ in storage.read_stream(name, 4096):
                pass
        errors.append(err.value)
        with pytest.raises(NotARegularFileError) as err:
            await anyio.to_thread.run_sync(storage.open_local, name)
        errors.append(err.value)
    return errors


async def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "step_1.pt")  # no writer will ever open it: a blocking open waits
    errors = await refusal(LocalStorage(tmp_path), "step_1.pt")
    assert {e.file_type for e in errors} == {"FIFO"}
    assert all(e.uri == str(tmp_path / "step_1.pt") for e in errors)
    assert "not a regular file" in str(errors[0])


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
async def test_a_link_to_dev_zero_is_refused_before_a_byte_is_read(tmp_path: Path) -> None:
    os.symlink("/dev/zero", tmp_path / "step_1.pt")  # endless bytes: hashing it never ends
    errors = await refusal(LocalStorage(tmp_path), "step_1.pt")
    assert {e.file_type for e in errors} == {"symbolic link"}


async def test_links_are_never_followed_even_to_a_regular_file(tmp_path: Path) -> None:
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"not in the folder")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    os.symlink(outside, folder / "step_1.pt")
    errors = await refusal(LocalStorage(folder), "step_1.pt")
    assert {e.file_type for e in errors} == {"symbolic link"}


async def test_a_directory_where_a_file_is_listed_is_refused(tmp_path: Path) -> None:
    (tmp_path / "step_1.pt").mkdir()
    errors = await refusal(LocalStorage(tmp_path), "step_1.pt")
    assert {e.file_type for e in errors} == {"directory"}
    assert all(isinstance(e, StorageError) for e in errors)


async def test_open_local_gives_a_blocking_read_only_regular_file(tmp_path: Path) -> None:
    (tmp_path / "step_1.pt").write_bytes(b"checkpoint bytes")
    f = await anyio.to_thread.run_sync(LocalStorage(tmp_path).open_local, "step_1.pt")
    with f:
        assert os.get_blocking(f.fileno())  # opened non-blocking, then set back
        assert f.readable() and not f.writable()
        assert f.read() == b"checkpoint bytes"


async def test_a_file_that_grows_while_read_stops_at_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "step_1.pt"
    path.write_bytes(b"a" * 1000)
    stream = LocalStorage(tmp_path).read_stream("step_1.pt", 300, max_bytes=1000)
    received = [await stream.__anext__()]  # the size (1000) passed the up-front check
    async with await anyio.open_file(path, "ab") as f:
        await f.write(b"b" * 10_000)  # appended to while it is read
    with pytest.raises(ObjectTooLargeError) as err:
        async for chunk in stream:
            received.append(chunk)
    data = b"".join(received)
    assert data == b"a" * len(data) and len(data) <= 1000  # nothing past the limit handed out
    assert err.value.size is None and err.value.max_bytes == 1000


# -- the writer's lock and leftovers -------------------------------------------------------------
async def test_a_link_as_the_lock_file_is_refused_and_creates_nothing(tmp_path: Path) -> None:
    folder, target = tmp_path / "ckpt", tmp_path / "elsewhere" / "planted"
    folder.mkdir()
    target.parent.mkdir()
    os.symlink(target, folder / LOCK_NAME)  # dangling: O_CREAT through it would create target
    storage = LocalStorage(folder)
    with pytest.raises(NotARegularFileError, match="symbolic link") as err:
        await storage.open(writer=True)
    assert err.value.uri == str(folder / LOCK_NAME)
    assert not target.exists() and os.listdir(target.parent) == []
    with pytest.raises(NotARegularFileError):  # the front door reports it the same way
        async with asyncckpt.AsyncCheckpointer(folder):
            pass
    assert not target.exists()


async def test_a_temporary_named_directory_does_not_stop_a_writer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "ckpt"
    planted = folder / f"{TMP_PREFIX}dir"
    planted.mkdir(parents=True)
    (planted / "inside.txt").write_bytes(b"keep me")
    outside_dir, outside_file = tmp_path / "outside", tmp_path / "outside.txt"
    outside_dir.mkdir()
    (outside_dir / "inside.txt").write_bytes(b"keep me too")
    outside_file.write_bytes(b"and me")
    os.symlink(outside_dir, folder / f"{TMP_PREFIX}linkdir")
    os.symlink(outside_file, folder / f"{TMP_PREFIX}linkfile")
    (folder / f"{TMP_PREFIX}crashed").write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING, logger="asyncckpt"):
        async with asyncckpt.AsyncCheckpointer(folder) as ckpt:
            await (await ckpt.save({"t": torch.ones(3)}, step=1)).committed()
    # the leftover files and links of ours are gone; nothing they pointed to was touched
    assert sorted(n for n in os.listdir(folder) if n.startswith(TMP_PREFIX)) == [planted.name]
    assert (planted / "inside.txt").read_bytes() == b"keep me"
    assert (outside_dir / "inside.txt").read_bytes() == b"keep me too"
    assert outside_file.read_bytes() == b"and me"
    assert [r for r in caplog.records if r.levelno == logging.WARNING
            and str(planted) in r.getMessage()]
    listed = await anyio.to_thread.run_sync(asyncckpt.checkpoints, folder)
    assert [c.name for c in listed] == ["step_1.pt"]


async def test_cleanup_temporaries_reports_what_it_removed(tmp_path: Path) -> None:
    (tmp_path / f"{TMP_PREFIX}a").write_bytes(b"x")
    (tmp_path / f"{TMP_PREFIX}d").mkdir()
    os.symlink(tmp_path / "missing", tmp_path / f"{TMP_PREFIX}l")
    (tmp_path / "step_1.pt").write_bytes(b"kept")
    removed = await LocalStorage(tmp_path).cleanup_temporaries()
    assert removed == [f"{TMP_PREFIX}a", f"{TMP_PREFIX}l"]
    assert sorted(os.listdir(tmp_path)) == [f"{TMP_PREFIX}d", "step_1.pt"]
