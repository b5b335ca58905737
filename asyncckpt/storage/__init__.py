"""Storage backends: where checkpoint bytes go.

``storage_for(location)`` picks the backend for a folder path or URI: local folders and
``file://`` go to :class:`LocalStorage`, ``s3://`` to :class:`S3Storage`, any other fsspec URL
(``memory://``, ``gs://``, ...) to :class:`FsspecStorage`. Pass a :class:`Storage` instance
instead of a path to any front door to use a custom (or fault-injecting) backend. The S3 and
fsspec backends import their packages only when used (``pip install 'asyncckpt[s3]'``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ._base import BlockingWrite, Buffer, Storage
from ._fsspec import FsspecStorage
from ._limits import NotARegularFileError, ObjectTooLargeError
from ._local import LocalStorage
from ._s3 import S3Storage

__all__ = [
    "BlockingWrite",
    "Buffer",
    "FsspecStorage",
    "LocalStorage",
    "NotARegularFileError",
    "ObjectTooLargeError",
    "S3Storage",
    "Storage",
    "storage_for",
]


def _scheme(location: str) -> str | None:
    head, sep, _ = location.partition("://")
    return head.lower() if sep and head.isidentifier() else None


def storage_for(
    location: str | os.PathLike[str] | Storage,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> Storage:
    """Return the backend for ``location``.

    Args:
        location: a local folder (``"runs/exp1"``, ``file:///abs/path``), an ``s3://bucket/prefix``
            or other fsspec URL, or an existing :class:`Storage`, which is returned as is.
        storage_options: backend options: keyword arguments of the backend's constructor
            (``LocalStorage(fsync=...)``; for S3 ``part_size=``, ``max_concurrency=``, ... and
            those of ``s3fs.S3FileSystem``; for other URLs those of the fsspec filesystem).

    Raises:
        TypeError: ``location`` is not a path, URI or Storage.
        ValueError: the URI scheme is not supported.
        ImportError: the URI needs an optional package (``pip install 'asyncckpt[s3]'``).
    """
    if isinstance(location, Storage):
        if storage_options:
            raise ValueError("storage_options cannot be combined with a Storage instance")
        return location
    if not isinstance(location, (str, os.PathLike)):
        raise TypeError(
            "a checkpoint location must be a path, a URI or a Storage, "
            f"got {type(location).__name__}"
        )
    text = os.fspath(location)
    if not text:
        raise ValueError("a checkpoint location cannot be empty")
    scheme = _scheme(text)
    options = dict(storage_options or {})
    if scheme is None:
        return LocalStorage(text, **options)
    if scheme == "file":
        return LocalStorage(text[len("file://") :], **options)
    if scheme in ("s3", "s3a"):
        return S3Storage(text, **options)
    return FsspecStorage(text, **options)
