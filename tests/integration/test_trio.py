"""The async front door end to end on both of anyio's event loops, trio included.

Every test runs on asyncio and on trio (``anyio_backend`` in ``tests/conftest.py``): open, save
with rotation and best pointers, flush, resume, load, a writer failure reaching the caller, and
cancellation down to the thread that writes the file.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import sniffio
import torch
from support.helpers import BOOKKEEPING, WrappedStorage, folder_files, tensors_equal

import asyncckpt
from asyncckpt import AsyncCheckpointer, StorageError, WriterError
from asyncckpt._format.naming import TMP_PREFIX
from asyncckpt.storage import BlockingWrite, Buffer, LocalStorage

pytestmark = pytest.mark.anyio


def state(step: int) -> dict[str, Any]:
    return {"w": torch.full((64, 64), float(step)), "b": torch.arange(step + 3), "step": step}


async def load(*args: Any, **kwargs: Any) -> Any:
    """asyncckpt.load is the sync reader: call it from a worker thread, as an async app would."""
    return await anyio.to_thread.run_sync(lambda: asyncckpt.load(*args, **kwargs))


async def test_each_test_runs_on_the_event_loop_it_names(anyio_backend: str) -> None:
    """The tests below prove nothing about trio unless they really run on it."""
    assert sniffio.current_async_library() == anyio_backend
    try:
        asyncio.get_running_loop()
        on_asyncio = True
    except RuntimeError:
        on_asyncio = False
    assert on_asyncio == (anyio_backend == "asyncio")


async def test_save_rotate_best_flush_resume_and_load(ckpt_dir: Path) -> None:
    options: dict[str, Any] = {"keep_last": 2, "best": {"loss": "less"}}
    losses = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.4, 5: 0.7}
    async with AsyncCheckpointer(ckpt_dir, **options) as ckpt:
        handles = [await ckpt.save(state(s), step=s, metrics={"loss": loss})
                   for s, loss in losses.items()]
        await ckpt.flush()
        assert [h.status for h in handles] == ["committed"] * 5
        assert [c.step for c in ckpt.checkpoints()] == [2, 4, 5]  # the best outlives rotation
        best, latest = ckpt.best("loss"), ckpt.latest()
        assert best is not None and best.step == 2
        assert latest is not None and latest.step == 5
    assert folder_files(ckpt_dir) == {"step_2.pt", "step_4.pt", "step_5.pt"}

    async with AsyncCheckpointer(ckpt_dir, **options) as ckpt:  # resume
        resumed = ckpt.latest()
        assert resumed is not None and resumed.step == 5
        assert tensors_equal(await load(ckpt_dir), state(5))
        info = await (await ckpt.save(state(6), step=6, metrics={"loss": 0.1})).committed()
        assert info is not None and info.step == 6
        assert [c.step for c in ckpt.checkpoints()] == [5, 6]  # the old best was released
    assert folder_files(ckpt_dir) == {"step_5.pt", "step_6.pt"}
    assert tensors_equal(await load(ckpt_dir), state(6))
    assert tensors_equal(await load(ckpt_dir, which="best:loss"), state(6))
    plain = await anyio.to_thread.run_sync(
        lambda: torch.load(ckpt_dir / "step_5.pt", weights_only=True))
    assert tensors_equal(plain, state(5))


async def test_a_pipelined_snapshot_holds_the_values_at_save(ckpt_dir: Path) -> None:
    model = torch.nn.Linear(32, 32)
    optim = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    async with AsyncCheckpointer(ckpt_dir, snapshot="pipelined") as ckpt:
        handle = await ckpt.save({"model": model, "optim": optim}, step=1)
        model(torch.randn(4, 32)).sum().backward()
        optim.step()  # waits for the background copy before it updates the weights
        await handle.committed()
    loaded = await load(ckpt_dir)
    assert tensors_equal(loaded["model"], expected)
    assert not torch.equal(model.weight, expected["weight"])


async def test_a_writer_failure_reaches_the_caller(wrapped: WrappedStorage,
                                                   ckpt_dir: Path) -> None:
    def fail(name: str, attempt: int) -> BaseException | None:
        return StorageError("the disk is on fire", name) if name == "step_2.pt" else None

    wrapped.fail_write = fail
    async with AsyncCheckpointer(wrapped) as ckpt:
        await (await ckpt.save(state(1), step=1)).committed()
        failed = await ckpt.save(state(2), step=2)
        with pytest.raises(WriterError) as err:
            await ckpt.flush()
        assert isinstance(err.value.__cause__, StorageError)
        assert "the disk is on fire" in str(err.value.__cause__)
        assert failed.status == "failed"
        await ckpt.flush()  # reported once, not again
        await (await ckpt.save(state(3), step=3)).committed()  # and saving goes on
    listed = await anyio.to_thread.run_sync(asyncckpt.checkpoints, ckpt_dir)
    assert [c.step for c in listed] == [1, 3]


async def test_cancelling_the_caller_abandons_a_queued_save(wrapped: WrappedStorage,
                                                           ckpt_dir: Path) -> None:
    wrapped.gate = threading.Event()  # the save waits in the storage until cancelled
    with anyio.CancelScope() as scope:
        async with AsyncCheckpointer(wrapped) as ckpt:
            handle = await ckpt.save(state(1), step=1)
            await anyio.to_thread.run_sync(wrapped.entered.wait)
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert handle.status == "cancelled"
    assert folder_files(ckpt_dir) == set()
    wrapped.gate.set()
    async with AsyncCheckpointer(ckpt_dir) as ckpt:  # the folder's lock was released
        await (await ckpt.save(state(2), step=2)).committed()
    listed = await anyio.to_thread.run_sync(asyncckpt.checkpoints, ckpt_dir)
    assert [c.step for c in listed] == [2]


class _HeldWrite(BlockingWrite):
    """Holds the first write of a checkpoint until the writer cancels it."""

    def __init__(self, inner: BlockingWrite, entered: threading.Event) -> None:
        self.inner, self.entered = inner, entered

    def write(self, data: Buffer) -> None:
        if not self.entered.is_set():
            self.entered.set()
            if self.cancelled is None or not self.cancelled.wait(600):
                raise AssertionError("the writer never cancelled the file being written")
        self.inner.write(data)

    def commit(self) -> int:
        return self.inner.commit()

    def abort(self) -> None:
        self.inner.abort()


class _HoldingStorage(LocalStorage):
    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.entered = threading.Event()

    def blocking_write(self, name: str, size_hint: int | None = None) -> BlockingWrite:
        return _HeldWrite(super().blocking_write(name, size_hint), self.entered)


async def test_cancellation_reaches_the_thread_writing_the_file(ckpt_dir: Path) -> None:
    storage = _HoldingStorage(ckpt_dir)
    with anyio.CancelScope() as scope:
        async with AsyncCheckpointer(storage) as ckpt:
            handle = await ckpt.save(state(1), step=1)
            await anyio.to_thread.run_sync(storage.entered.wait)
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught and handle.status == "cancelled"
    names = set(os.listdir(ckpt_dir)) - BOOKKEEPING
    assert names == set() and not any(n.startswith(TMP_PREFIX) for n in names)
    listed = await anyio.to_thread.run_sync(asyncckpt.checkpoints, ckpt_dir)
    assert listed == []


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_s3_is_refused_at_open_on_trio() -> None:
    """s3fs runs only on asyncio: the front door says so at open, before any request."""
    ckpt = AsyncCheckpointer("s3://bucket/run",
                             storage_options={"endpoint_url": "http://127.0.0.1:9"})
    with anyio.fail_after(60), pytest.raises(StorageError, match="only on asyncio") as err:
        await ckpt.open()
    assert "on trio" in str(err.value)
