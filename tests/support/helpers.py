"""Test helpers: a wrapping storage for gating and fault injection on top of a real backend."""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import BinaryIO

import anyio
import torch

from asyncckpt._format.naming import INDEX_NAME, LAST_CHECKPOINT_NAME, LOCK_NAME
from asyncckpt.storage import Buffer, LocalStorage, Storage

BOOKKEEPING = {INDEX_NAME, LAST_CHECKPOINT_NAME, LOCK_NAME}


class WrappedStorage(Storage):
    """Delegates to ``inner``; tests add gates and faults through the attributes.

    Attributes:
        gate: when set, every checkpoint ``write`` (not index/pointer writes) waits until the
            threading.Event is set (so tests can hold the writer without sleeping).
        entered: set when a gated write started waiting (a test can wait for it).
        fail_write: callable(name, attempt) -> exception to raise instead of writing, or None.
        fail_delete: callable(name) -> exception or None.
        fail_after_bytes: raise this exception once that many bytes of a checkpoint were written
            (a tuple (nbytes, exception)), leaving the write half-done.
        latency: seconds every checkpoint write waits first (a slow device or network).
        drop_tail: a short write: the backend stores all but the last N bytes of a checkpoint
            and reports the (smaller) count it stored.
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.fail_write: Callable[[str, int], BaseException | None] | None = None
        self.fail_delete: Callable[[str], BaseException | None] | None = None
        self.fail_after_bytes: tuple[int, BaseException] | None = None
        self.latency = 0.0
        self.drop_tail = 0
        self.writes: list[str] = []
        self.attempts: dict[str, int] = {}

    async def open(self, *, writer: bool) -> None:
        await self.inner.open(writer=writer)

    async def write(self, name: str, chunks: AsyncIterable[Buffer]) -> int:
        attempt = self.attempts.get(name, 0) + 1
        self.attempts[name] = attempt
        if name not in BOOKKEEPING and self.gate is not None:
            self.entered.set()
            await anyio.to_thread.run_sync(self.gate.wait, abandon_on_cancel=True)
        if self.fail_write is not None:
            exc = self.fail_write(name, attempt)
            if exc is not None:
                raise exc
        if name not in BOOKKEEPING:
            if self.latency:
                await anyio.sleep(self.latency)
            if self.fail_after_bytes is not None:
                chunks = self._truncating(chunks, *self.fail_after_bytes)
            if self.drop_tail:
                chunks = self._without_tail(chunks, self.drop_tail)
        n = await self.inner.write(name, chunks)
        self.writes.append(name)
        return n

    @staticmethod
    async def _truncating(
        chunks: AsyncIterable[Buffer], limit: int, exc: BaseException
    ) -> AsyncIterator[Buffer]:
        sent = 0
        async for chunk in chunks:
            view = memoryview(chunk).cast("B")
            if sent + view.nbytes > limit:
                yield view[: limit - sent]
                raise exc
            sent += view.nbytes
            yield view

    @staticmethod
    async def _without_tail(chunks: AsyncIterable[Buffer], drop: int) -> AsyncIterator[Buffer]:
        held = b""
        async for chunk in chunks:
            held += bytes(chunk)
            if len(held) > drop:
                yield held[:-drop]
                held = held[-drop:]

    async def read_bytes(self, name: str, max_bytes: int | None = None) -> bytes:
        return await self.inner.read_bytes(name, max_bytes)

    def read_stream(self, name: str, chunk_size: int = 8 << 20,
                    max_bytes: int | None = None) -> AsyncIterator[bytes]:
        return self.inner.read_stream(name, chunk_size, max_bytes)

    def open_local(self, name: str) -> BinaryIO | None:
        return self.inner.open_local(name)

    async def delete(self, name: str) -> None:
        if self.fail_delete is not None:
            exc = self.fail_delete(name)
            if exc is not None:
                raise exc
        await self.inner.delete(name)

    async def list(self) -> list[str]:
        return await self.inner.list()

    async def exists(self, name: str) -> bool:
        return await self.inner.exists(name)

    def uri_of(self, name: str) -> str:
        return self.inner.uri_of(name)

    def local_path(self, name: str) -> str | None:
        return self.inner.local_path(name)

    async def aclose(self) -> None:
        await self.inner.aclose()


def folder_files(path: str | os.PathLike[str]) -> set[str]:
    """Checkpoint files in a folder: everything but asyncckpt's bookkeeping files."""
    return {n for n in os.listdir(path) if n not in BOOKKEEPING}


def tensors_equal(a: object, b: object) -> bool:
    """Deep equality for nested states (tensors compared exactly, dtype and shape included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return (
            type(a) is type(b) and len(a) == len(b) and all(map(tensors_equal, a, b))
        )
    try:
        import numpy as np

        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return (
                isinstance(a, np.ndarray)
                and isinstance(b, np.ndarray)
                and a.dtype == b.dtype
                and np.array_equal(a, b)
            )
    except ImportError:
        pass
    return bool(a == b)


class RenameFailingStorage(LocalStorage):
    """The real local backend, whose final rename fails for checkpoint files."""

    def __init__(self, directory: str | os.PathLike[str], error: BaseException) -> None:
        super().__init__(directory)
        self.error: BaseException | None = error

    def _publish(self, tmp: str, final: str) -> None:
        if self.error is not None and os.path.basename(final) not in BOOKKEEPING:
            raise self.error
        super()._publish(tmp, final)
