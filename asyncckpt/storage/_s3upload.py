"""Streaming multipart uploads to S3: parts in flight while chunks arrive, commit, abort.

::

    write(key, chunks)
      chunks ─copy─▶ part buffer (part_size) ─full─▶ upload_part ┐  at most max_concurrency
        │                (pooled, reused)                        ├─ in flight while chunks
        │                                                        ┘  keep arriving
        ├ stream ended before the first part filled ──▶ put_object (one PUT)
        ├ stream ended ──▶ last (short) part ──▶ complete_multipart_upload ──▶ visible
        └ chunks raised / a part failed / cancelled ──▶ abort_multipart_upload (shielded)

An object becomes visible only when its single PUT or its multipart completion succeeds, so a
reader sees the old object (or none) or the whole new one. An abort that fails is retried after
the next successful write and at close; what is still left, the next writer's cleanup aborts.
"""

from __future__ import annotations

import builtins
import io
import logging
from collections.abc import AsyncIterable
from typing import Any

import anyio

from .._errors import StorageError
from ._base import Buffer
from ._remote import commit_shielded
from ._s3client import S3Requests
from ._s3errors import error_code, expected_multipart_etag

__all__ = ["MAX_PARTS", "PartPool", "Uploads", "body_of"]

logger = logging.getLogger("asyncckpt")

#: S3's largest part count.
MAX_PARTS = 10_000
#: An abort of a failed upload gets this long (seconds) even while the caller is cancelled;
#: what it cannot abort, the next writer's cleanup_temporaries() does.
_ABORT_TIMEOUT = 30.0
#: aiohttp warns about (and pushes in one piece) bytes bodies above 1 MiB; larger bodies go as
#: file objects, which it streams.
_INLINE_BODY_MAX = 1 << 20


def body_of(data: bytes) -> bytes | io.BytesIO:
    """A request body for ``data``: bytes when small, a file object (streamed) when large."""
    return data if len(data) <= _INLINE_BODY_MAX else io.BytesIO(data)


class PartPool:
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


