"""Serialize stage: a snapshot to the exact ``torch.save`` byte stream, chunk by chunk.

The file is what ``torch.save(snapshot.tree, f)`` writes (zip archive: ``data.pkl``,
``.format_version``, ``.storage_alignment``, ``byteorder``, ``data/<key>``), readable by plain
``torch.load(path, weights_only=True)``. We drive torch's own ``PyTorchFileWriter`` rather than
``torch.save`` for three reasons:

* **Locations.** Snapshot storages live in host memory, but a tensor copied from ``cuda:0`` must be
  recorded as ``cuda:0``, as torch.save would have recorded it.
* **CRC32.** torch computes a CRC32 per record (about half of torch.save's time on a 1 GiB state).
  Its switch is process-global (``torch.serialization.set_crc32_options``), which a background
  writer must not flip under the user's feet; here it is a per-writer argument. In its place the
  whole stream is hashed with xxh3-128 (~50 GB/s, GIL released) on its way out.
* **Zero copy.** The writer hands every record to ``sink.write`` as a memoryview. Tensor payloads
  point straight into the snapshot's arena; those are passed to storage as they are. Everything
  else (zip headers from short-lived C++ buffers, the pickle, the central directory) is copied
  into ~1 MiB chunks before ``write`` returns. A blocking consumer (``borrowed=True``) uses each
  view before ``emit`` returns, so large pieces are passed on uncopied whatever owns them; small
  ones are still gathered (a state of many small tensors makes a few writes per tensor).

``serialize`` is blocking and runs in a worker thread; ``emit`` receives the chunks in order.
"""

from __future__ import annotations

import collections
import copyreg
import io
import pickle
import sys
from bisect import bisect_right
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.serialization import location_tag, normalize_storage_type

from .._snapshot.snapshot import Snapshot
from .buffers import address_of
from .hashing import CHECKSUM_ALGO, Hasher, checksum_of

__all__ = ["CHECKSUM_ALGO", "Hasher", "checksum_of", "serialize"]

_ZERO_COPY_MIN = 64 * 1024
# types the pickler meets that are never storages (persistent_id's fast answer)
_NOT_STORAGES = frozenset({
    str, int, float, bool, type(None), bytes, tuple, list, dict, collections.OrderedDict,
    torch.Tensor, torch.nn.Parameter, torch.Size, torch.dtype, torch.device, type,
})
_CHUNK = 1 << 20
_PICKLE_PROTOCOL = 2  # torch.serialization.DEFAULT_PROTOCOL


def _discard(chunk: object) -> None:
    pass


class _Sink:
    """The file object PyTorchFileWriter writes to."""

    def __init__(self, emit: Callable[[memoryview | bytearray], None],
                 ranges: list[tuple[int, int]], borrowed: bool = False) -> None:
        self._emit = emit
        self._borrowed = borrowed
        self._starts = [start for start, _ in sorted(ranges)]
        self._ends = [start + n for start, n in sorted(ranges)]
        self._buf = bytearray()
        self.hasher = Hasher()
        self.size = 0
        self.failure: BaseException | None = None

    def _owned(self, view: memoryview) -> bool:
        addr = address_of(view)
        i = bisect_right(self._starts, addr) - 1
        return i >= 0 and addr + view.nbytes <= self._ends[i]

    def _send(self, chunk: memoryview | bytearray) -> None:
        try:
            self._emit(chunk)
        except BaseException as exc:
            # Never let an exception into torch's zip writer: once a record fails it is in an
            # error state, and its destructor (which finishes the archive) then aborts the
            # process. The writer runs to its end into the void; serialize() raises this.
            self.failure = exc
            self.detach()

    def write(self, data: Any) -> int:
        view = memoryview(data)
        n = view.nbytes
        if n == 0:
            return 0
        self.size += n
        if self.failure is not None:
            return n
        # Small writes (zip headers and names, a few per record) are gathered even for a
        # borrowing consumer: on a state of many small tensors they are most of the calls.
        if n >= _ZERO_COPY_MIN and (self._borrowed or self._owned(view)):
            self._drain()
            self.hasher.update(view)
            self._send(view)
        else:
            self._buf += view
            if len(self._buf) >= _CHUNK:
                self._drain()
        return n

    def flush(self) -> None:  # part of the file protocol; chunks leave via finish()
        pass

    def detach(self) -> None:
        """Discard everything written from now on (the stream failed)."""
        self._emit = _discard
        self._borrowed = True
        self._buf = bytearray()
        self.hasher = Hasher()  # (the stream is dropped: its checksum is never used)

    def _drain(self) -> None:
        if self._buf:
            chunk, self._buf = self._buf, bytearray()
            self.hasher.update(chunk)
            self._send(chunk)

    def finish(self) -> None:
        self._drain()


