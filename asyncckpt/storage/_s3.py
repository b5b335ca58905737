"""S3 backend: s3fs's async client on the writer's event loop, streaming multipart uploads.

::

    write(name, chunks)
      chunks ─copy─▶ part buffer (part_size) ─full─▶ upload_part ┐  at most max_concurrency
        │                (pooled, reused)                        ├─ in flight while chunks
        │                                                        ┘  keep arriving
        ├ stream ended before the first part filled ──▶ put_object (one PUT)
        ├ stream ended ──▶ last (short) part ──▶ complete_multipart_upload ──▶ visible
        └ chunks raised / a part failed / cancelled ──▶ abort_multipart_upload (shielded)

An object becomes visible only when its single PUT or its multipart completion succeeds, so a
reader sees the old object (or none) or the whole new one. There is no lock on S3: one writer per
prefix is assumed, and a writer that opens a prefix aborts the multipart uploads it finds in
flight there (:meth:`S3Storage.cleanup_temporaries`).

Retries are bounded and happen in two layers. Every S3 request is attempted at most
``max_attempts`` times here, with exponential backoff and jitter, when it fails with a transient
error (HTTP 500/502/503/504, throttling such as ``SlowDown``, connection resets, timeouts);
botocore's own retries default to off and s3fs's retry loop is set to a single attempt, so
nothing multiplies behind our back. On top of that, the writer retries a whole failed
checkpoint (``max_retries`` of the checkpointer). Permanent errors (``AccessDenied``,
``NoSuchBucket``, ``InvalidAccessKeyId``, ``SignatureDoesNotMatch``, ...) fail at once.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import functools
import hashlib
import io
import logging
import random
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from .._errors import StorageError, TransientStorageError
from ._base import Buffer, Storage
from ._remote import caused_by, commit_shielded, require

if TYPE_CHECKING:
    from s3fs import S3FileSystem

__all__ = ["S3Storage"]

logger = logging.getLogger("asyncckpt")
T = TypeVar("T")

MiB = 1 << 20
#: S3's smallest part (all parts but the last) and its largest part count.
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
DEFAULT_PART_SIZE = 16 * MiB
DEFAULT_MAX_CONCURRENCY = 4
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_RETRY_BACKOFF = 0.2
_MAX_BACKOFF = 5.0
#: An abort of a failed upload gets this long (seconds) even while the caller is cancelled;
#: what it cannot abort, the next writer's cleanup_temporaries() does.
_ABORT_TIMEOUT = 30.0
#: aiohttp warns about (and pushes in one piece) bytes bodies above 1 MiB; larger bodies go as
#: file objects, which it streams.
_INLINE_BODY_MAX = MiB

#: HTTP statuses and S3 error codes worth retrying.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
    "ThrottledException", "RequestThrottled", "RequestThrottledException",
    "TooManyRequestsException", "RequestLimitExceeded", "RequestTimeout",
    "RequestTimeoutException", "PriorRequestNotComplete", "OperationAborted",
    "BandwidthLimitExceeded", "EC2ThrottledException",
})
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


def _client_error(exc: BaseException) -> tuple[str, int] | None:
    """(error code, HTTP status) of the botocore ClientError in ``exc``'s cause chain."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, Mapping) and "Error" in response:
            code = str(response.get("Error", {}).get("Code", ""))
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return code, status
        seen = seen.__cause__
    return None


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code behind ``exc`` (``"NoSuchUpload"``, ...), if it came from S3."""
    found = _client_error(exc)
    return None if found is None else found[0]


@functools.cache
def _transient_types() -> tuple[type[BaseException], ...]:
    """Network-level failures: timeouts, resets, refused or dropped connections, garbled
    responses (throttling responses are sometimes cut short)."""
    import aiohttp
    import botocore.exceptions as bce
    from botocore.parsers import ResponseParserError
    from fsspec.exceptions import FSTimeoutError

    return (TimeoutError, asyncio.TimeoutError, ConnectionError, bce.ConnectionError,
            bce.HTTPClientError, ResponseParserError, aiohttp.ClientConnectionError,
            aiohttp.ClientPayloadError, FSTimeoutError)


def translate_error(exc: Exception, action: str, uri: str) -> Exception:
    """Map an s3fs/botocore failure to FileNotFoundError, TransientStorageError or StorageError.

    Args:
        exc: what the S3 call raised (s3fs chains the botocore error as ``__cause__``).
        action: what was being done, for the message (``"read"``, ``"upload part 3 of"``).
        uri: the ``s3://bucket/key`` concerned.
    """
    found = _client_error(exc)
    if found is not None:
        code, status = found
        if code in _MISSING_KEY_CODES:
            return FileNotFoundError(errno.ENOENT, f"no such object: {uri}", uri)
        detail = exc.__cause__ or exc
        message = f"cannot {action} {uri}: {code or 'error'} (HTTP {status}): {detail}"
        if status == 403:
            message += " (access denied: check the credentials and the bucket's policy)"
        if code == "NoSuchBucket":
            bucket = uri.split("/")[2]
            message = f"cannot {action} {uri}: the bucket {bucket!r} does not exist (NoSuchBucket)"
        transient = code in TRANSIENT_CODES or status in TRANSIENT_STATUSES
        return (TransientStorageError if transient else StorageError)(message, uri)
    reason = f"{type(exc).__name__}: {exc}"
    if caused_by(exc, _transient_types()):
        return TransientStorageError(f"cannot {action} {uri}: {reason}", uri)
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(errno.ENOENT, f"no such object: {uri}", uri)
    return StorageError(f"cannot {action} {uri}: {reason}", uri)


def _expected_multipart_etag(etags: builtins.list[str]) -> str:
    """The ETag S3 gives an object completed from parts with these ETags (plain uploads)."""
    digest = hashlib.md5(usedforsecurity=False)
    for etag in etags:
        digest.update(bytes.fromhex(etag.strip('"')))
    return f'"{digest.hexdigest()}-{len(etags)}"'


def _body(data: bytes) -> bytes | io.BytesIO:
    return data if len(data) <= _INLINE_BODY_MAX else io.BytesIO(data)


class _PartPool:
    """Part buffers reused across uploads, so steady-state saves allocate nothing.

    At most ``max_concurrency + 1`` exist: the one being filled and those in flight. A fresh
    buffer grows as it is filled (small objects never cost a whole part); once full it keeps its
    size, and reused buffers are overwritten in place.
    """

    def __init__(self) -> None:
        self._free: builtins.list[io.BytesIO] = []
        self.created = 0  # buffers made so far (tests check the memory bound with it)

    def take(self) -> io.BytesIO:
        if self._free:
            buf = self._free.pop()
            buf.seek(0)
            return buf
        self.created += 1
        return io.BytesIO()

    def give_back(self, buf: io.BytesIO) -> None:
        self._free.append(buf)

    def clear(self) -> None:
        self._free.clear()
        self.created = 0


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
        self._fs: S3FileSystem | None = None
        self._client: Any = None
        self._parts = _PartPool()
        self._unaborted: builtins.list[tuple[str, str]] = []  # (key, upload id) to abort again

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
            StorageError: the bucket does not exist or cannot be accessed.
        """
        if self._fs is not None:
            return
        s3fs = require("s3fs", "s3")
        options = dict(self.storage_options)
        config = dict(options.pop("config_kwargs", None) or {})
        # One retry layer (ours, see the module docstring) instead of three multiplied ones.
        config.setdefault("retries", {"mode": "standard", "total_max_attempts": 1})
        fs = s3fs.S3FileSystem(asynchronous=True, skip_instance_cache=True,
                               config_kwargs=config, **options)
        fs.retries = 1
        try:
            self._client = await self._request("connect to", self.uri,
                                               lambda: fs.set_session())
            self._fs = fs
            if writer:
                await self._check_bucket()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise

    async def _check_bucket(self) -> None:
        try:
            await self._call("head_bucket", "open", self.uri, Bucket=self.bucket)
        except FileNotFoundError as exc:  # HEAD responses carry no error code, only the 404
            raise StorageError(
                f"cannot open {self.uri}: the bucket {self.bucket!r} does not exist "
                "(asyncckpt does not create buckets)", self.uri) from exc

    async def aclose(self) -> None:
        if self._unaborted and self._fs is not None:
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = anyio.current_time() + _ABORT_TIMEOUT
                await self._abort_again()
            for key, upload_id in self._unaborted:
                logger.error("the multipart upload %s of s3://%s/%s could not be aborted; its "
                             "parts are billed until the next writer of %s aborts it",
                             upload_id, self.bucket, key, self.uri)
        client, self._client, self._fs = self._client, None, None
        self._parts.clear()
        if client is not None:
            try:
                await client.close()
            except Exception as exc:  # nothing left to do with a broken session
                logger.debug("closing the S3 client for %s failed: %r", self.uri, exc)

    # -- requests and retries --------------------------------------------------------------------
    async def _request(self, action: str, uri: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one S3 request (``fn``) with up to ``max_attempts`` attempts on transient errors.

        Raises:
            FileNotFoundError: the key does not exist.
            TransientStorageError: still failing transiently after the last attempt.
            StorageError: a permanent failure.
        """
        attempt = 1
        while True:
            try:
                return await fn()
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

    def _session(self) -> S3FileSystem:
        if self._fs is None:
            raise StorageError(f"{self!r} is not open (call open() first)", self.uri)
        return self._fs

    async def _call(self, method: str, action: str, uri: str, **kwargs: Any) -> Any:
        """One S3 API call through s3fs (``_call_s3`` adds s3_additional_kwargs), retried."""
        fs = self._session()
        body = kwargs.get("Body")

        async def attempt() -> Any:
            if isinstance(body, io.BytesIO):
                body.seek(0)  # a retry sends the body from its start again
            return await fs._call_s3(method, **kwargs)

        return await self._request(action, uri, attempt)

    # -- writing ---------------------------------------------------------------------------------
    async def write(self, name: str, chunks: AsyncIterable[Buffer]) -> int:
        key = self.key_of(name)
        uri = self.uri_of(name)
        part_size = self.part_size
        pool = self._parts
        current = pool.take()
        fill = 0
        total = 0
        upload_id: str | None = None
        etags: dict[int, str] = {}
        numbered = 0
        source_error: Exception | None = None
        part_errors: builtins.list[Exception] = []
        try:
            async with anyio.create_task_group() as tg:
                in_flight = anyio.Semaphore(self.max_concurrency)

                async def send(number: int, body: io.BytesIO, upload: str) -> None:
                    try:
                        etags[number] = await self._upload_part(key, upload, number, body)
                    except Exception as exc:
                        part_errors.append(exc)
                        tg.cancel_scope.cancel()
                    finally:
                        pool.give_back(body)
                        in_flight.release()

                try:
                    async for chunk in chunks:
                        view = memoryview(chunk).cast("B")
                        total += view.nbytes
                        while view.nbytes:
                            # Copy now: the chunk may point into snapshot memory that is valid
                            # only until write() returns.
                            n = min(part_size - fill, view.nbytes)
                            current.write(view[:n])
                            fill += n
                            view = view[n:]
                            if fill < part_size:
                                continue
                            if upload_id is None:
                                upload_id = await self._create_upload(key, uri)
                            numbered += 1
                            if numbered > MAX_PARTS:
                                raise self._too_large(uri)
                            await in_flight.acquire()
                            current.seek(0)
                            tg.start_soon(send, numbered, current, upload_id)
                            current, fill = pool.take(), 0
                except Exception as exc:  # the chunks' own error (or a failed create)
                    source_error = exc
                    tg.cancel_scope.cancel()
            if source_error is not None:
                raise source_error
            if part_errors:
                raise part_errors[0]
            with current.getbuffer() as filled:
                tail = bytes(filled[:fill])
            pool.give_back(current)
            if upload_id is None:
                await commit_shielded(uri, lambda: self._call(
                    "put_object", "write", uri, Bucket=self.bucket, Key=key, Body=_body(tail)))
                if self._unaborted:  # the endpoint answers again: abort what could not be
                    await self._abort_again()
                return total
            if tail:
                numbered += 1
                if numbered > MAX_PARTS:
                    raise self._too_large(uri)
                etags[numbered] = await self._upload_part(key, upload_id, numbered, _body(tail))
            parts, uid = [etags[n] for n in range(1, numbered + 1)], upload_id
            await commit_shielded(uri, lambda: self._complete(key, uri, uid, parts))
            upload_id = None
            if self._unaborted:  # the endpoint answers again: abort what could not be aborted
                await self._abort_again()
        except BaseException:
            if upload_id is not None:
                with anyio.CancelScope(shield=True) as scope:
                    scope.deadline = anyio.current_time() + _ABORT_TIMEOUT
                    await self._abort(key, upload_id)
            raise
        return total

    def _too_large(self, uri: str) -> StorageError:
        return StorageError(
            f"cannot write {uri}: it needs more than {MAX_PARTS} parts of {self.part_size} "
            "bytes (S3's limit); pass a larger part_size in storage_options", uri)

    async def write_bytes(self, name: str, data: Buffer) -> int:
        payload = bytes(data)
        if len(payload) >= self.part_size:
            return await super().write_bytes(name, payload)
        await self._call("put_object", "write", self.uri_of(name), Bucket=self.bucket,
                         Key=self.key_of(name), Body=_body(payload))
        return len(payload)

    async def _create_upload(self, key: str, uri: str) -> str:
        fs = self._session()
        attempts = 0

        async def attempt() -> Any:
            nonlocal attempts
            attempts += 1
            return await fs._call_s3("create_multipart_upload", Bucket=self.bucket, Key=key)

        response = await self._request("start a multipart upload of", uri, attempt)
        upload_id = str(response["UploadId"])
        if attempts > 1:
            # A failed attempt may have created an upload and lost only the answer: abort it
            # now instead of leaving it to the next writer (one writer per prefix, so every
            # other upload of this key is ours).
            try:
                await self._abort_uploads(key, keep=upload_id)
            except StorageError as exc:
                logger.warning("could not look for orphaned uploads of %s: %s", uri, exc)
        return upload_id

    async def _abort_uploads(self, prefix: str, *, keep: str | None = None,
                             exact: bool = True) -> builtins.list[str]:
        """Abort the uploads of key ``prefix`` (or, unless ``exact``, of names directly under
        it), except ``keep``; return the aborted keys."""
        aborted: builtins.list[str] = []
        markers: dict[str, str] = {}
        uri = f"s3://{self.bucket}/{prefix}"
        while True:
            page = await self._call("list_multipart_uploads", "list uploads under", uri,
                                    Bucket=self.bucket, Prefix=prefix, **markers)
            for upload in page.get("Uploads", ()):
                key, rest = upload["Key"], upload["Key"][len(prefix):]
                mine = not rest if exact else bool(rest) and "/" not in rest
                if mine and upload["UploadId"] != keep:
                    await self._abort(key, upload["UploadId"])
                    aborted.append(key)
            if not page.get("IsTruncated"):
                return aborted
            markers = {"KeyMarker": page.get("NextKeyMarker", ""),
                       "UploadIdMarker": page.get("NextUploadIdMarker", "")}

    async def _upload_part(self, key: str, upload_id: str, number: int,
                           body: io.BytesIO | bytes) -> str:
        response = await self._call(
            "upload_part", f"upload part {number} of", f"s3://{self.bucket}/{key}",
            Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)
        return str(response["ETag"])

    async def _complete(self, key: str, uri: str, upload_id: str,
                        etags: builtins.list[str]) -> None:
        parts = [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]
        try:
            await self._call("complete_multipart_upload", "complete the upload of", uri,
                             Bucket=self.bucket, Key=key, UploadId=upload_id,
                             MultipartUpload={"Parts": parts})
        except StorageError as exc:
            # A retried completion whose first try succeeded (only the response was lost)
            # finds the upload gone: the object is ours if its ETag is the one our parts make.
            if _error_code(exc) != "NoSuchUpload":
                raise
            try:
                head = await self._call("head_object", "check", uri, Bucket=self.bucket, Key=key)
            except FileNotFoundError:
                raise exc from None
            if head.get("ETag") != _expected_multipart_etag(etags):
                raise
            logger.info("%s: completion retried after a lost response; the object is ours", uri)

    async def _abort(self, key: str, upload_id: str, *, again: bool = False) -> bool:
        """Abort an upload; False if it failed (it is then retried after the next write and
        at close, else left to the next writer's cleanup)."""
        uri = f"s3://{self.bucket}/{key}"
        try:
            await self._call("abort_multipart_upload", "abort the upload of", uri,
                             Bucket=self.bucket, Key=key, UploadId=upload_id)
        except FileNotFoundError:
            pass
        except Exception as exc:  # the error that made us abort is the one to report
            if _error_code(exc) != "NoSuchUpload":
                if not again:
                    logger.warning("could not abort the multipart upload of %s (retried later):"
                                   " %s", uri, exc)
                    self._unaborted.append((key, upload_id))
                return False
        return True

    async def _abort_again(self) -> None:
        pending, self._unaborted = self._unaborted, []
        for i, (key, upload_id) in enumerate(pending):
            try:
                if not await self._abort(key, upload_id, again=True):
                    self._unaborted.append((key, upload_id))
            except BaseException:  # cancelled: keep what is left for later
                self._unaborted += pending[i:]
                raise

    # -- reading ---------------------------------------------------------------------------------
    async def _get(self, name: str, **kwargs: Any) -> bytes:
        key, uri = self.key_of(name), self.uri_of(name)
        fs = self._session()

        async def attempt() -> bytes:
            response = await fs._call_s3("get_object", Bucket=self.bucket, Key=key, **kwargs)
            async with response["Body"] as body:
                return bytes(await body.read())

        return await self._request("read", uri, attempt)

    async def read_bytes(self, name: str) -> bytes:
        return await self._get(name)

    async def read_stream(self, name: str, chunk_size: int = 8 << 20) -> AsyncIterator[bytes]:
        uri = self.uri_of(name)
        head = await self._call("head_object", "read", uri, Bucket=self.bucket,
                                Key=self.key_of(name))
        size, etag = int(head["ContentLength"]), head.get("ETag")
        pin = {"IfMatch": etag} if etag else {}
        for start in range(0, size, chunk_size):
            end = min(size, start + chunk_size) - 1
            try:
                yield await self._get(name, Range=f"bytes={start}-{end}", **pin)
            except StorageError as exc:
                if _error_code(exc) == "PreconditionFailed":
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

    async def list(self) -> builtins.list[str]:
        names: builtins.list[str] = []
        token: dict[str, str] = {}
        while True:
            page = await self._call("list_objects_v2", "list", self.uri, Bucket=self.bucket,
                                    Prefix=self._dir, Delimiter="/", **token)
            names.extend(o["Key"][len(self._dir):] for o in page.get("Contents", ()))
            if not page.get("IsTruncated"):
                break
            token = {"ContinuationToken": page["NextContinuationToken"]}
        return sorted(n for n in names if n)

    # -- deleting --------------------------------------------------------------------------------
    async def delete(self, name: str) -> None:
        try:
            await self._call("delete_object", "delete", self.uri_of(name), Bucket=self.bucket,
                             Key=self.key_of(name))
        except FileNotFoundError:
            pass

    async def cleanup_temporaries(self) -> builtins.list[str]:
        """Abort the multipart uploads in flight under this prefix; return their names.

        Safe only because one writer per prefix is assumed: another live writer's upload would
        be aborted too.
        """
        try:
            aborted = await self._abort_uploads(self._dir, exact=False)
        except StorageError as exc:  # e.g. no s3:ListBucketMultipartUploads: write all the same
            logger.warning("could not look for unfinished uploads under %s (they are not "
                           "cleaned up): %s", self.uri, exc)
            return []
        return [key[len(self._dir):] for key in aborted]
