"""LocalStorage's blocking write path: buffered and O_DIRECT, byte-identical, crash-safe."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import random
import sys
import threading

import pytest
import torch
from support.helpers import folder_files, tensors_equal
from support.states import mixed_state, snapshot_of, torch_save_bytes, trained_model_and_optimizer

import asyncckpt
from asyncckpt import StorageError, WriterError
from asyncckpt._format.naming import INDEX_NAME, TMP_PREFIX
from asyncckpt.storage import BlockingWrite, LocalStorage, _direct, _local

HAS_DIRECT = bool(getattr(os, "O_DIRECT", 0))


def leftovers(path) -> list[str]:
    return [n for n in os.listdir(path) if n.startswith(TMP_PREFIX)]


def state_and_expected():
    model, optim, sched = trained_model_and_optimizer()
    big = torch.randn(3 * 4096 + 77)  # crosses small chunk sizes and ends unaligned
    mixed = mixed_state()
    state = {"model": model, "optim": optim, "sched": sched, "big": big, **mixed}
    expected = {"model": model.state_dict(), "optim": optim.state_dict(),
                "sched": sched.state_dict(), "big": big, **mixed}
    return state, expected


def open_writer(storage: LocalStorage) -> None:
    """What the writer does first: the folder exists before anything is written into it."""
    os.makedirs(storage.path, exist_ok=True)


@pytest.mark.parametrize("direct_io", [False, True])
@pytest.mark.parametrize("chunk_size", [4096, 3 * 4096, 32 << 20])
def test_checkpoint_bytes_are_exactly_torch_save(ckpt_dir, direct_io, chunk_size):
    state, expected = state_and_expected()
    storage = LocalStorage(ckpt_dir, direct_io=direct_io, chunk_size=chunk_size)
    with asyncckpt.Checkpointer(storage) as ckpt:
        info = ckpt.save(state, step=1).wait()
        second = ckpt.save(state, step=2).wait()  # the staging buffers are reused
    data = (ckpt_dir / "step_1.pt").read_bytes()
    assert data == torch_save_bytes(expected, crc32=False)
    assert (ckpt_dir / "step_2.pt").read_bytes() == data
    assert info is not None and info.size == len(data) and second is not None
    assert tensors_equal(torch.load(ckpt_dir / "step_1.pt", weights_only=True), expected)
    assert asyncckpt.load(ckpt_dir, which=1)["big"].equal(state["big"])
    assert leftovers(ckpt_dir) == []


@pytest.mark.parametrize("direct_io", [False, True])
def test_blocking_write_of_odd_pieces(tmp_path, direct_io):
    storage = LocalStorage(tmp_path, direct_io=direct_io, chunk_size=8192)
    rng = random.Random(0)
    sizes = [0, 1, 4095, 4096, 4097, 8191, 8192, 8193, 1 << 20, (1 << 20) + 3, 5, 70_000]
    pieces = [rng.randbytes(n) for n in sizes]
    writer = storage.blocking_write("blob")
    assert isinstance(writer, BlockingWrite)
    for i, piece in enumerate(pieces):  # mixed buffer types, read-only ones included
        writer.write(piece if i % 3 == 0 else bytearray(piece) if i % 3 == 1
                     else memoryview(piece))
    assert not (tmp_path / "blob").exists()  # nothing visible before commit
    assert writer.commit() == sum(sizes)
    assert (tmp_path / "blob").read_bytes() == b"".join(pieces)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("direct_io", [False, True])
def test_abort_leaves_nothing(tmp_path, direct_io):
    (tmp_path / "blob").write_bytes(b"previous")
    storage = LocalStorage(tmp_path, direct_io=direct_io, chunk_size=4096)
    writer = storage.blocking_write("blob")
    writer.write(os.urandom(3 * 4096 + 5))
    assert len(leftovers(tmp_path)) == 1
    writer.abort()
    writer.abort()  # idempotent
    assert leftovers(tmp_path) == []
    assert (tmp_path / "blob").read_bytes() == b"previous"
    with pytest.raises(RuntimeError, match="after commit"):
        writer.commit()


def test_concurrent_blocking_writes_get_their_own_buffers(tmp_path):
    storage = LocalStorage(tmp_path, direct_io=True, chunk_size=4096)
    first, second = storage.blocking_write("a"), storage.blocking_write("b")
    a, b = os.urandom(20_000), os.urandom(30_000)
    first.write(a[:9000])
    second.write(b[:9000])
    first.write(a[9000:])
    second.write(b[9000:])
    assert (first.commit(), second.commit()) == (len(a), len(b))
    assert (tmp_path / "a").read_bytes() == a and (tmp_path / "b").read_bytes() == b


@pytest.mark.skipif(not HAS_DIRECT, reason="no O_DIRECT on this platform")
def test_o_direct_refused_at_open_falls_back_to_the_page_cache(ckpt_dir, monkeypatch, caplog):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:  # as Linux does: the file is created, then O_DIRECT refused
            os.close(real_open(path, flags & ~os.O_DIRECT, *args))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(_direct.os, "open", no_direct)
    state, expected = state_and_expected()
    storage = LocalStorage(ckpt_dir, direct_io=True, chunk_size=4096)
    with caplog.at_level(logging.INFO, logger="asyncckpt"):  # routine: info, not a warning
        with asyncckpt.Checkpointer(storage) as ckpt:
            ckpt.save(state, step=1).wait()
            ckpt.save(state, step=2).wait()
    assert (ckpt_dir / "step_2.pt").read_bytes() == torch_save_bytes(expected, crc32=False)
    assert storage._buffers.direct_ok is False
    assert sum("O_DIRECT is not supported" in r.message for r in caplog.records) == 1


@pytest.mark.skipif(not HAS_DIRECT, reason="no O_DIRECT on this platform")
def test_a_file_of_the_wrong_length_is_never_published(tmp_path, monkeypatch):
    """Defence in depth: commit() checks the file's length before the rename."""
    monkeypatch.setattr(_direct.os, "ftruncate", lambda fd, size: None)  # padding stays
    storage = LocalStorage(tmp_path, direct_io=True, chunk_size=16384)
    sink = storage.blocking_write("blob")
    sink.write(os.urandom(16384 + 123))
    with pytest.raises(StorageError, match="wrote 20480 of 16507 bytes"):
        sink.commit()
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not HAS_DIRECT, reason="no O_DIRECT on this platform")
@pytest.mark.parametrize("short_first", [False, True])
def test_o_direct_refused_by_write_falls_back_mid_file(tmp_path, monkeypatch, short_first):
    """The filesystem accepts O_DIRECT at open but refuses the writes (EINVAL): the file is
    finished through the page cache, from the first byte not yet written (a short O_DIRECT
    write may have come first)."""
    import fcntl

    real_write = os.write
    direct_calls = []

    def refusing(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            direct_calls.append(len(data))
            if short_first and len(direct_calls) == 1:
                return real_write(fd, memoryview(data)[:4096])  # short, aligned
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(_direct.os, "write", refusing)
    storage = LocalStorage(tmp_path, direct_io=True, chunk_size=16384)
    data = os.urandom(5 * 16384 + 123)
    writer = storage.blocking_write("blob")
    writer.write(data)
    assert writer.commit() == len(data)
    assert len(direct_calls) == (2 if short_first else 1)
    assert (tmp_path / "blob").read_bytes() == data
    assert storage._buffers.direct_ok is False


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no tmpfs at /dev/shm")
def test_direct_io_on_tmpfs_writes_a_valid_file(tmp_path_factory):
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        state, expected = state_and_expected()
        # a 4 KiB staging buffer: the small state is above it, so O_DIRECT is attempted
        storage = LocalStorage(folder, direct_io=True, chunk_size=4096)
        with asyncckpt.Checkpointer(storage) as ckpt:
            ckpt.save(state, step=1).wait()
        with open(os.path.join(folder, "step_1.pt"), "rb") as f:
            assert f.read() == torch_save_bytes(expected, crc32=False)


@pytest.mark.parametrize("direct_io", [False, True])
def test_disk_full_fails_the_save_and_keeps_the_folder_consistent(ckpt_dir, monkeypatch,
                                                                   direct_io):
    state, _ = state_and_expected()
    storage = LocalStorage(ckpt_dir, direct_io=direct_io, chunk_size=4096)
    real_write = os.write
    budget = {"left": None}

    def filling(fd, data):
        if budget["left"] is not None:
            if budget["left"] <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            budget["left"] -= len(data)
        return real_write(fd, data)

    monkeypatch.setattr(_direct.os, "write", filling)
    with asyncckpt.Checkpointer(storage, max_retries=2, retry_backoff=0) as ckpt:
        ckpt.save(state, step=1).wait()
        budget["left"] = 4096 if direct_io else 0  # direct: the second block fails
        handle = ckpt.save(state, step=2)
        with pytest.raises(WriterError) as err:
            handle.wait()
        assert isinstance(err.value.__cause__, StorageError)
        assert "No space left" in str(err.value.__cause__)
        assert ckpt.storage.path in str(err.value.__cause__)
        ckpt.flush()  # the handle reported it: not raised a second time
        budget["left"] = None  # space was freed: saving resumes
        ckpt.save(state, step=3).wait()
    assert folder_files(ckpt_dir) == {"step_1.pt", "step_3.pt"}
    index = json.loads((ckpt_dir / INDEX_NAME).read_text())
    assert [e["name"] for e in index["entries"]] == ["step_1.pt", "step_3.pt"]
    assert leftovers(ckpt_dir) == []


def test_transient_errors_on_the_blocking_path_are_retried(ckpt_dir, monkeypatch):
    state, expected = state_and_expected()
    real_write = os.write
    failures = {"left": 2}

    def flaky(fd, data):
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return real_write(fd, data)

    monkeypatch.setattr(_direct.os, "write", flaky)
    with asyncckpt.Checkpointer(ckpt_dir, retry_backoff=0) as ckpt:
        ckpt.save(state, step=1).wait()
    assert (ckpt_dir / "step_1.pt").read_bytes() == torch_save_bytes(expected, crc32=False)
    assert leftovers(ckpt_dir) == []


class _GatedWrite(BlockingWrite):
    """Records the thread's priority; blocks its first write until the save is cancelled."""

    def __init__(self, inner: BlockingWrite, storage: GatedStorage) -> None:
        self.inner, self.storage = inner, storage

    def write(self, data):
        self.storage.nice.add(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        if self.storage.hold and not self.storage.entered.is_set():
            self.storage.entered.set()
            assert self.cancelled is not None  # the writer hands every sink its cancel flag
            assert self.cancelled.wait(timeout=60)
        self.inner.write(data)

    def commit(self):
        if self.storage.hold_commit:  # cancelled while the commit (fsync, rename) runs
            self.storage.entered.set()
            assert self.cancelled is not None
            assert self.cancelled.wait(timeout=60)
        return self.inner.commit()

    def abort(self):
        self.inner.abort()


class GatedStorage(LocalStorage):
    """``hold``: the first write waits until the save is cancelled; ``hold_commit``: the
    commit does. ``entered`` is set when the write is held."""

    def __init__(self, *args, hold: bool = False, hold_commit: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hold, self.hold_commit, self.entered = hold, hold_commit, threading.Event()
        self.nice: set[int] = set()

    def blocking_write(self, name, size_hint=None):
        return _GatedWrite(super().blocking_write(name, size_hint), self)


def _abandon_while_held(storage: GatedStorage, state: dict) -> asyncckpt.SyncSaveHandle:
    """Save ``state`` as step 1, and leave the ``with`` block by an exception (on_exception=
    "abandon") while the storage holds the write."""
    with pytest.raises(RuntimeError, match="boom"):
        with asyncckpt.Checkpointer(storage, on_exception="abandon") as ckpt:
            handle = ckpt.save(state, step=1)
            assert storage.entered.wait(timeout=60)
            raise RuntimeError("boom")
    return handle


@pytest.mark.parametrize("direct_io", [False, True])
def test_abandon_cancels_a_blocking_write_and_leaves_nothing(ckpt_dir, direct_io):
    storage = GatedStorage(ckpt_dir, direct_io=direct_io, hold=True)
    handle = _abandon_while_held(storage, {"t": torch.randn(100_000)})
    assert handle.status == "cancelled"
    assert folder_files(ckpt_dir) == set()
    assert leftovers(ckpt_dir) == []


def test_a_save_cancelled_during_its_commit_is_listed_if_the_commit_completed(ckpt_dir):
    """Abandoning while the file is being committed: the commit finishes (it is not
    interruptible), so the checkpoint is durable under its name, and it must be listed."""
    storage = GatedStorage(ckpt_dir, hold_commit=True)
    handle = _abandon_while_held(storage, {"t": torch.ones(100_000)})
    assert handle.status == "committed"
    assert [c.name for c in asyncckpt.checkpoints(ckpt_dir)] == ["step_1.pt"]
    assert folder_files(ckpt_dir) == {"step_1.pt"}
    assert torch.equal(asyncckpt.load(ckpt_dir)["t"], torch.ones(100_000))


def test_an_abandoned_resave_keeps_the_committed_checkpoint_listed(ckpt_dir):
    """Re-saving a committed name unlists it during the write; abandoning that write (Ctrl-C,
    on_exception="abandon") must list the untouched previous file again."""
    with asyncckpt.Checkpointer(ckpt_dir) as ckpt:
        ckpt.save({"t": torch.ones(100_000)}, step=1).wait()
    storage = GatedStorage(ckpt_dir, hold=True)
    handle = _abandon_while_held(storage, {"t": torch.zeros(100_000)})
    assert handle.status == "cancelled"
    assert [c.name for c in asyncckpt.checkpoints(ckpt_dir)] == ["step_1.pt"]
    assert torch.equal(asyncckpt.load(ckpt_dir)["t"], torch.ones(100_000))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
@pytest.mark.parametrize("writer_nice", [0, 10, 19])
def test_checkpoints_are_written_by_a_lower_priority_thread(ckpt_dir, writer_nice):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    storage = GatedStorage(ckpt_dir)
    with asyncckpt.Checkpointer(storage, writer_nice=writer_nice) as ckpt:
        ckpt.save({"t": torch.randn(1000)}, step=1).wait()
        ckpt.save({"t": torch.randn(1000)}, step=2).wait()
    assert storage.nice == {min(19, base + writer_nice)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # caller unchanged


@pytest.mark.parametrize(("value", "exc"), [(-1, ValueError), (20, ValueError),
                                            (True, TypeError), (2.5, TypeError)])
def test_writer_nice_is_validated(ckpt_dir, value, exc):
    with pytest.raises(exc, match="writer_nice"):
        asyncckpt.Checkpointer(ckpt_dir, writer_nice=value)


def test_serializer_borrowed_mode_is_byte_identical():
    state = {**mixed_state(), "big": torch.arange(1 << 16, dtype=torch.float32)}  # 256 KiB
    chunks: list[bytes] = []  # borrowed views are only valid during emit: copy them there
    kinds: list[tuple[type, int]] = []

    from asyncckpt._format.serialize import serialize

    def emit(chunk) -> None:
        kinds.append((type(chunk), len(chunk)))
        chunks.append(bytes(chunk))

    serialize(snapshot_of(state), emit, borrowed=True)
    # the large payload is passed on as a view, uncopied; the small zip writes around it are
    # gathered (a few chunks, not one per write)
    assert (memoryview, 1 << 18) in kinds and len(kinds) <= 4
    assert b"".join(chunks) == torch_save_bytes(state, crc32=False)
    assert torch.load(io.BytesIO(b"".join(chunks)), weights_only=True)["i64"].tolist() == [1, -2, 3]


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [({"direct_io": "yes"}, TypeError), ({"fsync": 1}, TypeError),
     ({"chunk_size": 1000}, ValueError), ({"chunk_size": 0}, ValueError),
     ({"chunk_size": True}, ValueError)],
)
def test_local_storage_options_are_validated(tmp_path, kwargs, exc):
    with pytest.raises(exc, match="LocalStorage"):
        LocalStorage(tmp_path, **kwargs)


def test_direct_io_through_storage_options(ckpt_dir):
    with asyncckpt.Checkpointer(ckpt_dir, storage_options={"direct_io": True}) as ckpt:
        assert ckpt.storage.direct_io is True
        ckpt.save({"x": torch.arange(10)}, step=1).wait()
    assert torch.load(ckpt_dir / "step_1.pt", weights_only=True)["x"].tolist() == list(range(10))


def test_a_failing_sink_never_reaches_torch_and_the_error_is_raised():
    """An exception inside torch's zip writer would leave it in a state whose destructor aborts
    the process; the sink keeps it out and serialize() raises it at the end."""

    from asyncckpt._format.serialize import serialize

    calls = {"n": 0}

    def failing(chunk):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    state = {f"t{i}": torch.randn(20_000) for i in range(5)}
    with pytest.raises(OSError, match="No space"):
        serialize(snapshot_of(state), failing, borrowed=True)
    assert calls["n"] == 3  # nothing was emitted after the failure


@pytest.mark.anyio
async def test_small_files_are_published_atomically_in_one_call(tmp_path, monkeypatch):
    storage = LocalStorage(tmp_path)
    assert await storage.write_bytes("index.json", b'{"a": 1}') == 8
    assert (tmp_path / "index.json").read_bytes() == b'{"a": 1}'

    def broken_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(_local.os, "fsync", broken_fsync)
    with pytest.raises(StorageError, match="Input/output error") as err:
        await storage.write_bytes("index.json", b'{"a": 2}')
    assert str(tmp_path / "index.json") in str(err.value)
    assert (tmp_path / "index.json").read_bytes() == b'{"a": 1}'  # the old one stays
    assert leftovers(tmp_path) == []


def test_direct_io_is_the_default_and_small_files_skip_it(ckpt_dir):
    storage = LocalStorage(ckpt_dir, chunk_size=1 << 20)
    assert storage.direct_io is True
    assert storage.blocking_write("small.pt", size_hint=1000)._want_direct is False
    assert storage.blocking_write("big.pt", size_hint=8 << 20)._want_direct is True
    buffered = LocalStorage(ckpt_dir, direct_io=False)
    assert buffered.blocking_write("x", 8 << 20)._want_direct is False


def test_reading_through_an_open_checkpointers_storage_leaves_it_locked(ckpt_dir):
    """load() / checkpoints() / verify() given the writer's own storage object use it as it
    is: they must not close it (which would release the folder lock and the staging buffers)."""
    storage = LocalStorage(ckpt_dir, direct_io=True, chunk_size=4096)
    with asyncckpt.Checkpointer(storage) as ckpt:
        ckpt.save({"t": torch.ones(10_000)}, step=1).wait()
        assert [c.step for c in asyncckpt.checkpoints(storage)] == [1]
        assert torch.equal(asyncckpt.load(storage)["t"], torch.ones(10_000))
        assert asyncckpt.verify(storage).ok
        with pytest.raises(asyncckpt.CheckpointError, match="already open by another writer"):
            asyncckpt.Checkpointer(ckpt_dir)  # the folder is still locked by the first writer
        ckpt.save({"t": torch.zeros(10_000)}, step=2).wait()  # and it still writes
    assert storage._lock_fd is None  # closing the checkpointer released it
    assert [c.step for c in asyncckpt.checkpoints(storage)] == [1, 2]  # now opened and closed
    assert storage._lock_fd is None
