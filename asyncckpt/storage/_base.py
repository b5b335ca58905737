"""The storage interface every backend implements.

A backend is a flat namespace of names (file names in a folder, keys under a prefix) with an
atomic publish. The writer calls, in this order::

    await storage.open(writer=True)      once: create the folder / check the bucket, take the lock
    await storage.write(name, chunks)    publish a checkpoint: visible only once complete, durable
    await storage.write_bytes(name, b)   publish the index / pointer files (same guarantee)
    await storage.delete(name)           rotation, after the index stopped naming ``name``
    await storage.aclose()               once

A backend may also offer a blocking path for checkpoints, used from the serializer's worker
thread so that no chunk crosses threads (``blocking_write(name, size_hint)`` returns a
:class:`BlockingWrite`, or None to use ``write``)::

    w = storage.blocking_write(name)     on the loop: must not block (open files lazily)
    w.write(view) ... w.commit()         in one worker thread; or w.abort() on any failure

Readers (``asyncckpt.load``, ``asyncckpt.checkpoints``) call ``open(writer=False)``, then
``read_bytes`` / ``read_stream`` / ``list``, then ``aclose()`` -- except on a storage object an
open checkpointer writes through (:func:`held_by_writer`), which they use as it is and leave
open. ``cleanup_temporaries`` removes what a crashed writer left in flight. Errors are raised as
:class:`~asyncckpt.StorageError` (or :class:`~asyncckpt.TransientStorageError` when a retry may
succeed), chaining the backend's own.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from anyio.abc import AsyncResource

from .._naming import TMP_PREFIX

__all__ = ["BlockingWrite", "Buffer", "Storage"]

Buffer = Any  # bytes, bytearray or memoryview: anything with the buffer protocol

# id -> (storage object an open checkpointer writes through, the event loop it runs on)
_held: dict[int, tuple[object, asyncio.AbstractEventLoop | None]] = {}
_held_lock = threading.Lock()


def hold_for_writer(storage: Storage, held: bool) -> None:
    """Record that an open checkpointer writes through ``storage`` (or no longer does); call
    it on the writer's event loop."""
    with _held_lock:
        if held:
            try:
                loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:  # pragma: no cover - the writer calls it on its loop
                loop = None
            _held[id(storage)] = (storage, loop)
        elif id(storage) in _held and _held[id(storage)][0] is storage:
            del _held[id(storage)]


def held_by_writer(storage: Storage) -> bool:
    """Whether an open checkpointer writes through this very object (a reader given it must
    not close it: that would release the writer's folder lock and buffers)."""
    with _held_lock:
        entry = _held.get(id(storage))
        return entry is not None and entry[0] is storage


def writer_loop_of(storage: Storage) -> asyncio.AbstractEventLoop | None:
    """The event loop of the open checkpointer that writes through ``storage``, if any (its
    client sessions belong to that loop)."""
    with _held_lock:
        entry = _held.get(id(storage))
        return entry[1] if entry is not None and entry[0] is storage else None


async def _once(data: Buffer) -> AsyncIterator[Buffer]:
    yield data


class BlockingWrite(ABC):
    """One object being published through a backend's blocking path, from one worker thread.

    Same guarantees as :meth:`Storage.write`: nothing is visible before ``commit()`` returns,
    and after ``abort()`` nothing temporary is left behind.

    Attributes:
        cancelled: set by the caller before the first ``write``; once it is set the write is
            being abandoned (``abort()`` follows), so a backend that waits (for a network
            round-trip, say) can stop waiting.
    """

    cancelled: threading.Event | None = None

    @abstractmethod
    def write(self, data: Buffer) -> None:
        """Append ``data``; it is only valid during the call (copy what must outlive it)."""

    @abstractmethod
    def commit(self) -> int:
        """Make the object durable and visible; return its size in bytes."""

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written so far (idempotent; never raises for a missing object)."""


class Storage(AsyncResource):
    """Abstract async storage backend (see the module docstring for the order of calls)."""

    #: Base location, as users write it (a folder path or a URI).
    uri: str

    async def open(self, *, writer: bool) -> None:  # noqa: B027 - optional hook
        """Prepare for use. ``writer=True``: create what is missing and take any writer lock."""

    @abstractmethod
    async def write(self, name: str, chunks: AsyncIterable[Buffer]) -> int:
        """Publish ``name`` with the concatenated ``chunks``; return the number of bytes.

        Atomic and durable: readers see either the previous object (or none) or all the new
        bytes, and once this returns the bytes survive a crash. If ``chunks`` raises, or the
        call is cancelled, nothing is published and nothing temporary is left behind.
        """

    def blocking_write(self, name: str, size_hint: int | None = None) -> BlockingWrite | None:
        """A blocking path to publish ``name`` from a worker thread, or None to use ``write``.

        Called on the event loop, so it must not block; the returned object does its I/O in
        the thread that calls its methods. ``size_hint`` is about how many bytes will come.
        """
        return None

    async def write_bytes(self, name: str, data: Buffer) -> int:
        """Publish a small object in one piece (same guarantees as :meth:`write`)."""
        return await self.write(name, _once(data))

    @abstractmethod
    async def read_bytes(self, name: str) -> bytes:
        """The whole content of ``name``. Raises ``FileNotFoundError`` when it does not exist."""

    @abstractmethod
    def read_stream(self, name: str, chunk_size: int = 8 << 20) -> AsyncIterator[bytes]:
        """The content of ``name`` in chunks (an async generator)."""

    @abstractmethod
    async def delete(self, name: str) -> None:
        """Remove ``name``; a name that does not exist is not an error."""

    @abstractmethod
    async def list(self) -> builtins.list[str]:
        """All names directly in this folder/prefix, temporary ones included."""

    @abstractmethod
    async def exists(self, name: str) -> bool:
        """Whether ``name`` exists."""

    @abstractmethod
    def uri_of(self, name: str) -> str:
        """The path or URI a user would use for ``name``."""

    def local_path(self, name: str) -> str | None:
        """A local filesystem path for ``name`` if there is one (lets loaders mmap/stream it)."""
        return None

    async def cleanup_temporaries(self) -> builtins.list[str]:
        """Remove in-flight leftovers of a writer that did not finish; return their names."""
        leftovers = [n for n in await self.list() if n.startswith(TMP_PREFIX)]
        for name in leftovers:
            await self.delete(name)
        return leftovers

    async def aclose(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections, locks and file handles."""