class Uploads:
    """The multipart uploads of one S3 storage (one writer per prefix is assumed).

    Args:
        s3: the storage's session and retried calls.
        bucket: the bucket.
        part_size: bytes per part (all but the last).
        max_concurrency: parts uploaded at once.
    """

    def __init__(self, s3: S3Requests, bucket: str, part_size: int,
                 max_concurrency: int) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.parts = PartPool()
        self.unaborted: builtins.list[tuple[str, str]] = []  # (key, upload id) to abort again

    # -- one object ------------------------------------------------------------------------------
    async def write(self, key: str, uri: str, chunks: AsyncIterable[Buffer]) -> int:
        """Publish ``key`` with the concatenated ``chunks`` (see the module docstring)."""
        part_size, pool = self.part_size, self.parts
        current = pool.take()
        fill = total = numbered = 0
        upload_id: str | None = None
        etags: dict[int, str] = {}
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
                                upload_id = await self._create(key, uri)
                            numbered = self._next_part(numbered, uri)
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
                await commit_shielded(uri, lambda: self.s3.call(
                    "put_object", "write", uri, Bucket=self.bucket, Key=key, Body=body_of(tail)))
            else:
                if tail:
                    numbered = self._next_part(numbered, uri)
                    etags[numbered] = await self._upload_part(key, upload_id, numbered,
                                                              body_of(tail))
                parts, uid = [etags[n] for n in range(1, numbered + 1)], upload_id
                await commit_shielded(uri, lambda: self._complete(key, uri, uid, parts))
                upload_id = None
            if self.unaborted:  # the endpoint answers again: abort what could not be aborted
                await self.abort_again()
        except BaseException:
            if upload_id is not None:
                with anyio.CancelScope(shield=True) as scope:
                    scope.deadline = anyio.current_time() + _ABORT_TIMEOUT
                    await self._abort(key, upload_id)
            raise
        return total

    def _next_part(self, numbered: int, uri: str) -> int:
        if numbered >= MAX_PARTS:
            raise StorageError(
                f"cannot write {uri}: it needs more than {MAX_PARTS} parts of {self.part_size} "
                "bytes (S3's limit); pass a larger part_size in storage_options", uri)
        return numbered + 1

    async def _create(self, key: str, uri: str) -> str:
        fs = self.s3.session()
        attempts = 0

        async def attempt() -> Any:
            nonlocal attempts
            attempts += 1
            return await fs._call_s3("create_multipart_upload", Bucket=self.bucket, Key=key)

        response = await self.s3.request("start a multipart upload of", uri, attempt)
        upload_id = str(response["UploadId"])
        if attempts > 1:
            # A failed attempt may have created an upload and lost only the answer: abort it
            # now instead of leaving it to the next writer (one writer per prefix, so every
            # other upload of this key is ours).
            try:
                await self.abort_under(key, keep=upload_id)
            except StorageError as exc:
                logger.warning("could not look for orphaned uploads of %s: %s", uri, exc)
        return upload_id

    async def _upload_part(self, key: str, upload_id: str, number: int,
                           body: io.BytesIO | bytes) -> str:
        response = await self.s3.call(
            "upload_part", f"upload part {number} of", f"s3://{self.bucket}/{key}",
            Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)
        return str(response["ETag"])

    async def _complete(self, key: str, uri: str, upload_id: str,
                        etags: builtins.list[str]) -> None:
        parts = [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]
        try:
            await self.s3.call("complete_multipart_upload", "complete the upload of", uri,
                               Bucket=self.bucket, Key=key, UploadId=upload_id,
                               MultipartUpload={"Parts": parts})
        except StorageError as exc:
            # A retried completion whose first try succeeded (only the response was lost)
            # finds the upload gone: the object is ours if its ETag is the one our parts make.
            if error_code(exc) != "NoSuchUpload":
                raise
            try:
                head = await self.s3.call("head_object", "check", uri, Bucket=self.bucket,
                                          Key=key)
            except FileNotFoundError:
                raise exc from None
            if head.get("ETag") != expected_multipart_etag(etags):
                raise
            logger.info("%s: completion retried after a lost response; the object is ours", uri)

    # -- aborting --------------------------------------------------------------------------------
    async def _abort(self, key: str, upload_id: str, *, again: bool = False) -> bool:
        """Abort an upload; False if it failed (it is then retried after the next write and
        at close, else left to the next writer's cleanup)."""
        uri = f"s3://{self.bucket}/{key}"
        try:
            await self.s3.call("abort_multipart_upload", "abort the upload of", uri,
                               Bucket=self.bucket, Key=key, UploadId=upload_id)
        except FileNotFoundError:
            pass
        except Exception as exc:  # the error that made us abort is the one to report
            if error_code(exc) != "NoSuchUpload":
                if not again:
                    logger.warning("could not abort the multipart upload of %s (retried later):"
                                   " %s", uri, exc)
                    self.unaborted.append((key, upload_id))
                return False
        return True

    async def abort_again(self) -> None:
        """Retry the aborts that failed before."""
        pending, self.unaborted = self.unaborted, []
        for i, (key, upload_id) in enumerate(pending):
            try:
                if not await self._abort(key, upload_id, again=True):
                    self.unaborted.append((key, upload_id))
            except BaseException:  # cancelled: keep what is left for later
                self.unaborted += pending[i:]
                raise

    async def abort_under(self, prefix: str, *, keep: str | None = None,
                          exact: bool = True, nested: bool = False) -> builtins.list[str]:
        """Abort the uploads of key ``prefix`` (or, unless ``exact``, of names directly under
        it; with ``nested``, of names in folders under it instead), except ``keep``; return
        the aborted keys."""
        aborted: builtins.list[str] = []
        markers: dict[str, str] = {}
        uri = f"s3://{self.bucket}/{prefix}"
        while True:
            page = await self.s3.call("list_multipart_uploads", "list uploads under", uri,
                                      Bucket=self.bucket, Prefix=prefix, **markers)
            for upload in page.get("Uploads", ()):
                key, rest = upload["Key"], upload["Key"][len(prefix):]
                mine = not rest if exact else bool(rest) and ("/" in rest) == nested
                if mine and upload["UploadId"] != keep:
                    await self._abort(key, upload["UploadId"])
                    aborted.append(key)
            if not page.get("IsTruncated"):
                return aborted
            markers = {"KeyMarker": page.get("NextKeyMarker", ""),
                       "UploadIdMarker": page.get("NextUploadIdMarker", "")}

    async def close(self, storage_uri: str) -> None:
        """A last try at the aborts that failed (bounded, even when cancelled); log the rest."""
        if self.unaborted and self.s3.fs is not None:
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = anyio.current_time() + _ABORT_TIMEOUT
                await self.abort_again()
            for key, upload_id in self.unaborted:
                logger.error("the multipart upload %s of s3://%s/%s could not be aborted; its "
                             "parts are billed until the next writer of %s aborts it",
                             upload_id, self.bucket, key, storage_uri)
        self.parts.clear()
