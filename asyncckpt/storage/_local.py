"""Local folder backend: temporary name + fsync + rename + directory fsync.

Checkpoints take the blocking path (:meth:`LocalStorage.blocking_write`, in ``_direct``): the
serializer's worker thread writes the file itself, ``O_DIRECT`` by default, so no chunk crosses
threads or the event loop. Everything else (index and pointer files, reads, listings, the lock)
runs in worker threads through anyio (``anyio.to_thread``, ``anyio.wrap_file``), so the backend
works on asyncio and trio alike. Reads never follow links and refuse anything that is not a
regular file (``_fileio``).
"""

from __future__ import annotations

import builtins
import errno
import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from typing import BinaryIO

import anyio

from .._errors import CheckpointError
from .._format.naming import LOCK_NAME, TMP_PREFIX
from ._base import BlockingWrite, Buffer, Storage
from ._direct import ALIGN, LocalBlockingWrite, WriteBuffers
from ._dirs import is_checkpoint_directory, remove_checkpoint_directory
from ._fileio import (
    fsync_dir,
    lock_file,
    open_regular_file,
    read_regular,
    remove_quietly,
    remove_temporaries,
    storage_error,
    write_all,
)
from ._limits import NotARegularFileError, ObjectTooLargeError, check_max_bytes

