"""Local folder backend: aiofiles, temporary name + fsync + rename + directory fsync."""

from __future__ import annotations

import builtins
import errno
import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator

import aiofiles
import aiofiles.os
import anyio

from .._errors import CheckpointError, StorageError, TransientStorageError
from .._naming import LOCK_NAME, TMP_PREFIX
from ._base import Buffer, Storage

__all__ = ["LocalStorage"]

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
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = os.path.abspath(os.fspath(directory))
        self.uri = self.path
        self.fsync = fsync
        self._lock_fd: int | None = None

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
                await self._publish(tmp, final)
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

    async def _publish(self, tmp: str, final: str) -> None:
        """Make a complete, fsynced temporary file visible under its final name."""
        await aiofiles.os.replace(tmp, final)
        if self.fsync:
            await anyio.to_thread.run_sync(_fsync_dir, self.path)

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
