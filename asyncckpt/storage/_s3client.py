"""One S3 client session (s3fs, asynchronous) and the retry layer every S3 request goes through.

Every request is attempted at most ``max_attempts`` times, with exponential backoff and jitter,
when it fails with a transient error (HTTP 500/502/503/504, throttling such as ``SlowDown``,
connection resets, timeouts); botocore's own retries are turned off and s3fs's retry loop is
set to a single attempt, so nothing multiplies behind our back. Permanent errors
(``AccessDenied``, ``NoSuchBucket``, ``InvalidAccessKeyId``, ...) fail at once.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from .._errors import StorageError, TransientStorageError
from ._remote import require
from ._s3errors import translate_error

if TYPE_CHECKING:
    from s3fs import S3FileSystem

__all__ = ["S3Requests"]

logger = logging.getLogger("asyncckpt")
T = TypeVar("T")

_MAX_BACKOFF = 5.0


class S3Requests:
    """The client session of one :class:`~asyncckpt.storage.S3Storage` and its retried calls.

    Args:
        uri: the storage's ``s3://bucket/prefix`` (for messages).
        storage_options: keyword arguments of :class:`s3fs.S3FileSystem`.
        max_attempts: attempts per request on transient errors.
        retry_backoff: first delay between attempts (seconds), doubled per attempt.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any], max_attempts: int,
                 retry_backoff: float) -> None:
        self.uri = uri
        self.storage_options = storage_options
        self.max_attempts = max_attempts
        self.retry_backoff = retry_backoff
        self.fs: S3FileSystem | None = None
        self._client: Any = None

    async def connect(self) -> None:
        """Start the client session (on the running event loop, which owns it from now on)."""
        s3fs = require("s3fs", "s3")
        options = dict(self.storage_options)
        config = dict(options.pop("config_kwargs", None) or {})
        # One retry layer (ours, see the module docstring) instead of three multiplied ones.
        config.setdefault("retries", {"mode": "standard", "total_max_attempts": 1})
        fs = s3fs.S3FileSystem(asynchronous=True, skip_instance_cache=True,
                               config_kwargs=config, **options)
        fs.retries = 1
        self._client = await self.request("connect to", self.uri, lambda: fs.set_session())
        self.fs = fs

    async def close(self) -> None:
        """Close the client session (a broken one is dropped quietly)."""
        client, self._client, self.fs = self._client, None, None
        if client is not None:
            try:
                await client.close()
            except Exception as exc:  # nothing left to do with a broken session
                logger.debug("closing the S3 client for %s failed: %r", self.uri, exc)

    def session(self) -> S3FileSystem:
        """The open filesystem.

        Raises:
            StorageError: the storage is not open.
        """
        if self.fs is None:
            raise StorageError(f"S3Storage({self.uri!r}) is not open (call open() first)",
                               self.uri)
        return self.fs

    async def request(self, action: str, uri: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one S3 request (``fn``) with up to ``max_attempts`` attempts on transient errors.

        Errors asyncckpt raises itself inside ``fn`` (a :class:`StorageError`) pass unchanged.

        Raises:
            FileNotFoundError: the key does not exist.
            TransientStorageError: still failing transiently after the last attempt.
            StorageError: a permanent failure.
        """
        attempt = 1
        while True:
            try:
                return await fn()
            except StorageError:
                raise
            except Exception as exc:
                error = translate_error(exc, action, uri)
                if not isinstance(error, TransientStorageError) or attempt >= self.max_attempts:
                    raise error from exc
            delay = min(_MAX_BACKOFF, self.retry_backoff * 2 ** (attempt - 1))
            delay *= 0.5 + random.random()
            logger.debug("S3 %s %s failed transiently (attempt %d/%d); retrying in %.2fs",
                         action, uri, attempt, self.max_attempts, delay)
            attempt += 1
            await anyio.sleep(delay)

    async def call(self, method: str, action: str, uri: str, **kwargs: Any) -> Any:
        """One S3 API call through s3fs (``_call_s3`` adds s3_additional_kwargs), retried."""
        fs = self.session()
        body = kwargs.get("Body")

        async def attempt() -> Any:
            if isinstance(body, io.BytesIO):
                body.seek(0)  # a retry sends the body from its start again
            return await fs._call_s3(method, **kwargs)

        return await self.request(action, uri, attempt)