__all__ = ["LocalStorage"]

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class LocalStorage(Storage):
    """Checkpoints as files in one local folder.

    ``write`` streams to ``.asyncckpt-tmp.<random>`` in the same folder, fsyncs it, renames it over
    the final name and fsyncs the folder, so a crash at any instant leaves either the old file or
    the complete new one. A writer holds an advisory lock (``.asyncckpt.lock``, flock) for its
    lifetime, so two writers cannot interleave their index updates in one folder.

    Args:
        directory: the folder (created by a writer if missing).
        fsync: fsync files and the folder (turn off only for throwaway runs and tests of
            non-durability paths; the default is durable).
        direct_io: write checkpoints of at least ``chunk_size`` bytes with ``O_DIRECT``
            through aligned staging buffers, bypassing the page cache (on by default: about
            twice the durable throughput at less than half the CPU on our VMs; falls back to
            buffered writes where the filesystem refuses it). The bytes on disk are the same
            either way.
        chunk_size: size of each of the two ``O_DIRECT`` staging buffers (a multiple of 4 KiB).

    Raises:
        TypeError, ValueError: an option is invalid.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: bool = True,
        direct_io: bool = True,
        chunk_size: int = 32 << 20,
    ) -> None:
        self.path = os.path.abspath(os.fspath(directory))
        self.uri = self.path
        for option, value in (("fsync", fsync), ("direct_io", direct_io)):
            if not isinstance(value, bool):
                raise TypeError(f"LocalStorage({option}=...) must be a bool, got {value!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or (
            chunk_size < ALIGN or chunk_size % ALIGN
        ):
            raise ValueError(
                f"LocalStorage(chunk_size=...) must be a positive multiple of {ALIGN}, "
                f"got {chunk_size!r}"
            )
        self.fsync = fsync
        self.direct_io = direct_io
        self.chunk_size = chunk_size
        self._lock_fd: int | None = None
        self._buffers = WriteBuffers(chunk_size, self.path)

    def __repr__(self) -> str:
        return f"LocalStorage({self.path!r})"

    def _join(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _temporary(self) -> str:
        return self._join(f"{TMP_PREFIX}{uuid.uuid4().hex[:16]}")

    # -- opening and closing ---------------------------------------------------------------------
    async def open(self, *, writer: bool) -> None:
        """A writer creates the folder and takes its lock; a reader needs nothing.

        Raises:
            CheckpointError: another writer holds the folder's lock.
            NotARegularFileError: the lock file is a link (or FIFO, directory, ...).
            StorageError: the folder cannot be created or the lock taken.
        """
        if not writer:
            return
        try:
            await anyio.to_thread.run_sync(lambda: os.makedirs(self.path, exist_ok=True))
        except OSError as exc:
            raise storage_error("create the checkpoint folder", self.path, exc) from exc
        lock_path = self._join(LOCK_NAME)
        try:
            self._lock_fd = await anyio.to_thread.run_sync(lock_file, lock_path)
        except BlockingIOError:
            raise CheckpointError(
                f"{self.path} is already open by another writer (lock {lock_path} is held); "
                "one folder takes one writer at a time"
            ) from None
        except NotARegularFileError:
            raise
        except OSError as exc:
            raise storage_error("lock", lock_path, exc) from exc

    async def aclose(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            await anyio.to_thread.run_sync(os.close, fd)
        await anyio.to_thread.run_sync(self._buffers.close)

    # -- writing ---------------------------------------------------------------------------------
    def blocking_write(self, name: str, size_hint: int | None = None) -> BlockingWrite:
        """Write ``name`` from a worker thread (tmp file, fsync, rename, folder fsync).

        ``O_DIRECT`` is used (when ``direct_io``) unless the hint says the file is smaller than
        one staging buffer: then the two aligned buffers would cost more memory than the file.
        """
        direct = self.direct_io and (size_hint is None or size_hint >= self.chunk_size)
        return LocalBlockingWrite(self._buffers, name, tmp=self._temporary(),
                                  final=self._join(name), direct=direct, fsync=self.fsync,
                                  publish=self._publish)

    async def write(self, name: str, chunks: AsyncIterable[Buffer]) -> int:
        final, tmp = self._join(name), self._temporary()
        written = 0
        try:
            try:
                f = await anyio.open_file(tmp, "xb", buffering=0)
                try:
                    async for chunk in chunks:
                        view = memoryview(chunk).cast("B")
                        while view.nbytes:
                            n = await f.write(view)
                            if not n:
                                raise OSError(errno.EIO, "write returned 0 bytes")
                            written += n
                            view = view[n:]
                    if self.fsync:
                        await anyio.to_thread.run_sync(os.fsync, f.wrapped.fileno())
                finally:
                    # Shielded: a cancelled write must still close its file descriptor.
                    with anyio.CancelScope(shield=True):
                        await f.aclose()
                await anyio.to_thread.run_sync(self._publish, tmp, final)
            except OSError as exc:
                raise storage_error(f"write {name} to", final, exc) from exc
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(remove_quietly, tmp)
            raise
        return written

    def _publish(self, tmp: str, final: str) -> None:
        """Make a complete, fsynced temporary file visible under its final name (blocking; the
        one place every write path renames, so a test can fail it)."""
        os.replace(tmp, final)
        if self.fsync:
            fsync_dir(self.path)

    async def write_bytes(self, name: str, data: Buffer) -> int:
        """Publish a small file (index, pointer) in one worker-thread call: the same steps as
        ``write``, without a thread hop for each of them."""
        view = memoryview(data).cast("B")
        return await anyio.to_thread.run_sync(self._write_small, name, view)

    def _write_small(self, name: str, view: memoryview) -> int:
        final, tmp = self._join(name), self._temporary()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
            try:
                write_all(fd, view)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._publish(tmp, final)
        except OSError as exc:
            remove_quietly(tmp)
            raise storage_error(f"write {name} to", final, exc) from exc
        return view.nbytes

    # -- reading ---------------------------------------------------------------------------------
    async def read_bytes(self, name: str, max_bytes: int | None = None) -> bytes:
        check_max_bytes(max_bytes)
        path = self._join(name)
        try:
            return await anyio.to_thread.run_sync(read_regular, path, max_bytes)
        except (FileNotFoundError, NotARegularFileError, ObjectTooLargeError):
            raise
        except OSError as exc:
            raise storage_error("read", path, exc) from exc

    async def read_stream(self, name: str, chunk_size: int = 8 << 20,
                          max_bytes: int | None = None) -> AsyncIterator[bytes]:
        check_max_bytes(max_bytes)
        path = self._join(name)
        try:
            f = anyio.wrap_file(await anyio.to_thread.run_sync(open_regular_file, path))
        except (FileNotFoundError, NotARegularFileError):
            raise
        except OSError as exc:
            raise storage_error("read", path, exc) from exc
        try:
            if max_bytes is not None:
                size = (await anyio.to_thread.run_sync(os.fstat, f.wrapped.fileno())).st_size
                if size > max_bytes:
                    raise ObjectTooLargeError(path, max_bytes, size)
            total = 0
            while True:
                # Past the limit only one byte more is read: enough to tell that it grew.
                want = chunk_size if max_bytes is None else min(chunk_size, max_bytes - total + 1)
                chunk = await f.read(want)
                if not chunk:
                    return
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise ObjectTooLargeError(path, max_bytes)
                yield chunk
        except OSError as exc:
            raise storage_error("read", path, exc) from exc
        finally:
            # Shielded: a reader cancelled (or stopping early) must still close the file.
            with anyio.CancelScope(shield=True):
                await f.aclose()

    def open_local(self, name: str) -> BinaryIO:
        """``name`` opened read-only: without following a link, without blocking on a FIFO,
        and checked (on the opened file) to be a regular file. Blocking.

        Raises:
            FileNotFoundError: ``name`` does not exist.
            NotARegularFileError: it is a link, FIFO, device, socket or directory.
            StorageError: it cannot be opened.
        """
        path = self._join(name)
        try:
            return open_regular_file(path)
        except (FileNotFoundError, NotARegularFileError):
            raise
        except OSError as exc:
            raise storage_error("read", path, exc) from exc

    def local_path(self, name: str) -> str | None:
        return self._join(name)

    # -- names -----------------------------------------------------------------------------------
    async def delete(self, name: str) -> None:
        path = self._join(name)
        try:
            await anyio.to_thread.run_sync(os.remove, path)
        except FileNotFoundError:
            return
        except OSError as exc:
            # a multi-rank checkpoint is a directory: moved aside, then removed
            if not await anyio.to_thread.run_sync(is_checkpoint_directory, path):
                raise storage_error("delete", path, exc) from exc
            try:
                await anyio.to_thread.run_sync(remove_checkpoint_directory, path)
            except OSError as exc2:
                raise storage_error("delete", path, exc2) from exc2

    async def list(self) -> builtins.list[str]:
        try:
            return sorted(await anyio.to_thread.run_sync(os.listdir, self.path))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise storage_error("list", self.path, exc) from exc

    async def exists(self, name: str) -> bool:
        return await anyio.Path(self._join(name)).exists()

    def uri_of(self, name: str) -> str:
        return self._join(name)

    async def cleanup_temporaries(self) -> builtins.list[str]:
        """Remove the temporary files a crashed writer left; return their names.

        Only names are removed, never what a link points to; a directory named like a
        temporary file is left in place with a warning (writers never create one).
        """
        return await anyio.to_thread.run_sync(remove_temporaries, self.path)
