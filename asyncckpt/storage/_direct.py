"""The local backend's blocking checkpoint writer: one file, written from one worker thread.

::

    serializer thread                                   I/O thread (one per storage)
      write(view) ─ small piece ──▶ staging buffer ─full─▶ os.write (O_DIRECT: aligned blocks)
                  ─ large piece ──▶ os.write (buffered mode only)
      commit()    ─ pad the last block, wait for both buffers, ftruncate to the exact size,
                    check the length, fsync, rename over the final name, fsync the folder
      abort()     ─ wait for the I/O thread, close, remove the temporary file

Small pieces (zip headers, the pickle) are gathered in a staging buffer; large tensor payloads
go to ``os.write`` as they are. With ``O_DIRECT`` every byte goes through two page-aligned
staging buffers of ``chunk_size`` bytes: one is filled (``memmove``, GIL released) while the
I/O thread writes the other, and the last block is padded to the alignment and the file
truncated to its exact size before the fsync. That skips the page cache, whose pages are costly
to fault in on virtual machines, and costs the CPU almost nothing. Where ``O_DIRECT`` is refused
(``EINVAL``: tmpfs on older kernels, some FUSE and network filesystems) the same file is written
through the page cache instead.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable

from .._format.buffers import memmove_into
from ._base import BlockingWrite, Buffer
from ._fileio import storage_error, write_all

__all__ = ["ALIGN", "LocalBlockingWrite", "WriteBuffers"]

logger = logging.getLogger("asyncckpt")

ALIGN = 4096  # O_DIRECT: buffer address, file offset and length multiples of the block size
_SMALL = 1 << 20  # buffered path: pieces below this are gathered before os.write
_O_DIRECT = getattr(os, "O_DIRECT", 0)


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


class WriteBuffers:
    """What one local storage reuses from checkpoint to checkpoint: the staging buffers, the
    I/O thread, and whether its filesystem takes ``O_DIRECT``.

    Args:
        chunk_size: size of each of the two ``O_DIRECT`` staging buffers.
        folder: the storage's folder (for the log message when ``O_DIRECT`` is refused).
    """

    def __init__(self, chunk_size: int, folder: str) -> None:
        self.chunk_size = chunk_size
        self.folder = folder
        self.direct_ok: bool | None = None  # False once O_DIRECT was refused here
        self._guard = threading.Lock()
        self._staging: dict[bool, _Staging] = {}
        self._busy = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def take(self, direct: bool) -> tuple[_Staging, bool]:
        """Staging buffers and whether they are the shared ones (reused across saves)."""
        size, count = (self.chunk_size, 2) if direct else (_SMALL * 4, 1)
        with self._guard:
            if self._busy:
                # Another checkpoint is being written at the same time (the writer never does
                # that, a direct user of the storage might): short-lived buffers of its own.
                return _Staging(size, count), False
            self._busy = True
            staging = self._staging.get(direct)
        if staging is None:
            try:
                staging = _Staging(size, count)
            except BaseException:
                self.release()
                raise
            with self._guard:
                self._staging[direct] = staging
        return staging, True

    def release(self) -> None:
        """Give the shared staging buffers back."""
        with self._guard:
            self._busy = False

    def io(self) -> concurrent.futures.ThreadPoolExecutor:
        """The I/O thread that writes full ``O_DIRECT`` buffers."""
        with self._guard:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="asyncckpt-io"
                )
            return self._executor

    def no_direct(self, exc: OSError) -> None:
        """Record that ``O_DIRECT`` was refused here (logged once: it is routine on tmpfs and
        some FUSE/NFS mounts, so not a warning)."""
        if self.direct_ok is not False:
            logger.info("O_DIRECT is not supported in %s (%s); writing through the page cache",
                        self.folder, exc.strerror or exc)
        self.direct_ok = False

    def close(self) -> None:
        """Stop the I/O thread and drop the buffers (blocking)."""
        with self._guard:
            executor, self._executor = self._executor, None
            staging, self._staging = list(self._staging.values()), {}
        if executor is not None:
            executor.shutdown()
        for buffers in staging:
            buffers.close()


class LocalBlockingWrite(BlockingWrite):
    """One checkpoint file written from a worker thread (see the module docstring).

    Args:
        buffers: the storage's reusable buffers and I/O thread.
        name: the checkpoint's name (for error messages).
        tmp: the temporary path written first.
        final: the path it is renamed to by ``commit()``.
        direct: try ``O_DIRECT``.
        fsync: fsync the file (the folder is fsynced by ``publish``).
        publish: renames ``tmp`` over ``final`` and fsyncs the folder.
    """

    def __init__(self, buffers: WriteBuffers, name: str, *, tmp: str, final: str, direct: bool,
                 fsync: bool, publish: Callable[[str, str], None]) -> None:
        self._buffers = buffers
        self._name = name
        self._want_direct = direct
        self._final = final
        self._tmp = tmp
        self._fsync = fsync
        self._publish = publish
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
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        if self._want_direct and _O_DIRECT and self._buffers.direct_ok is not False:
            try:
                self._fd = os.open(self._tmp, flags | _O_DIRECT, 0o644)
                self._direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._buffers.no_direct(exc)
                # Linux creates the file before refusing O_DIRECT: O_EXCL would now fail.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._tmp)
        if self._fd is None:
            self._fd = os.open(self._tmp, flags, 0o644)
        self._staging, self._shared = self._buffers.take(self._direct)
        return self._fd

    def _error(self, exc: OSError) -> Exception:
        return storage_error(f"write {self._name} to", self._final, exc)

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
                write_all(fd, view)
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
            write_all(fd, memoryview(self._staging.maps[self._current])[: self._fill])
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
        self._inflight[index] = self._buffers.io().submit(self._direct_write, self._fd, chunk)
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
                self._buffers.no_direct(exc)
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
                    padded = -(-tail // ALIGN) * ALIGN
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
            if self._fsync:
                os.fsync(fd)
            self._fd = None
            os.close(fd)
            self._publish(self._tmp, self._final)
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
            self._buffers.release()
        else:
            staging.close()