def _open_writer(sink: _Sink, compute_crc32: bool) -> tuple[Any, int | None]:
    """A PyTorchFileWriter on ``sink``, across the torch versions we support."""
    writer_cls: Any = torch._C.PyTorchFileWriter  # its stubs only know IO[bytes] buffers
    alignment_fn = getattr(torch.serialization, "_get_storage_alignment", None)
    alignment = alignment_fn() if alignment_fn is not None else None
    try:
        if alignment is not None:
            return writer_cls(sink, compute_crc32, alignment), alignment
        return writer_cls(sink, compute_crc32), None
    except TypeError:  # torch < 2.5: no per-writer options
        return writer_cls(sink), None


def serialize(
    snapshot: Snapshot,
    emit: Callable[[memoryview | bytearray], None],
    *,
    torch_crc32: bool = False,
    reducers: Mapping[type, Callable[[Any], tuple[Any, ...]]] | None = None,
    cpu_locations: bool = False,
    borrowed: bool = False,
) -> tuple[int, str]:
    """Write ``snapshot`` in torch.save format to ``emit``; return ``(size, checksum)``.

    Blocking; run it in a worker thread. Chunks handed to ``emit`` may reference the snapshot's
    memory, so the snapshot must stay alive until they are consumed. With ``borrowed=True``
    every write of torch's zip writer is passed on as it comes, and ``emit`` must be done with
    it when it returns (the views may point into buffers that are reused right after).

    Args:
        snapshot: what to write.
        emit: receives the file's bytes in order.
        torch_crc32: also compute torch's per-record CRC32.
        reducers: copyreg-style reduce functions for extra types, used instead of the classes'
            own pickling (for this file only; ``copyreg``'s global table is not touched).
        cpu_locations: record every storage as ``cpu`` rather than the device it came from.
        borrowed: pass large writes on uncopied (small ones are gathered); ``emit`` must
            consume each chunk before it returns.
    """
    serialized: dict[str, torch.UntypedStorage] = {}
    id_map: dict[int, str] = {}
    locations: Mapping[int, str] = {} if cpu_locations else snapshot.locations
    dispatch = {**copyreg.dispatch_table, **reducers} if reducers else None

    def persistent_id(obj: Any) -> tuple[Any, ...] | None:
        # Mirrors torch.serialization._save's persistent_id, plus the location override.
        # The pickler asks about every object it meets (a dozen per tensor): the common
        # plain types are answered first.
        if type(obj) in _NOT_STORAGES:
            return None
        if isinstance(obj, torch.storage.TypedStorage) or torch.is_storage(obj):
            if isinstance(obj, torch.storage.TypedStorage):
                storage = obj._untyped_storage
                storage_type = getattr(torch, obj._pickle_storage_type())
                numel = obj._size()
            else:
                storage = obj
                storage_type = normalize_storage_type(type(obj))
                numel = storage.nbytes()
            key = id_map.setdefault(storage._cdata, str(len(id_map)))
            if cpu_locations:
                location = "cpu"
            else:
                location = locations.get(storage._cdata) or location_tag(storage)
            serialized[key] = storage
            return ("storage", storage_type, key, location, numel)
        return None

    data_buf = io.BytesIO()
    # persistent_id as a static method: one Python call per object, not a method wrapper plus
    # the closure (setting it on the instance is refused from Python 3.13)
    pickler_class = type("_Pickler", (pickle.Pickler,),
                         {"persistent_id": staticmethod(persistent_id)})
    pickler = pickler_class(data_buf, protocol=_PICKLE_PROTOCOL)
    if dispatch is not None:
        pickler.dispatch_table = dispatch
    pickler.dump(snapshot.tree)
    data = data_buf.getvalue()

    sink = _Sink(emit, snapshot.ranges, borrowed)
    writer, alignment = _open_writer(sink, torch_crc32)
    try:
        writer.write_record("data.pkl", data, len(data))
        writer.write_record(".format_version", "1", 1)
        if alignment is not None:
            text = str(alignment)
            writer.write_record(".storage_alignment", text, len(text))
        writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        for key, storage in serialized.items():
            if sink.failure is not None:
                break  # what is left would be discarded anyway
            if storage.device.type != "cpu":  # only storages the snapshot could not pool
                storage = storage.cpu()
            writer.write_record(f"data/{key}", storage, storage.nbytes())
        writer.write_end_of_file()
    except BaseException:
        # Anything else that broke mid-archive (the sink itself never lets exceptions into
        # torch's writer): an unfinished PyTorchFileWriter finishes the archive in its C++
        # destructor, which throws on the broken stream and calls std::terminate -- the process
        # aborts at the next garbage collection. A failed write_end_of_file() still marks the
        # writer finalized (pytorch#87997), so end it here, into the void, and re-raise.
        sink.detach()
        try:
            writer.write_end_of_file()
        except Exception:  # noqa: S110 - expected: the archive is broken, and is dropped
            pass
        raise
    sink.finish()
    if sink.failure is not None:
        raise sink.failure
    return sink.size, sink.hasher.hexdigest()
