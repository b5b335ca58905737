"""Physical references: what the machine allows, measured on the same state and destination.

* ``memcpy``: copying every tensor storage of the state into one preallocated, already-touched
  buffer with a single-threaded ``memmove`` (GIL released) -- the least an eager snapshot can
  cost. ``copy_`` does the same with ``torch``'s own copy kernel (which may use several threads);
  the floor is the faster of the two.
* ``write-buffered``: ``os.write`` of as many bytes as the checkpoint, in 64 MiB chunks from a
  touched buffer, into a new file in the destination, then ``fsync`` -- the durable write
  bandwidth through the page cache.
* ``write-direct``: the same with ``O_DIRECT`` (page-aligned buffer), where the filesystem
  supports it -- the durable bandwidth of the device itself.
* ``upload`` (remote destinations): one fsspec upload (``pipe``) of the already-serialized bytes.
"""

from __future__ import annotations

import ctypes
import io
import mmap
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from ._dest import Destination

__all__ = ["Reference", "References"]

_CHUNK = 64 * 2**20


@dataclass
class Reference:
    id: str
    label: str
    seconds: float
    nbytes: int
    cpu_s: float

    @property
    def gbps(self) -> float:
        return self.nbytes / 1e9 / self.seconds if self.seconds > 0 else float("nan")


def _storages(tree: Any) -> list[torch.UntypedStorage]:
    out: dict[int, torch.UntypedStorage] = {}
    stack = [tree]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            out.setdefault(storage.data_ptr(), storage)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return list(out.values())


class References:
    """Runs the references for one state and destination; buffers are allocated once."""

    def __init__(self, tree: Any, nbytes: int, dest: Destination) -> None:
        self.dest = dest
        self.storages = [s for s in _storages(tree) if s.nbytes()]
        self.nbytes = nbytes
        self.cuda = any(s.device.type == "cuda" for s in self.storages)
        total = sum(s.nbytes() for s in self.storages)
        self._dst = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=self.cuda)
        self._dst.fill_(1)  # touched: the floor must not pay for page faults
        self._chunk: mmap.mmap | None = None
        self._serialized: bytes | None = None
        self.direct_supported: bool | None = None
        if dest.local_root is None:
            buf = io.BytesIO()
            torch.save(tree, buf)
            self._serialized = buf.getvalue()
            self.nbytes = len(self._serialized)

    def ids(self) -> list[str]:
        copies = ["copy_"] if self.cuda else ["copy_", "memcpy"]
        if self.dest.local_root is None:
            return [*copies, "upload"]
        return [*copies, "write-buffered", "write-direct"]

    def run(self, ref: str) -> Reference | None:
        """Run one reference; None when it does not apply (O_DIRECT unsupported)."""
        c0 = time.process_time()
        if ref == "memcpy":
            seconds = self._memcpy()
            label = "memory copy (memmove, 1 thread)"
        elif ref == "copy_":
            seconds = self._copy()
            label = "memory copy (torch copy_)" + (", device to pinned host" if self.cuda else "")
        elif ref == "upload":
            seconds = self._upload()
            label = "upload of serialized bytes"
        elif ref in ("write-buffered", "write-direct"):
            direct = ref == "write-direct"
            measured = self._write(direct)
            if measured is None:
                return None
            seconds = measured
            label = "os.write + fsync" + (" (O_DIRECT)" if direct else "")
        else:
            raise ValueError(f"unknown reference {ref!r}")
        return Reference(ref, label, seconds, self.nbytes, time.process_time() - c0)

    def _memcpy(self) -> float:
        base = self._dst.data_ptr()
        t0 = time.perf_counter()
        offset = 0
        for storage in self.storages:
            n = storage.nbytes()
            ctypes.memmove(base + offset, storage.data_ptr(), n)
            offset += n
        return time.perf_counter() - t0

    def _copy(self) -> float:
        t0 = time.perf_counter()
        offset = 0
        for storage in self.storages:
            n = storage.nbytes()
            src = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
            self._dst[offset : offset + n].copy_(src, non_blocking=self.cuda)
            offset += n
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def _write(self, direct: bool) -> float | None:
        if direct and (self.direct_supported is False or not hasattr(os, "O_DIRECT")):
            return None
        if self._chunk is None:
            self._chunk = mmap.mmap(-1, _CHUNK)  # page-aligned, as O_DIRECT needs
            self._chunk.write(os.urandom(4096) * (_CHUNK // 4096))
        path = self.dest.path(f".bench-write-{'direct' if direct else 'buffered'}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
        # Whole chunks, rounded up: O_DIRECT writes whole blocks (a few KiB more than the state).
        chunks, tail = divmod(self.nbytes, _CHUNK)
        tail = -(-tail // 4096) * 4096
        view = memoryview(self._chunk)
        t0 = time.perf_counter()
        try:
            fd = os.open(path, flags, 0o644)
        except OSError:
            if direct:
                self.direct_supported = False
                return None
            raise
        try:
            for n in [_CHUNK] * chunks + ([tail] if tail else []):
                piece = view[:n]
                while piece.nbytes:
                    piece = piece[os.write(fd, piece):]
            os.fsync(fd)
        except OSError:
            if direct:
                self.direct_supported = False
                return None
            raise
        finally:
            os.close(fd)
            seconds = time.perf_counter() - t0
            os.remove(path)
        if direct:
            self.direct_supported = True
        return seconds

    def _upload(self) -> float:
        if self._serialized is None:
            raise RuntimeError("the upload reference needs a remote destination")
        t0 = time.perf_counter()
        self.dest.write_bytes(".bench-upload", self._serialized)
        seconds = time.perf_counter() - t0
        self.dest.remove(".bench-upload")
        return seconds
