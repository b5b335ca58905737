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
``read_bytes`` / ``read_stream`` / ``open_local`` / ``list``, then ``aclose()`` -- except on a
storage object an open checkpointer writes through (its ``writer_token`` is set), which they
use as it is, on that checkpointer's event loop, and leave open. A folder may come from anyone:
readers pass ``max_bytes`` (the size the index recorded) so that no object is read past it
(:class:`ObjectTooLargeError`), and the local backend refuses names that are not regular files
(:class:`NotARegularFileError`: links, FIFOs, devices, directories). ``cleanup_temporaries``
removes what a crashed writer left in flight. Errors are raised as
:class:`~asyncckpt.StorageError` (or
:class:`~asyncckpt.TransientStorageError` when a retry may succeed), chaining the backend's own.
"""

from __future__ import annotations

import builtins
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, BinaryIO

from anyio.abc import AsyncResource

from .._format.naming import TMP_PREFIX

__all__ = ["BlockingWrite", "Buffer", "Storage"]

Buffer = Any  # bytes, bytearray or memoryview: anything with the buffer protocol

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
    #: While an open checkpointer writes through this object: the token of the event loop it
    #: runs on (set and cleared by the checkpointer). A reader given this object runs there
    #: (client sessions belong to that loop) and must not close it (that would release the
    #: writer's folder lock and buffers).
    writer_token: object | None = None

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
    async def read_bytes(self, name: str, max_bytes: int | None = None) -> bytes:
        """The whole content of ``name``.

        Args:
            name: the object to read.
            max_bytes: the most bytes the caller accepts (None: no limit).

        Raises:
            FileNotFoundError: ``name`` does not exist.
            ObjectTooLargeError: it holds more than ``max_bytes``.
            NotARegularFileError: (local folders) it is not a regular file.
        """

    @abstractmethod
    def read_stream(self, name: str, chunk_size: int = 8 << 20,
                    max_bytes: int | None = None) -> AsyncIterator[bytes]:
        """The content of ``name`` in chunks (an async generator).

        Args:
            name: the object to read.
            chunk_size: the most bytes per chunk.
            max_bytes: the most bytes the caller accepts (None: no limit). A longer object
                raises instead of being read on: at once when its size is known up front,
                else before any chunk past the limit is returned.

        Raises:
            FileNotFoundError: ``name`` does not exist.
            ObjectTooLargeError: it holds more than ``max_bytes``.
            NotARegularFileError: (local folders) it is not a regular file.
        """

    def open_local(self, name: str) -> BinaryIO | None:
        """``name`` opened read-only as a local file, or None where there are no local files.

        Blocking (call it in a worker thread). It lets a loader check and load the very same
        open file, so that nothing swapped in between is loaded unchecked. The caller closes it.

        Raises:
            FileNotFoundError: ``name`` does not exist.
            NotARegularFileError: it is not a regular file.
        """
        return None

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
        """A local filesystem path for ``name`` if there is one. The path is not checked (it
        may be a link or a FIFO): to read a checkpoint, use :meth:`open_local`."""
        return None

    async def cleanup_temporaries(self) -> builtins.list[str]:
        """Remove in-flight leftovers of a writer that did not finish; return their names."""
        leftovers = [n for n in await self.list() if n.startswith(TMP_PREFIX)]
        for name in leftovers:
            await self.delete(name)
        return leftovers

    async def aclose(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections, locks and file handles."""
