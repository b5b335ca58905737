"""Helpers shared by the remote backends (S3, generic fsspec): optional imports, error chains."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from .._errors import StorageError, TransientStorageError

__all__ = ["COMMIT_TIMEOUT", "caused_by", "commit_shielded", "require", "require_asyncio"]

T = TypeVar("T")

#: seconds a commit request (S3 CompleteMultipartUpload / PutObject, an fsspec move) may take
COMMIT_TIMEOUT = 600.0


def require(module: str, scheme: str) -> Any:
    """Import an optional dependency of the ``scheme://`` backends, or say which extra has it.

    Raises:
        ImportError: the module is missing; the message names ``pip install 'asyncckpt[s3]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{scheme}:// checkpoint locations need the optional dependency {module!r}: "
            "pip install 'asyncckpt[s3]'"
        ) from exc


def require_asyncio(uri: str, reason: str) -> None:
    """Check that the caller runs on an asyncio event loop (``reason`` says who needs it).

    s3fs (through aiobotocore and aiohttp) and the other async fsspec filesystems are written
    for asyncio; on trio they would fail somewhere deep inside, or never answer.

    Raises:
        StorageError: the running event loop is not asyncio's.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        library = "another event loop"
        try:
            import sniffio

            library = sniffio.current_async_library()
        except Exception:  # sniffio missing or no library detected: the generic words stand
            pass
        raise StorageError(
            f"cannot open {uri} on {library}: {reason}. Run this code "
            "with anyio.run(..., backend='asyncio'), or use the sync asyncckpt.Checkpointer, "
            "which runs its own asyncio loop in a thread", uri) from None


def caused_by(exc: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    """Whether ``exc`` or an exception in its ``__cause__`` chain is one of ``types``.

    s3fs and fsspec translate backend errors into ``OSError`` subclasses and chain the
    original, so the original is where the truth is.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, types):
            return True
        seen = seen.__cause__
    return False


async def commit_shielded(uri: str, request: Callable[[], Awaitable[T]]) -> T:
    """Run the request that makes an object visible, shielded from cancellation.

    Once the server may have acted on it, the answer must be read: a cancellation (abandon
    at close, Ctrl-C) arriving meanwhile would otherwise report a committed object as
    cancelled -- left unlisted, or, for a re-save, the name unlisted with its old bytes gone.
    The cancellation is delivered at the caller's next await that is not shielded.

    Raises:
        TransientStorageError: no answer within :data:`COMMIT_TIMEOUT` seconds.
    """
    with anyio.CancelScope(shield=True) as scope:
        scope.deadline = anyio.current_time() + COMMIT_TIMEOUT
        return await request()
    raise TransientStorageError(f"cannot write {uri}: no answer to the commit within "
                                f"{COMMIT_TIMEOUT:.0f} s", uri)
