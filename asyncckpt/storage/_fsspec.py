"""Generic fsspec backend: any fsspec URL that has no dedicated backend (``memory://``, ``gs://``).

Async-capable filesystems (``gcsfs``, ``adlfs``, ...) are driven through their coroutine API on
the writer's event loop, with one session per storage; they run only on asyncio, so on another
event loop (trio) :meth:`FsspecStorage.open` fails with a clear error. Sync-only filesystems
(``memory://``) run each call in a worker thread, on any event loop. A checkpoint is written
under a temporary name (``.asyncckpt-tmp.<random>``), then moved over its final name, so readers
never see a partial object; what a crash leaves under the temporary name is removed by the next
writer.

Streaming: a sync filesystem receives the chunks through its own buffered file object as they
arrive. fsspec has no streaming writer for async filesystems, so there the object is gathered in
memory and uploaded in one call: that costs the size of one checkpoint in memory on top of the
snapshot. S3 has a dedicated streaming backend (:class:`~asyncckpt.storage.S3Storage`).
"""

from __future__ import annotations

import builtins
import errno
import inspect
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from functools import partial
from typing import Any

import anyio

from .._errors import StorageError, TransientStorageError
from .._format.naming import TMP_PREFIX
from ._base import Buffer, Storage
from ._limits import ObjectTooLargeError, check_max_bytes
from ._remote import caused_by, commit_shielded, require, require_asyncio

__all__ = ["FsspecStorage"]

logger = logging.getLogger("asyncckpt")


