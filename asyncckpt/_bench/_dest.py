"""Where the benchmark writes: a local folder, or any fsspec URI (``s3://bucket/prefix``)."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

from ..storage import storage_for

__all__ = ["Destination", "filesystem_type"]


def filesystem_type(path: str) -> str:
    """The filesystem type of the mount holding ``path`` (``ext4``, ``xfs``, ``tmpfs``, ...)."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1].replace("\\040", " ")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        if sys.platform == "darwin":
            return "apfs?"
    return kind


class Destination:
    """A folder (local path) or prefix (fsspec URI) that contenders write into.

    Args:
        uri: a local folder or ``scheme://...``; local folders are created.
        storage_options: options for the fsspec filesystem (and asyncckpt's backend).

    Raises:
        ValueError: a URI's filesystem is not installed (the message says which package).
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        self.uri = uri
        scheme, sep, _ = uri.partition("://")
        self.remote = bool(sep) and scheme.lower() != "file"
        self.fs: Any = None
        if self.remote:
            import fsspec

            try:
                self.fs, self.root = fsspec.core.url_to_fs(uri, **self.storage_options)
            except (ImportError, ValueError) as exc:
                raise ValueError(
                    f"--dest {uri!r}: no filesystem for {scheme}:// ({exc}); install its fsspec "
                    "package (s3fs for s3://)"
                ) from exc
            self.fs.makedirs(self.root, exist_ok=True)
            self.local_root: str | None = None
        else:
            self.root = os.path.abspath(uri[len("file://"):] if sep else uri)
            os.makedirs(self.root, exist_ok=True)
            self.local_root = self.root

    @property
    def kind(self) -> str:
        """The filesystem type (local) or the URI scheme (remote)."""
        if self.local_root is not None:
            return filesystem_type(self.local_root)
        return str(self.uri.partition("://")[0].lower())

    def path(self, name: str) -> str:
        """Local path or URI of ``name`` in the destination."""
        if self.local_root is not None:
            return os.path.join(self.local_root, name)
        return f"{self.uri.rstrip('/')}/{name}"

    def fs_path(self, name: str) -> str:
        """The path of ``name`` as the fsspec filesystem spells it (remote only)."""
        return f"{self.root.rstrip('/')}/{name}"

    def asyncckpt_storage(self, name: str, **extra: Any) -> Any:
        """An asyncckpt storage for sub-folder ``name``.

        Raises:
            ValueError: asyncckpt has no backend for this URI (yet).
        """
        options = {**self.storage_options, **extra}
        return storage_for(self.path(name), storage_options=options or None)

    def size(self, name: str) -> int:
        """Bytes under ``name`` (a file or a folder)."""
        if self.local_root is not None:
            path = self.path(name)
            if os.path.isdir(path):
                return sum(
                    os.path.getsize(os.path.join(root, f))
                    for root, _, files in os.walk(path)
                    for f in files
                )
            return os.path.getsize(path)
        return int(self.fs.du(self.fs_path(name), total=True))

    def remove(self, name: str) -> None:
        """Delete ``name`` (file or folder); missing is fine."""
        if self.local_root is not None:
            path = self.path(name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
            return
        try:
            self.fs.rm(self.fs_path(name), recursive=True)
        except FileNotFoundError:
            pass

    def write_bytes(self, name: str, data: Any) -> None:
        """Upload ``data`` as ``name`` in one request (remote only; the S3 reference)."""
        self.fs.pipe_file(self.fs_path(name), bytes(data))
