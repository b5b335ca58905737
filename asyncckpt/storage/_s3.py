"""S3 backend: s3fs's async client on the writer's event loop, streaming multipart uploads.

Objects are written by streaming multipart uploads (``_s3upload``): an object becomes visible
only when its single PUT or its multipart completion succeeds, so a reader sees the old object
(or none) or the whole new one. There is no lock on S3: one writer per prefix is assumed, and a
writer that opens a prefix aborts the multipart uploads it finds in flight there
(:meth:`S3Storage.cleanup_temporaries`).

Retries are bounded and happen in two layers: every S3 request is attempted at most
``max_attempts`` times on transient errors (``_s3client``), and the writer retries a whole
failed checkpoint (``max_retries`` of the checkpointer). s3fs and aiobotocore run only on
asyncio: on another event loop (trio) :meth:`S3Storage.open` fails with a clear error.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import anyio

from .._errors import StorageError
from ._base import Buffer, Storage
from ._limits import ObjectTooLargeError, check_max_bytes
from ._remote import require, require_asyncio
from ._s3client import S3Requests
from ._s3errors import error_code
from ._s3upload import Uploads, body_of

__all__ = ["S3Storage"]

logger = logging.getLogger("asyncckpt")

MiB = 1 << 20
#: S3's smallest part (all parts but the last).
MIN_PART_SIZE = 5 * MiB
DEFAULT_PART_SIZE = 16 * MiB
DEFAULT_MAX_CONCURRENCY = 4
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_RETRY_BACKOFF = 0.2

_READ_PIECE = 8 << 20  # bytes asked of an HTTP body at a time


class S3Storage(Storage):
    """Checkpoints as objects under one S3 prefix, through s3fs's async API.

    Credentials, region and endpoint come from the usual places (``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ``~/.aws/config``, instance
    roles) or from ``storage_options``, which go to :class:`s3fs.S3FileSystem` unchanged
    (``key=``, ``secret=``, ``endpoint_url=``, ``client_kwargs={"region_name": ...}``,
    ``config_kwargs={"read_timeout": ...}``, ``s3_additional_kwargs={"ServerSideEncryption":
    ...}``, ...). One client session is opened per storage in :meth:`open` and closed in
    :meth:`aclose`, on the event loop that runs them.

    Args:
        uri: ``s3://bucket`` or ``s3://bucket/prefix`` (``s3a://`` is accepted too).
        part_size: bytes per multipart part (at least 5 MiB, S3's minimum); objects smaller than
            one part are written with a single PUT. An object may have at most 10,000 parts,
            so the largest checkpoint is ``part_size * 10_000`` (160 GB by default).
        max_concurrency: parts uploaded at once. Upload memory is at most
            ``part_size * (max_concurrency + 1)``, reused from save to save.
        max_attempts: attempts per S3 request on transient errors (1 = no retry here).
        retry_backoff: first delay between attempts, in seconds; doubled per attempt (capped at
            5 s), with jitter.
        **storage_options: keyword arguments of :class:`s3fs.S3FileSystem`.

    Raises:
        ImportError: s3fs is not installed (``pip install 'asyncckpt[s3]'``).
        ValueError: the URI or an option is invalid.
    """

    def __init__(
        self,
        uri: str,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_backoff: float = DEFAULT_RETRY_BACKOFF,
        **storage_options: Any,
    ) -> None:
        require("s3fs", "s3")
        scheme, sep, rest = uri.partition("://")
        if not sep or scheme.lower() not in ("s3", "s3a"):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"the S3 URI {uri!r} names no bucket (expected s3://bucket/prefix)")
        if "?" in rest or "#" in rest:
            raise ValueError(f"the S3 URI {uri!r} has a query or fragment; pass options in "
                             "storage_options instead")
        for name, value, low in (("part_size", part_size, MIN_PART_SIZE),
                                 ("max_concurrency", max_concurrency, 1),
                                 ("max_attempts", max_attempts, 1)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"S3 storage option {name} must be an int, got {value!r}")
            if value < low:
                raise ValueError(f"S3 storage option {name} must be >= {low}, got {value}")
        if isinstance(retry_backoff, bool) or not isinstance(retry_backoff, (int, float)) \
                or retry_backoff < 0:
            raise ValueError(f"S3 storage option retry_backoff must be a number >= 0, "
                             f"got {retry_backoff!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self.retry_backoff = float(retry_backoff)
        self.storage_options = dict(storage_options)
        self._s3 = S3Requests(self.uri, self.storage_options, max_attempts, self.retry_backoff)
        self._uploads = Uploads(self._s3, bucket, part_size, max_concurrency)

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r})"

    # -- keys and session ------------------------------------------------------------------------
    @property
    def _dir(self) -> str:
        """The key prefix of names in this storage ('' or 'prefix/')."""
        return f"{self.prefix}/" if self.prefix else ""

    def key_of(self, name: str) -> str:
        """The S3 key of ``name``."""
        return self._dir + name

    def uri_of(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key_of(name)}"

    async def open(self, *, writer: bool) -> None:
        """Start the client session; a writer also checks that the bucket is reachable.

        Raises:
            StorageError: the bucket does not exist or cannot be accessed, or the event loop
                is not asyncio's (s3fs runs only there).
        """
        if self._s3.fs is not None:
            return
        require_asyncio(self.uri, "s3fs and aiobotocore run only on asyncio")
        try:
            await self._s3.connect()
            if writer:
                await self._check_bucket()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise

    async def _check_bucket(self) -> None:
        try:
            await self._s3.call("head_bucket", "open", self.uri, Bucket=self.bucket)
        except FileNotFoundError as exc:  # HEAD responses carry no error code, only the 404
            raise StorageError(
                f"cannot open {self.uri}: the bucket {self.bucket!r} does not exist "
                "(asyncckpt does not create buckets)", self.uri) from exc

    async def aclose(self) -> None:
        await self._uploads.close(self.uri)
        await self._s3.close()

    async def _call(self, method: str, action: str, uri: str, **kwargs: Any) -> Any:
        """One S3 API call through s3fs, retried on transient errors."""
        return await self._s3.call(method, action, uri, **kwargs)

    # -- writing ---------------------------------------------------------------------------------
    async def write(self, name: str, chunks: AsyncIterable[Buffer]) -> int:
        return await self._uploads.write(self.key_of(name), self.uri_of(name), chunks)

    async def write_bytes(self, name: str, data: Buffer) -> int:
        payload = bytes(data)
        if len(payload) >= self.part_size:
            return await super().write_bytes(name, payload)
        await self._call("put_object", "write", self.uri_of(name), Bucket=self.bucket,
                         Key=self.key_of(name), Body=body_of(payload))
        return len(payload)

    # -- reading ---------------------------------------------------------------------------------
    async def _get(self, name: str, max_bytes: int | None = None, **kwargs: Any) -> bytes:
        key, uri = self.key_of(name), self.uri_of(name)
        fs = self._s3.session()

        async def attempt() -> bytes:
            response = await fs._call_s3("get_object", Bucket=self.bucket, Key=key, **kwargs)
            async with response["Body"] as body:
                if max_bytes is None:
                    return bytes(await body.read())
                length = response.get("ContentLength")
                if length is not None and int(length) > max_bytes:
                    raise ObjectTooLargeError(uri, max_bytes, int(length))
                # read(n) returns what has arrived, up to n: read until the end (or one byte
                # past the limit), never taking one short read for the whole object
                parts: list[bytes] = []
                total = 0
                while total <= max_bytes:
                    part = await body.read(min(_READ_PIECE, max_bytes + 1 - total))
                    if not part:
                        break
                    parts.append(bytes(part))
                    total += len(part)
                if total > max_bytes:
                    raise ObjectTooLargeError(uri, max_bytes)
                return b"".join(parts)

        return await self._s3.request("read", uri, attempt)

    async def read_bytes(self, name: str, max_bytes: int | None = None) -> bytes:
        check_max_bytes(max_bytes)
        return await self._get(name, max_bytes)

    async def read_stream(self, name: str, chunk_size: int = 8 << 20,
                          max_bytes: int | None = None) -> AsyncIterator[bytes]:
        check_max_bytes(max_bytes)
        uri = self.uri_of(name)
        head = await self._call("head_object", "read", uri, Bucket=self.bucket,
                                Key=self.key_of(name))
        size, etag = int(head["ContentLength"]), head.get("ETag")
        if max_bytes is not None and size > max_bytes:
            raise ObjectTooLargeError(uri, max_bytes, size)
        pin = {"IfMatch": etag} if etag else {}  # the size checked is the size read
        for start in range(0, size, chunk_size):
            end = min(size, start + chunk_size) - 1
            try:
                yield await self._get(name, Range=f"bytes={start}-{end}", **pin)
            except StorageError as exc:
                if error_code(exc) == "PreconditionFailed":
                    raise StorageError(f"{uri} was replaced while it was being read", uri) \
                        from exc
                raise

    async def exists(self, name: str) -> bool:
        try:
            await self._call("head_object", "look up", self.uri_of(name), Bucket=self.bucket,
                             Key=self.key_of(name))
        except FileNotFoundError:
            return False
        return True

    async def _pages(self, prefix: str, **delimiter: str) -> AsyncIterator[dict[str, Any]]:
        """The pages of a listing of the keys that start with ``prefix``."""
        token: dict[str, str] = {}
        while True:
            uri = self.uri if prefix == self._dir else f"s3://{self.bucket}/{prefix}"
            page = await self._call("list_objects_v2", "list", uri, Bucket=self.bucket,
                                    Prefix=prefix, **delimiter, **token)
            yield page
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    async def list(self) -> builtins.list[str]:
        names: builtins.list[str] = []
        async for page in self._pages(self._dir, Delimiter="/"):
            names.extend(o["Key"][len(self._dir):] for o in page.get("Contents", ()))
        return sorted(n for n in names if n)

    # -- deleting --------------------------------------------------------------------------------
    async def delete(self, name: str) -> None:
        """Remove the object ``name`` and, for a multi-rank checkpoint, the objects under
        ``name/`` (one listing more per deletion)."""
        try:
            await self._call("delete_object", "delete", self.uri_of(name), Bucket=self.bucket,
                             Key=self.key_of(name))
        except FileNotFoundError:
            pass
        for key in await self._keys_under(self.key_of(name) + "/"):
            await self._delete_key(key)

    async def _delete_key(self, key: str) -> None:
        uri = f"s3://{self.bucket}/{key}"
        try:
            await self._call("delete_object", "delete", uri, Bucket=self.bucket, Key=key)
        except FileNotFoundError:
            pass

    async def _keys_under(self, prefix: str) -> builtins.list[str]:
        """Every key that starts with ``prefix`` (nested ones too)."""
        return [o["Key"] async for page in self._pages(prefix) for o in page.get("Contents", ())]

    async def folders(self) -> builtins.list[str]:
        """The names of the folders directly under this prefix (keys ``<name>/...``)."""
        names = [p["Prefix"][len(self._dir):].rstrip("/")
                 async for page in self._pages(self._dir, Delimiter="/")
                 for p in page.get("CommonPrefixes", ())]
        return sorted(n for n in names if n)

    async def files_in(self, folder: str) -> builtins.list[str]:
        """The names of the objects under ``folder/`` (relative to it, nested ones too)."""
        start = self.key_of(folder) + "/"
        return sorted(key[len(start):] for key in await self._keys_under(start))

    async def abort_uploads_in_folders(self) -> builtins.list[str]:
        """Abort the multipart uploads in flight in folders under this prefix (a writer that
        died mid-save); return their names. One writer per prefix is assumed."""
        aborted = await self._uploads.abort_under(self._dir, exact=False, nested=True)
        return [key[len(self._dir):] for key in aborted]

    async def cleanup_temporaries(self) -> builtins.list[str]:
        """Abort the multipart uploads in flight under this prefix; return their names.

        Safe only because one writer per prefix is assumed: another live writer's upload would
        be aborted too.
        """
        try:
            aborted = await self._uploads.abort_under(self._dir, exact=False)
        except StorageError as exc:  # e.g. no s3:ListBucketMultipartUploads: write all the same
            logger.warning("could not look for unfinished uploads under %s (they are not "
                           "cleaned up): %s", self.uri, exc)
            return []
        return [key[len(self._dir):] for key in aborted]
