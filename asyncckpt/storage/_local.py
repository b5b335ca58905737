"""Local folder backend: temporary name + fsync + rename + directory fsync.

Checkpoints take the blocking path (:meth:`LocalStorage.blocking_write`): the serializer's worker
thread writes the file itself, so no chunk crosses threads. Small pieces (zip headers, the
pickle) are gathered in a staging buffer; large tensor payloads go to ``os.write`` as they are.
With ``direct_io`` (the default; for files of at least ``chunk_size`` bytes) the file is opened
with ``O_DIRECT`` and every byte goes through two page-aligned staging buffers of ``chunk_size``
bytes: one is filled (``memmove``, GIL released) while an I/O thread writes the other, and the
last block is padded to the alignment and the file truncated to its exact size before the fsync.
That skips the page cache, whose pages are costly to fault in on virtual machines, and costs the
CPU almost nothing. Where ``O_DIRECT`` is refused
(``EINVAL``: tmpfs on older kernels, some FUSE and network filesystems) the same file is written
through the page cache instead. Index and pointer files use the async ``write`` (aiofiles).
"""

from __future__ import annotations

import builtins
import concurrent.futures
import contextlib
import ctypes
import errno
import logging
import mmap
import os
import threading
import uuid
from collections.abc import AsyncIterable, AsyncIterator

import aiofiles
import aiofiles.os
import anyio

from .._buffers import memmove_into
from .._errors import CheckpointError, StorageError, TransientStorageError
from .._naming import LOCK_NAME, TMP_PREFIX
from ._base import BlockingWrite, Buffer, Storage

__all__ = ["LocalStorage"]

logger = logging.getLogger("asyncckpt")

#: errno values for which a retry can succeed; everything else (ENOSPC, EACCES, EROFS, EIO, ...)
#: is reported at once.
TRANSIENT_ERRNOS = frozenset({errno.EINTR, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT})

_fsync = aiofiles.os.wrap(os.fsync)


