"""How S3 failures are told apart: missing keys, transient errors worth a retry, permanent ones.

s3fs translates botocore errors into ``OSError`` subclasses and chains the original, so the
botocore ``ClientError`` (its error code and HTTP status) is looked for along the cause chain.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import functools
import hashlib
from collections.abc import Mapping

from .._errors import StorageError, TransientStorageError
from ._remote import caused_by

__all__ = [
    "TRANSIENT_CODES",
    "TRANSIENT_STATUSES",
    "error_code",
    "expected_multipart_etag",
    "translate_error",
]

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


def error_code(exc: BaseException) -> str | None:
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


def expected_multipart_etag(etags: builtins.list[str]) -> str:
    """The ETag S3 gives an object completed from parts with these ETags (plain uploads)."""
    digest = hashlib.md5(usedforsecurity=False)
    for etag in etags:
        digest.update(bytes.fromhex(etag.strip('"')))
    return f'"{digest.hexdigest()}-{len(etags)}"'
