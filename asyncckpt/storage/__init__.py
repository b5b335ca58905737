"""Storage backends: where checkpoint bytes go.

``storage_for(location)`` picks the backend for a folder path or URI; pass a :class:`Storage`
instance instead of a path to any front door to use a custom (or fault-injecting) backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ._base import BlockingWrite, Buffer, Storage
from ._local import LocalStorage

__all__ = ["BlockingWrite", "Buffer", "LocalStorage", "Storage", "storage_for"]


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
        location: a local folder (``"runs/exp1"``, ``file:///abs/path``) or an existing
            :class:`Storage`, which is returned as is.
        storage_options: backend options: keyword arguments of the backend's constructor
            (``LocalStorage(fsync=...)``).

    Raises:
        TypeError: ``location`` is not a path, URI or Storage.
        ValueError: the URI scheme is not supported.
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
    raise ValueError(f"unsupported checkpoint location {text!r}: no backend for {scheme}://")