def _storage_error(action: str, path: str, exc: OSError) -> StorageError:
    cls = TransientStorageError if exc.errno in TRANSIENT_ERRNOS else StorageError
    reason = exc.strerror or str(exc) or type(exc).__name__
    code = f" ({errno.errorcode.get(exc.errno, exc.errno)})" if exc.errno else ""
    return cls(f"cannot {action} {path}: {reason}{code}", path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length multiples of the block size
_SMALL = 1 << 20  # buffered path: pieces below this are gathered before os.write
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def _write_all(fd: int, view: memoryview) -> None:
    while view.nbytes:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write returned 0 bytes")
        view = view[n:]


class _Staging:
    """Page-aligned, reusable staging buffers (allocated once per storage, touched once)."""

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self.maps = [mmap.mmap(-1, size) for _ in range(count)]
        self._anchors = [ctypes.c_char.from_buffer(m) for m in self.maps]
        self.addresses = [ctypes.addressof(a) for a in self._anchors]
        for address in self.addresses:
            ctypes.memset(address, 0, size)  # fault the pages in now, not during a save

    def close(self) -> None:
        # Dropped, not closed: a view of a map may still be referenced (by the traceback of a
        # failed write, say), and mmap refuses to close while one is; the memory is unmapped
        # when the last reference goes.
        self._anchors.clear()
        self.maps.clear()
        self.addresses.clear()


class _LocalBlockingWrite(BlockingWrite):
    """One checkpoint file written from a worker thread (see the module docstring)."""

    def __init__(self, storage: LocalStorage, name: str, direct: bool) -> None:
        self._storage = storage
        self._name = name
        self._want_direct = direct
        self._final = storage._join(name)
        self._tmp = storage._join(f"{TMP_PREFIX}{uuid.uuid4().hex[:16]}")
        self._fd: int | None = None
        self._direct = False
        self._staging: _Staging | None = None
        self._shared = False  # the staging buffers are the storage's (else our own)
        self._current = 0  # staging buffer being filled
        self._fill = 0  # bytes in it
        self._inflight: list[concurrent.futures.Future[None] | None] = [None, None]
        self._size = 0
        self._done = False

    # -- opening ---------------------------------------------------------------------------------
    def _open(self) -> int:
        storage = self._storage
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        if self._want_direct and _O_DIRECT and storage._direct_ok is not False:
            try:
                self._fd = os.open(self._tmp, flags | _O_DIRECT, 0o644)
                self._direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._no_direct(exc)
                # Linux creates the file before refusing O_DIRECT: O_EXCL would now fail.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._tmp)
        if self._fd is None:
            self._fd = os.open(self._tmp, flags, 0o644)
        self._staging, self._shared = storage._staging_for(self._direct)
        return self._fd

    def _no_direct(self, exc: OSError) -> None:
        if self._storage._direct_ok is not False:  # routine (tmpfs, some FUSE/NFS): no warning
            logger.info("O_DIRECT is not supported in %s (%s); writing through the page cache",
                        self._storage.path, exc.strerror or exc)
        self._storage._direct_ok = False

    def _error(self, exc: OSError) -> Exception:
        return _storage_error(f"write {self._name} to", self._final, exc)

    # -- writing ---------------------------------------------------------------------------------
    def write(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        if not view.nbytes:
            return
        try:
            fd = self._fd if self._fd is not None else self._open()
            if self._direct:
                self._write_direct(view)
            elif view.nbytes >= _SMALL:
                self._flush_buffered(fd)
                _write_all(fd, view)
            else:
                if self._fill + view.nbytes > self._capacity:
                    self._flush_buffered(fd)
                self._stage(view)
        except OSError as exc:
            raise self._error(exc) from exc
        self._size += view.nbytes

    @property
    def _capacity(self) -> int:
        return self._staging.size if self._staging is not None else 0

    def _stage(self, view: memoryview) -> None:
        """Append ``view`` (which fits) to the current staging buffer."""
        staging = self._staging
        if staging is None:  # pragma: no cover - _open() sets it
            raise RuntimeError("staging buffer missing")
        memmove_into(staging.addresses[self._current] + self._fill, view)
        self._fill += view.nbytes

    def _flush_buffered(self, fd: int) -> None:
        if self._fill and self._staging is not None:
            _write_all(fd, memoryview(self._staging.maps[self._current])[: self._fill])
            self._fill = 0

    def _write_direct(self, view: memoryview) -> None:
        capacity = self._capacity
        while view.nbytes:
            room = capacity - self._fill
            piece = view[:room]
            self._stage(piece)
            view = view[piece.nbytes:]
            if self._fill == capacity:
                self._submit(capacity)

    def _submit(self, nbytes: int) -> None:
        """Hand the full staging buffer to the I/O thread; wait until the other one is free."""
        index = self._current
        staging = self._staging
        if staging is None or self._fd is None:  # pragma: no cover - set by _open()
            raise RuntimeError("file not open")
        chunk = memoryview(staging.maps[index])[:nbytes]
        self._inflight[index] = self._storage._io().submit(self._direct_write, self._fd, chunk)
        self._current = 1 - index
        self._fill = 0
        self._wait(self._current)

    def _direct_write(self, fd: int, chunk: memoryview) -> None:
        import fcntl

        while chunk.nbytes:
            try:
                n = os.write(fd, chunk)
            except OSError as exc:
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                if exc.errno != errno.EINVAL or not flags & _O_DIRECT:
                    raise
                # The filesystem accepted O_DIRECT at open but refuses the I/O: go on buffered,
                # from the first byte not yet written (a short write may have come first).
                fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~_O_DIRECT)
                self._no_direct(exc)
                continue
            if n <= 0:
                raise OSError(errno.EIO, "write returned 0 bytes")
            chunk = chunk[n:]

    def _wait(self, index: int) -> None:
        future, self._inflight[index] = self._inflight[index], None
        if future is not None:
            future.result()

    # -- finishing -------------------------------------------------------------------------------
    def commit(self) -> int:
        if self._done:
            raise RuntimeError(f"{self._name}: commit() after commit() or abort()")
        try:
            fd = self._fd if self._fd is not None else self._open()
            if self._direct:
                tail = self._fill
                if tail:
                    padded = -(-tail // _ALIGN) * _ALIGN
                    staging = self._staging
                    if staging is not None:
                        ctypes.memset(staging.addresses[self._current] + tail, 0, padded - tail)
                    self._submit(padded)
                self._wait(0)
                self._wait(1)
                if tail:
                    os.ftruncate(fd, self._size)  # drop the padding of the last block
            else:
                self._flush_buffered(fd)
            if os.fstat(fd).st_size != self._size:  # never publish a file of the wrong length
                raise OSError(errno.EIO, f"wrote {os.fstat(fd).st_size} of {self._size} bytes")
            if self._storage.fsync:
                os.fsync(fd)
            self._fd = None
            os.close(fd)
            self._storage._publish(self._tmp, self._final)
            self._done = True
        except OSError as exc:
            self.abort()
            raise self._error(exc) from exc
        except BaseException:
            self.abort()
            raise
        finally:
            self._release_staging()
        return self._size

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        for index in (0, 1):
            try:
                self._wait(index)
            except Exception:  # the write being aborted failed anyway
                pass
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.remove(self._tmp)
        except OSError:
            pass  # missing, or cleanup_temporaries removes it at the next open
        self._release_staging()

    def _release_staging(self) -> None:
        staging, self._staging = self._staging, None
        if staging is None:
            return
        if self._shared:
            self._storage._release_staging()
        else:
            staging.close()


def _lock(path: str) -> int:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


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
            chunk_size < _ALIGN or chunk_size % _ALIGN
        ):
            raise ValueError(
                f"LocalStorage(chunk_size=...) must be a positive multiple of {_ALIGN}, "
                f"got {chunk_size!r}"
            )
        self.fsync = fsync
        self.direct_io = direct_io
        self.chunk_size = chunk_size
        self._lock_fd: int | None = None
        self._direct_ok: bool | None = None  # False once O_DIRECT was refused here
        self._guard = threading.Lock()
        self._staging: dict[bool, _Staging] = {}
        self._staging_busy = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"LocalStorage({self.path!r})"

    def _join(self, name: str) -> str:
        return os.path.join(self.path, name)

    async def open(self, *, writer: bool) -> None:
        if not writer:
            return
        try:
            await aiofiles.os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise _storage_error("create the checkpoint folder", self.path, exc) from exc
        lock_path = self._join(LOCK_NAME)
        try:
            self._lock_fd = await anyio.to_thread.run_sync(_lock, lock_path)
        except BlockingIOError:
            raise CheckpointError(
                f"{self.path} is already open by another writer (lock {lock_path} is held); "
                "one folder takes one writer at a time"
            ) from None
        except OSError as exc:
            raise _storage_error("lock", lock_path, exc) from exc

    def blocking_write(self, name: str, size_hint: int | None = None) -> BlockingWrite:
        """Write ``name`` from a worker thread (tmp file, fsync, rename, folder fsync).

        ``O_DIRECT`` is used (when ``direct_io``) unless the hint says the file is smaller than
        one staging buffer: then the two aligned buffers would cost more memory than the file.
        """
        direct = self.direct_io and (size_hint is None or size_hint >= self.chunk_size)
        return _LocalBlockingWrite(self, name, direct)

    def _staging_for(self, direct: bool) -> tuple[_Staging, bool]:
        """Staging buffers and whether they are the shared ones (reused across saves)."""
        size, count = (self.chunk_size, 2) if direct else (_SMALL * 4, 1)
        with self._guard:
            if self._staging_busy:
                # Another checkpoint is being written at the same time (the writer never does
                # that, a direct user of the storage might): short-lived buffers of its own.
                return _Staging(size, count), False
            self._staging_busy = True
            staging = self._staging.get(direct)
        if staging is None:
            try:
                staging = _Staging(size, count)
            except BaseException:
                self._release_staging()
                raise
            with self._guard:
                self._staging[direct] = staging
        return staging, True

    def _release_staging(self) -> None:
        with self._guard:
            self._staging_busy = False

    def _io(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._guard:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="asyncckpt-io"
                )
            return self._executor

    async def write(self, name: str, chunks: AsyncIterable[Buffer]) -> int:
        final = self._join(name)
        tmp = self._join(f"{TMP_PREFIX}{uuid.uuid4().hex[:16]}")
        written = 0
        try:
            try:
                f = await aiofiles.open(tmp, "wb", buffering=0)
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
                        await _fsync(f.fileno())
                finally:
                    # Shielded: a cancelled write must still close its file descriptor.
                    with anyio.CancelScope(shield=True):
                        await f.close()
                await anyio.to_thread.run_sync(self._publish, tmp, final)
            except OSError as exc:
                raise _storage_error(f"write {name} to", final, exc) from exc
        except BaseException:
            with anyio.CancelScope(shield=True):
                try:
                    await aiofiles.os.remove(tmp)
                except FileNotFoundError:
                    pass
                except OSError:
                    pass  # the original error is what matters; cleanup_temporaries retries
            raise
        return written

    def _publish(self, tmp: str, final: str) -> None:
        """Make a complete, fsynced temporary file visible under its final name (blocking; the
        one place every write path renames, so a test can fail it)."""
        os.replace(tmp, final)
        if self.fsync:
            _fsync_dir(self.path)

    async def write_bytes(self, name: str, data: Buffer) -> int:
        """Publish a small file (index, pointer) in one worker-thread call: the same steps as
        ``write``, without a thread hop for each of them."""
        view = memoryview(data).cast("B")
        return await anyio.to_thread.run_sync(self._write_small, name, view)

    def _write_small(self, name: str, view: memoryview) -> int:
        final = self._join(name)
        tmp = self._join(f"{TMP_PREFIX}{uuid.uuid4().hex[:16]}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                         0o644)
            try:
                _write_all(fd, view)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._publish(tmp, final)
        except OSError as exc:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise _storage_error(f"write {name} to", final, exc) from exc
        return view.nbytes

    async def read_bytes(self, name: str) -> bytes:
        path = self._join(name)
        try:
            async with aiofiles.open(path, "rb") as f:
                return await f.read()
        except FileNotFoundError:
            raise
        except NotADirectoryError as exc:  # the "folder" is a file: no such name in it
            raise FileNotFoundError(errno.ENOENT, "no such checkpoint", path) from exc
        except OSError as exc:
            raise _storage_error("read", path, exc) from exc

    async def read_stream(self, name: str, chunk_size: int = 8 << 20) -> AsyncIterator[bytes]:
        path = self._join(name)
        try:
            async with aiofiles.open(path, "rb") as f:
                while chunk := await f.read(chunk_size):
                    yield chunk
        except FileNotFoundError:
            raise
        except NotADirectoryError as exc:
            raise FileNotFoundError(errno.ENOENT, "no such checkpoint", path) from exc
        except OSError as exc:
            raise _storage_error("read", path, exc) from exc

    async def delete(self, name: str) -> None:
        path = self._join(name)
        try:
            await aiofiles.os.remove(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _storage_error("delete", path, exc) from exc

    async def list(self) -> builtins.list[str]:
        try:
            return sorted(await aiofiles.os.listdir(self.path))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _storage_error("list", self.path, exc) from exc

    async def exists(self, name: str) -> bool:
        return bool(await aiofiles.os.path.exists(self._join(name)))

    def uri_of(self, name: str) -> str:
        return self._join(name)

    def local_path(self, name: str) -> str | None:
        return self._join(name)

    async def aclose(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            await anyio.to_thread.run_sync(os.close, fd)
        with self._guard:
            executor, self._executor = self._executor, None
            staging, self._staging = list(self._staging.values()), {}
        if executor is not None:
            await anyio.to_thread.run_sync(executor.shutdown)
        for buffers in staging:
            buffers.close()