def _transient_types() -> tuple[type[BaseException], ...]:
    from fsspec.exceptions import FSTimeoutError

    types: tuple[type[BaseException], ...] = (TimeoutError, ConnectionError, FSTimeoutError)
    try:  # most async filesystems (gcsfs, adlfs, http) speak HTTP through aiohttp
        import aiohttp

        types += (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
    except ImportError:
        pass
    return types


class FsspecStorage(Storage):
    """Checkpoints as files/objects under one fsspec URL.

    Args:
        url: ``protocol://path`` of the folder or prefix (``memory://runs/exp1``,
            ``gs://bucket/prefix``).
        **storage_options: keyword arguments of the fsspec filesystem class (credentials,
            project, endpoint, ...). ``skip_instance_cache`` and ``use_listings_cache`` default
            to True and False: the session belongs to this storage, and listings must be fresh.

    Raises:
        ImportError: fsspec, or the package implementing the protocol, is not installed.
        ValueError: fsspec does not know the protocol.
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        protocol, sep, _ = url.partition("://")
        if not sep or not protocol:
            raise ValueError(f"not an fsspec URL (protocol://path): {url!r}")
        fsspec = require("fsspec", protocol)
        try:
            self._cls = fsspec.get_filesystem_class(protocol)
        except ValueError as exc:
            raise ValueError(
                f"unsupported checkpoint location {url!r}: no backend for {protocol}://"
            ) from exc
        except ImportError as exc:
            raise ImportError(
                f"{protocol}:// checkpoint locations need the fsspec implementation for "
                f"{protocol}: {exc}"
            ) from exc
        self.protocol = protocol
        self.uri = url.rstrip("/") or url
        self.root = self._cls._strip_protocol(url).rstrip("/")
        self.storage_options = {**self._cls._get_kwargs_from_urls(url), **storage_options}
        self.is_async = bool(getattr(self._cls, "async_impl", False))
        self._fs: Any = None
        self._session: Any = None

    def __repr__(self) -> str:
        return f"FsspecStorage({self.uri!r})"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def uri_of(self, name: str) -> str:
        return f"{self.uri}/{name}"

    # -- session and calls -----------------------------------------------------------------------
    async def open(self, *, writer: bool) -> None:
        if self._fs is not None:
            return
        if self.is_async:
            require_asyncio(self.uri, f"the fsspec filesystem for {self.protocol}:// is "
                            "asynchronous and runs only on asyncio")
        options = dict(self.storage_options)
        options.setdefault("skip_instance_cache", True)
        options.setdefault("use_listings_cache", False)
        try:
            if self.is_async:
                self._fs = self._cls(asynchronous=True, **options)
                set_session = getattr(self._fs, "set_session", None)
                if set_session is not None:
                    self._session = await set_session()
            else:
                self._fs = await anyio.to_thread.run_sync(partial(self._cls, **options))
            if writer:
                await self._call("makedirs", "create", self.uri, self.root, exist_ok=True)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            if isinstance(exc, Exception) and not isinstance(exc, StorageError):
                raise self._error(exc, "open", self.uri) from exc
            raise

    async def aclose(self) -> None:
        session, self._session, self._fs = self._session, None, None
        close = getattr(session, "close", None)
        if close is None:
            return
        try:
            result = close()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            logger.debug("closing the session of %s failed: %r", self.uri, exc)

    def _error(self, exc: Exception, action: str, uri: str) -> Exception:
        if isinstance(exc, FileNotFoundError):
            return FileNotFoundError(errno.ENOENT, f"no such object: {uri}", uri)
        cls = TransientStorageError if caused_by(exc, _transient_types()) else StorageError
        return cls(f"cannot {action} {uri}: {type(exc).__name__}: {exc}", uri)

    async def _call(self, method: str, action: str, uri: str, *args: Any, **kwargs: Any) -> Any:
        """``fs._<method>`` (async filesystems) or ``fs.<method>`` in a worker thread."""
        fs = self._fs
        if fs is None:
            raise StorageError(f"{self!r} is not open (call open() first)", self.uri)
        if not self.is_async:
            return await self._in_thread(partial(getattr(fs, method), *args, **kwargs), action,
                                         uri)
        try:
            return await getattr(fs, f"_{method}")(*args, **kwargs)
        except Exception as exc:
            raise self._error(exc, action, uri) from exc

    # -- the Storage interface -------------------------------------------------------------------
    async def write(self, name: str, chunks: AsyncIterable[Buffer]) -> int:
        uri = self.uri_of(name)
        tmp = self._path(f"{TMP_PREFIX}{uuid.uuid4().hex[:16]}")
        try:
            if self.is_async:
                data = bytearray()
                async for chunk in chunks:
                    data += memoryview(chunk).cast("B")
                written = len(data)
                payload, data = bytes(data), bytearray()
                await self._call("pipe_file", "write", uri, tmp, payload)
                del payload
            else:
                written = await self._stream_to(tmp, uri, chunks)
            await commit_shielded(uri, lambda: self._call(
                "mv_file" if self.is_async else "mv", "publish", uri, tmp, self._path(name)))
        except BaseException:
            with anyio.CancelScope(shield=True):
                try:
                    await self._call("rm_file", "remove", uri, tmp)
                except (FileNotFoundError, StorageError):
                    pass  # never written, or left to cleanup_temporaries
            raise
        return written

    async def _stream_to(self, path: str, uri: str, chunks: AsyncIterable[Buffer]) -> int:
        """Write ``chunks`` through a sync filesystem's file object (one thread hop a chunk)."""
        f = await self._call("open", "write", uri, path, "wb")
        written = 0
        try:
            async for chunk in chunks:
                view = memoryview(chunk).cast("B")
                # f.write copies the bytes before returning, while the chunk is still valid.
                await self._in_thread(f.write, "write", uri, view)
                written += view.nbytes
            await self._in_thread(f.close, "write", uri)
        except BaseException:
            with anyio.CancelScope(shield=True):
                try:  # the caller removes what closing commits under the temporary name
                    await anyio.to_thread.run_sync(f.close)
                except Exception:
                    pass
            raise
        return written

    async def _in_thread(self, fn: Any, action: str, uri: str, *args: Any) -> Any:
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        except Exception as exc:
            raise self._error(exc, action, uri) from exc

    async def read_bytes(self, name: str, max_bytes: int | None = None) -> bytes:
        check_max_bytes(max_bytes)
        uri, path = self.uri_of(name), self._path(name)
        if max_bytes is not None:
            size = int(await self._call("size", "read", uri, path))
            if size > max_bytes:
                raise ObjectTooLargeError(uri, max_bytes, size)
        data = bytes(await self._call("cat_file", "read", uri, path))
        if max_bytes is not None and len(data) > max_bytes:  # replaced since the size was read
            raise ObjectTooLargeError(uri, max_bytes)
        return data

    async def read_stream(self, name: str, chunk_size: int = 8 << 20,
                          max_bytes: int | None = None) -> AsyncIterator[bytes]:
        check_max_bytes(max_bytes)
        uri, path = self.uri_of(name), self._path(name)
        size = int(await self._call("size", "read", uri, path))
        if max_bytes is not None and size > max_bytes:
            raise ObjectTooLargeError(uri, max_bytes, size)
        for start in range(0, size, chunk_size):  # ranges within the size checked
            end = min(size, start + chunk_size)
            yield bytes(await self._call("cat_file", "read", uri, path, start=start, end=end))

    async def delete(self, name: str) -> None:
        try:
            await self._call("rm_file", "delete", self.uri_of(name), self._path(name))
        except FileNotFoundError:
            pass

    async def list(self) -> builtins.list[str]:
        try:
            entries = await self._call("ls", "list", self.uri, self.root, detail=False)
        except FileNotFoundError:
            return []
        prefix = self.root.rstrip("/") + "/"
        names = []
        for entry in entries:
            path = str(entry).rstrip("/")
            path = self._cls._strip_protocol(path) if "://" in path else path
            if path.startswith(prefix) and "/" not in path[len(prefix):]:
                names.append(path[len(prefix):])
        return sorted(n for n in names if n)

    async def exists(self, name: str) -> bool:
        return bool(await self._call("exists", "look up", self.uri_of(name), self._path(name)))
