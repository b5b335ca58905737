"""Snapshot stage: turn the caller's live state into an immutable host copy the writer owns.

Two steps, so the writer can size and reserve a buffer before any byte is copied::

    plan_snapshot(state)  walk the tree on the caller's thread: validate every object (TypeError
                          naming its path), call state_dict() on modules/optimizers/schedulers,
                          deep-copy instances of the configured extra types, collect each
                          distinct tensor storage once, and build the result tree with empty
                          placeholder tensors
    take_snapshot(plan, arena)
                          copy every storage into one pooled arena (CUDA: on a side stream into
                          pinned memory) and bind the placeholders to it with the original
                          offsets/sizes/strides, so storage sharing is exactly what torch.save
                          would have recorded

After an eager ``take_snapshot`` returns, the snapshot shares no memory with the caller's tensors:
the caller may mutate or free them at once. A pipelined one (``pipelined=True``) leaves the
storages that an optimizer in the state updates to a :class:`~asyncckpt._pipelined.PendingCopy`
(``snapshot.pending``), which copies them in the background behind a guard on that optimizer's
``step()``; see ``_pipelined.py``.
"""

from __future__ import annotations

import copy
import ctypes
import sys
import threading
from collections import OrderedDict
from collections.abc import Collection
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.serialization import location_tag

from ._index import PathKey
from ._pipelined import CopyMonitor, DeferredStorage, GuardGroup, PendingCopy, host_checksum
from ._pool import Arena, align

__all__ = [
    "CudaCopier",
    "Snapshot",
    "SnapshotPlan",
    "caller_streams",
    "format_path",
    "plan_snapshot",
    "take_snapshot",
]

_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
# dtypes torch.save records through _rebuild_tensor_v3 (no legacy storage type)
_REBUILT_V3 = frozenset(getattr(torch.storage, "_new_dtypes", lambda: ())())
_KEY_SCALARS = (bool, int, float, complex, str, bytes, type(None))


class _StateDictCall:
    """Path marker for "the result of calling state_dict() on the object here"."""

    def __repr__(self) -> str:
        return ".state_dict()"


_SD = _StateDictCall()


def format_path(path: tuple[object, ...]) -> str:
    """Render a path in the state as Python source: ``state['optim']['param_groups'][0]``."""
    out = ["state"]
    for key in path:
        out.append(".state_dict()" if key is _SD else f"[{key!r}]")
    return "".join(out)


@dataclass(eq=False)
class _StorageCopy:
    src: torch.UntypedStorage
    nbytes: int
    device: torch.device
    location: str
    dtype: torch.dtype
    first_path: tuple[object, ...]
    offset: int = 0


@dataclass(eq=False)
class _TensorCopy:
    dst: torch.Tensor
    storage: int
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(eq=False)
class SnapshotPlan:
    """What a snapshot will copy; built by :func:`plan_snapshot`."""

    tree: Any
    storages: list[_StorageCopy]
    tensors: list[_TensorCopy]
    numpy_paths: list[PathKey]
    #: tensors that cannot be pooled (sparse, quantized, conj views, ...) were cloned while
    #: planning; their storages are kept here so the serializer may reference them zero-copy
    cloned: list[torch.UntypedStorage]
    nbytes: int
    #: optimizers found in the state, each with the storages it updates (params and state)
    owners: list[tuple[torch.optim.Optimizer, tuple[int, ...]]] = field(default_factory=list)

    @property
    def devices(self) -> set[torch.device]:
        return {s.device for s in self.storages}


@dataclass(eq=False)
class Snapshot:
    """An immutable host copy of a state, ready to serialize.

    Attributes:
        tree: the copied state (dicts/lists/tuples of host tensors and plain values).
        nbytes: bytes of tensor data in the snapshot.
        locations: storage ``_cdata`` -> torch location tag ("cuda:0", ...) for storages copied
            from a device, so the file records the device the tensor came from, as torch.save would.
        numpy_paths: where the caller passed numpy arrays (stored as tensors).
        ranges: ``(address, nbytes)`` of memory this snapshot owns; the serializer may hand such
            memory to storage without copying it.
        arena: the pooled buffer holding the copies (returned to the pool when the write is done).
        pending: for a pipelined snapshot, the copy still running in the background; the tree
            must not be read before it completed.
    """

    tree: Any
    nbytes: int
    locations: dict[int, str]
    numpy_paths: list[PathKey]
    ranges: list[tuple[int, int]]
    arena: Arena | None
    _keepalive: list[object] = field(default_factory=list, repr=False)
    pending: PendingCopy | None = None


def _numpy() -> Any:
    return sys.modules.get("numpy")  # never import numpy just to find out a value is not an array


def _check_key(key: object, path: tuple[object, ...]) -> None:
    if key == b"":
        raise TypeError(
            f"{format_path(path)} has the dict key b'', which torch.load(weights_only=True) "
            "cannot read back (empty bytes); use another key"
        )
    if type(key) in _KEY_SCALARS:
        return
    if type(key) is tuple:
        for k in key:
            _check_key(k, path)
        return
    raise TypeError(
        f"{format_path(path)} has a dict key of type {type(key).__qualname__} ({key!r:.60}); "
        "keys must be str, int, float, bool, bytes, None or tuples of those so that "
        "torch.load(weights_only=True) can read the checkpoint"
    )


class _Planner:
    def __init__(self, extra_types: Collection[type] = ()) -> None:
        self.extra_types = frozenset(extra_types)
        self.storages: list[_StorageCopy] = []
        self.tensors: list[_TensorCopy] = []
        self.numpy_paths: list[PathKey] = []
        self.cloned: list[torch.UntypedStorage] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.by_cdata: dict[int, int] = {}
        # id -> (original, copy): holding the original keeps its id from being reused by a
        # temporary (e.g. a state_dict() result) while the walk is still running.
        self._memo: dict[int, tuple[object, object]] = {}
        self._active: dict[int, tuple[object, ...]] = {}

    def visit(self, obj: object, path: tuple[object, ...]) -> object:
        kind = type(obj)
        if kind in _SCALARS or kind is torch.Size:
            if kind is bytes and not obj:
                raise TypeError(
                    f"{format_path(path)} is empty bytes, which torch.load(weights_only=True) "
                    "cannot read back (pickle protocol 2 stores b'' as a call to bytes()); "
                    "store None or a non-empty value instead"
                )
            return obj
        oid = id(obj)
        if oid in self._memo:
            copy = self._memo[oid][1]
            np = _numpy()
            if np is not None and isinstance(obj, np.ndarray) and kind not in self.extra_types:
                self._record_numpy(path)
            return copy
        if oid in self._active:
            raise TypeError(
                f"{format_path(path)} refers back to {format_path(self._active[oid])}: the state "
                "contains a reference cycle, which a checkpoint cannot represent"
            )
        self._active[oid] = path
        try:
            copy = self._visit_new(obj, kind, path)
        finally:
            del self._active[oid]
        self._memo[oid] = (obj, copy)
        return copy

    def _visit_new(self, obj: Any, kind: type, path: tuple[object, ...]) -> object:
        if kind in self.extra_types:
            try:
                return copy.deepcopy(obj)
            except Exception as exc:
                raise TypeError(
                    f"{format_path(path)}: cannot copy the {kind.__module__}.{kind.__qualname__}"
                    f" (listed in extra_types) for the snapshot: {exc}"
                ) from exc
        if kind is dict or kind is OrderedDict:
            out: dict[object, object] = kind()
            for key, value in obj.items():
                _check_key(key, path)
                out[key] = self.visit(value, (*path, key))
            if kind is OrderedDict and obj.__dict__:
                # nn.Module.state_dict() keeps per-module versions in ``_metadata``;
                # load_state_dict() needs it to migrate old checkpoints.
                for attr, value in obj.__dict__.items():
                    setattr(out, attr, self.visit(value, (*path, attr)))
            return out
        if kind is list:
            return [self.visit(v, (*path, i)) for i, v in enumerate(obj)]
        if kind is tuple:
            return tuple(self.visit(v, (*path, i)) for i, v in enumerate(obj))
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path)
        np = _numpy()
        if np is not None and isinstance(obj, np.ndarray):
            return self._ndarray(obj, path, np)
        if np is not None and isinstance(obj, np.generic):
            value = obj.item()
            if type(value) not in _SCALARS:
                raise TypeError(
                    f"{format_path(path)} is a numpy {obj.dtype} scalar, which has no "
                    "checkpointable Python equivalent"
                )
            return value
        state_dict = getattr(obj, "state_dict", None)
        if callable(state_dict) and not isinstance(obj, type):
            if isinstance(obj, torch.optim.Optimizer):
                self.optimizers.append(obj)
            return self.visit(state_dict(), (*path, _SD))
        hint = ""
        if isinstance(obj, (dict, list, tuple)):
            hint = f" (a {kind.__qualname__}; convert it to a plain dict/list/tuple)"
        elif callable(obj):
            hint = " (functions and callables cannot be stored with weights_only=True)"
        raise TypeError(
            f"{format_path(path)}: cannot checkpoint an object of type "
            f"{kind.__module__}.{kind.__qualname__}{hint}. Supported: tensors, numpy arrays, "
            "dict/list/tuple, Python scalars, str/bytes, None, objects with state_dict(), and "
            "the classes listed in the checkpointer's extra_types."
        )

    def _record_numpy(self, path: tuple[object, ...]) -> None:
        keys = tuple(k for k in path if k is not _SD)
        if all(type(k) in (str, int) for k in keys):
            self.numpy_paths.append(keys)  # type: ignore[arg-type]

    def _ndarray(self, arr: Any, path: tuple[object, ...], np: Any) -> torch.Tensor:
        if arr.dtype.hasobject or arr.dtype.kind not in "biufc":
            raise TypeError(
                f"{format_path(path)} is a numpy array of dtype {arr.dtype}, which has no tensor "
                "equivalent; only bool/int/uint/float/complex arrays can be checkpointed"
            )
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if not arr.flags.writeable or any(s < 0 for s in arr.strides):
            arr = np.array(arr, copy=True)  # torch.from_numpy refuses these; copy once
        try:
            tensor = torch.from_numpy(arr)
        except TypeError as exc:
            raise TypeError(f"{format_path(path)}: numpy array not convertible: {exc}") from None
        self._record_numpy(path)
        return self._tensor(tensor, path)

    def _tensor(self, t: torch.Tensor, path: tuple[object, ...]) -> torch.Tensor:
        kind = type(t)
        if kind is not torch.Tensor and kind is not torch.nn.Parameter:
            raise TypeError(
                f"{format_path(path)} is a tensor subclass ({kind.__module__}.{kind.__qualname__});"
                " convert it to a plain tensor (e.g. .full_tensor() / .as_subclass(torch.Tensor))"
            )
        device = t.device
        if (
            t.layout != torch.strided
            or t.is_quantized
            or t.is_conj()
            or t.is_neg()
            or device.type == "meta"
            or t.is_nested
        ):
            return self._clone(t, path)
        if t.requires_grad and t.dtype in _REBUILT_V3:
            raise TypeError(
                f"{format_path(path)} is a {t.dtype} tensor that requires grad, which torch.load "
                "cannot read back (its _rebuild_tensor_v3 fails on grad-requiring leaves); "
                "save t.detach() instead"
            )
        storage = t.untyped_storage()
        index = self.by_cdata.get(storage._cdata)
        if index is None:
            index = len(self.storages)
            self.by_cdata[storage._cdata] = index
            # location_tag() asks every registered backend; a CPU tensor's tag is "cpu".
            location = "cpu" if device.type == "cpu" else location_tag(storage)
            self.storages.append(
                _StorageCopy(storage, storage.nbytes(), device, location, t.dtype, path)
            )
        else:
            spec = self.storages[index]
            if spec.dtype != t.dtype:
                raise TypeError(
                    f"{format_path(path)} ({t.dtype}) and {format_path(spec.first_path)} "
                    f"({spec.dtype}) view the same storage as different dtypes, which torch.save "
                    "cannot store; clone one of them"
                )
        dst = torch.empty(0, dtype=t.dtype)
        if kind is torch.nn.Parameter:
            dst = torch.nn.Parameter(dst, requires_grad=t.requires_grad)
        elif t.requires_grad:
            dst.requires_grad_(True)
        self.tensors.append(
            _TensorCopy(dst, index, int(t.storage_offset()), tuple(t.size()), tuple(t.stride()))
        )
        return dst

    def _clone(self, t: torch.Tensor, path: tuple[object, ...]) -> torch.Tensor:
        """Copy a tensor the pool cannot hold (sparse, quantized, conj/neg views, meta)."""
        try:
            with torch.no_grad():
                copy = t.detach().clone() if t.device.type in ("cpu", "meta") else t.detach().cpu()
            if t.requires_grad:
                copy.requires_grad_(True)
        except Exception as exc:
            raise TypeError(
                f"{format_path(path)}: cannot snapshot a {t.layout} tensor on {t.device}: {exc}"
            ) from exc
        if copy.layout == torch.strided and copy.device.type == "cpu":
            self.cloned.append(copy.untyped_storage())
        return copy


def plan_snapshot(state: object, extra_types: Collection[type] = ()) -> SnapshotPlan:
    """Validate ``state`` and plan its copy (no tensor data is copied yet, except for the rare
    tensors the pool cannot hold, and instances of ``extra_types``, which are deep-copied and
    kept as they are).

    Raises:
        TypeError: something in the state cannot be checkpointed; the message names its path,
            e.g. ``state['optim']['param_groups'][0]['fn']``.
    """
    planner = _Planner(extra_types)
    try:
        tree = planner.visit(state, ())
    except RecursionError:
        raise TypeError(
            "the state is nested too deeply to checkpoint (Python's recursion limit was reached)"
        ) from None
    offset = 0
    for spec in planner.storages:
        spec.offset = offset
        offset += align(spec.nbytes)
    owners = [(opt, _owned(opt, planner.by_cdata)) for opt in planner.optimizers]
    return SnapshotPlan(
        tree, planner.storages, planner.tensors, planner.numpy_paths, planner.cloned, offset,
        owners,
    )


def _owned(optimizer: torch.optim.Optimizer, by_cdata: dict[int, int]) -> tuple[int, ...]:
    """Indices of the planned storages that ``optimizer.step()`` may update in place."""
    tensors: list[torch.Tensor] = [p for group in optimizer.param_groups for p in group["params"]]
    for per_param in optimizer.state.values():
        if isinstance(per_param, dict):
            tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
    found: dict[int, None] = {}
    for t in tensors:
        if t.layout != torch.strided or t.is_quantized:
            continue  # the planner clones those: nothing to guard
        index = by_cdata.get(t.untyped_storage()._cdata)
        if index is not None:
            found[index] = None
    return tuple(found)


class CudaCopier:
    """Device-to-host copies on one side stream per device; streams are created once and reused."""

    def __init__(self) -> None:
        self._streams: dict[int, torch.cuda.Stream] = {}

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = torch.cuda.Stream(device=index)
        return stream


_CPU = torch.device("cpu")


def _u8(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


def _index_of(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def caller_streams() -> dict[int, torch.cuda.Stream]:
    """The calling thread's current CUDA stream per device ({} when CUDA is not initialized).

    CUDA's current stream is per thread: a snapshot planned in a worker thread must order its
    copies after the work queued by the training thread, not after the worker's default stream.
    """
    if not torch.cuda.is_initialized():
        return {}
    return {i: torch.cuda.current_stream(i) for i in range(torch.cuda.device_count())}


def _stream_of(device: torch.device, streams: dict[int, torch.cuda.Stream] | None
               ) -> torch.cuda.Stream:
    index = _index_of(device)
    stream = (streams or {}).get(index)
    return stream if stream is not None else torch.cuda.current_stream(index)


def take_snapshot(
    plan: SnapshotPlan,
    arena: Arena,
    copier: CudaCopier | None = None,
    *,
    pipelined: bool = False,
    streams: dict[int, torch.cuda.Stream] | None = None,
    check: bool = False,
    monitor: CopyMonitor | None = None,
    helper: Executor | None = None,
) -> Snapshot:
    """Copy what ``plan`` describes into ``arena`` and return the snapshot.

    Runs on the caller's thread (sync front door) or a worker thread (async front door); torch
    releases the GIL while copying.

    Eager (default): everything is copied before this returns. CUDA storages are copied with
    ``non_blocking=True`` on a side stream that first waits for the caller's stream, and this
    function returns only after those copies completed.

    Pipelined: storages that an optimizer in the state updates are left to ``snapshot.pending``
    (not started yet: the writer starts it). On CUDA they are queued here on the side stream,
    and the other CUDA storages on the caller's stream itself, so the host does not wait for
    either; CPU ones are copied by the copy thread.

    Args:
        plan: from :func:`plan_snapshot`.
        arena: a pooled buffer of at least ``plan.nbytes`` bytes.
        copier: the side streams to use (one is created if needed).
        pipelined: defer what the optimizers' guards protect.
        streams: the training thread's current stream per device (:func:`caller_streams`);
            default: this thread's.
        check: record a checksum of every deferred source now, to compare with its copy
            (``check_snapshot``).
        monitor: guard statistics and test probe for the pending copy.
        helper: an executor whose thread may share a large CPU copy (see :class:`SharedCopy`).
    """
    if arena.capacity < plan.nbytes:
        raise ValueError(f"arena of {arena.capacity} bytes cannot hold {plan.nbytes} bytes")
    base = arena.storage
    dsts: list[torch.UntypedStorage] = []
    for spec in plan.storages:
        end = spec.offset + spec.nbytes
        dsts.append(base[spec.offset : end] if spec.nbytes else torch.UntypedStorage(0))
    group_of: dict[int, int] = {}
    if pipelined:
        for g, (_, owned) in enumerate(plan.owners):
            for index in owned:
                group_of.setdefault(index, g)
    copier = copier or CudaCopier()
    pending: PendingCopy | None = None
    with torch.no_grad():
        eager = [i for i in range(len(plan.storages)) if i not in group_of]
        if pipelined:
            pending = _defer(plan, dsts, eager, group_of, copier, streams, check, monitor,
                             arena.pinned, helper)
        else:
            _copy_now(plan, dsts, eager, copier, streams, arena.pinned, helper)
        try:
            for tc in plan.tensors:
                tc.dst.set_(dsts[tc.storage], tc.storage_offset, tc.size, tc.stride)
        except BaseException:  # (Ctrl-C): the caller gives the arena back when this raises
            if pending is not None:
                pending.cancel()  # a copy never started: returns once queued device copies did
            raise
    locations = {
        dst._cdata: spec.location
        for spec, dst in zip(plan.storages, dsts, strict=True)
        if spec.device.type != "cpu"
    }
    ranges = [(arena.address, arena.capacity)] if arena.capacity else []
    ranges += [(s.data_ptr(), s.nbytes()) for s in plan.cloned if s.nbytes()]
    keepalive: list[object] = list(dsts)
    keepalive += plan.cloned
    # Drop the references to the caller's storages: the snapshot must not keep them alive
    # (a pending copy holds the ones it still reads until it stopped).
    for spec in plan.storages:
        spec.src = None  # type: ignore[assignment]
    return Snapshot(
        tree=plan.tree,
        nbytes=sum(s.nbytes for s in plan.storages) + sum(s.nbytes() for s in plan.cloned),
        locations=locations,
        numpy_paths=plan.numpy_paths,
        ranges=ranges,
        arena=arena,
        _keepalive=keepalive,
        pending=pending,
    )


_PIECE = 8 << 20  # a unit of work in a shared CPU copy
_SHARE_MIN = 32 << 20  # below this a second thread costs more than it saves


class SharedCopy:
    """memmoves cut into pieces that the calling thread and one helper thread claim in turn.

    The caller never waits for a helper that has not started (a busy machine may not schedule
    it for a while): once the caller runs out of pieces it closes the work, and waits only for
    the piece the helper is copying at that moment, if any. A helper that starts late finds
    nothing left and returns.
    """

    def __init__(self, pieces: list[tuple[int, int, int]]) -> None:
        self._pieces = pieces
        self._next = 0
        self._closed = False
        self._helper_busy = False
        self._cond = threading.Condition()

    def _claim(self, helper: bool) -> tuple[int, int, int] | None:
        with self._cond:
            if self._closed or self._next >= len(self._pieces):
                return None
            piece = self._pieces[self._next]
            self._next += 1
            if helper:  # (a claim by the caller must not clear it: the helper may be copying)
                self._helper_busy = True
            return piece

    def _help(self) -> None:
        while (piece := self._claim(helper=True)) is not None:
            try:
                ctypes.memmove(*piece)
            finally:
                with self._cond:
                    self._helper_busy = False
                    self._cond.notify_all()

    def run(self, helper: Executor | None) -> None:
        """Copy every piece, with ``helper``'s thread if the copy is large enough."""
        try:
            if helper is not None and sum(n for _, _, n in self._pieces) >= _SHARE_MIN:
                try:
                    helper.submit(self._help)
                except RuntimeError:  # shut down: copy alone
                    pass
            while (piece := self._claim(helper=False)) is not None:
                ctypes.memmove(*piece)
        finally:
            # Also when interrupted (Ctrl-C in a notebook): the caller gives the destination
            # buffer back when this raises, so the helper must be out of it by then.
            with self._cond:
                self._closed = True
                interrupted: BaseException | None = None
                while self._helper_busy:
                    try:
                        self._cond.wait()
                    except BaseException as exc:  # a second Ctrl-C: still wait for the piece
                        interrupted = exc
                if interrupted is not None:
                    raise interrupted


def _copy_now(
    plan: SnapshotPlan,
    dsts: list[torch.UntypedStorage],
    indices: list[int],
    copier: CudaCopier,
    streams: dict[int, torch.cuda.Stream] | None,
    pinned: bool,
    helper: Executor | None = None,
) -> None:
    """The eager copy: CPU storages directly (shared with ``helper``'s thread when they are
    large), CUDA ones on a side stream, then wait for them."""
    cuda_events: list[torch.cuda.Event] = []
    by_device: dict[torch.device, list[int]] = {}
    for i in indices:
        by_device.setdefault(plan.storages[i].device, []).append(i)
    side_streams: list[torch.cuda.Stream] = []
    try:
        _queue_and_copy(plan, dsts, by_device, copier, streams, pinned, helper, cuda_events,
                        side_streams)
    except BaseException:
        # (Ctrl-C, a failed copy): the caller gives the arena back when this raises, so the
        # device copies already queued into it must be complete first.
        for stream in side_streams:
            try:
                stream.synchronize()
            except BaseException:  # noqa: S110 - the first error is the one raised
                pass
        raise
    for event in cuda_events:
        event.synchronize()


def _queue_and_copy(
    plan: SnapshotPlan,
    dsts: list[torch.UntypedStorage],
    by_device: dict[torch.device, list[int]],
    copier: CudaCopier,
    streams: dict[int, torch.cuda.Stream] | None,
    pinned: bool,
    helper: Executor | None,
    cuda_events: list[torch.cuda.Event],
    side_streams: list[torch.cuda.Stream],
) -> None:
    """``_copy_now``'s work: queue the device copies (recording an event per device, and the
    side streams used), copy the host ones."""
    for device, specs in by_device.items():
        if device.type == "cuda":
            stream = copier.stream(device)
            side_streams.append(stream)
            stream.wait_stream(_stream_of(device, streams))
            with torch.cuda.stream(stream):
                for i in specs:
                    spec = plan.storages[i]
                    if spec.nbytes:
                        _u8(dsts[i], _CPU).copy_(_u8(spec.src, device), non_blocking=pinned)
            event = torch.cuda.Event()
            event.record(stream)
            cuda_events.append(event)
        elif device.type == "cpu":
            # memmove, not copy_: ctypes releases the GIL, and it never wakes torch's OpenMP
            # pool, whose barrier costs 10-20x the copy itself when the other cores are busy
            # (our own writer thread, the data loader). A helper thread may share the pieces.
            pieces = [
                (dsts[i].data_ptr() + start, plan.storages[i].src.data_ptr() + start,
                 min(_PIECE, plan.storages[i].nbytes - start))
                for i in specs
                for start in range(0, plan.storages[i].nbytes, _PIECE)
            ]
            SharedCopy(pieces).run(helper)
        else:
            for i in specs:
                spec = plan.storages[i]
                if spec.nbytes:
                    _u8(dsts[i], _CPU).copy_(_u8(spec.src, device))


def _defer(
    plan: SnapshotPlan,
    dsts: list[torch.UntypedStorage],
    eager: list[int],
    group_of: dict[int, int],
    copier: CudaCopier,
    streams: dict[int, torch.cuda.Stream] | None,
    check: bool,
    monitor: CopyMonitor | None,
    pinned: bool,
    helper: Executor | None = None,
) -> PendingCopy | None:
    """The pipelined copy: eager CPU storages now, the rest queued or left to the copy thread.

    CUDA storages no optimizer updates are queued on the caller's stream (anything that later
    changes them in place on that stream runs after the copy, with no guard); those an optimizer
    updates go on the side stream, with an event after each optimizer's group for its guard.
    """
    eager_cpu = [i for i in eager if plan.storages[i].device.type != "cuda"]
    _copy_now(plan, dsts, eager_cpu, copier, streams, pinned, helper)
    # (group, storage index): group -1 is "no optimizer" (CUDA only, ordered by its stream)
    order = sorted(
        [(-1, i) for i in eager if plan.storages[i].device.type == "cuda"]
        + [(g, i) for i, g in group_of.items()]
    )
    if not order:
        return None
    items: list[DeferredStorage] = []
    for g, i in order:
        spec = plan.storages[i]
        src = _u8(spec.src, spec.device)
        expected = None
        if check:  # debug only: a full read now (for CUDA, a synchronous copy to the host)
            if spec.device.type == "cuda":
                with torch.cuda.stream(_stream_of(spec.device, streams)):
                    expected = host_checksum(src.cpu())
            else:
                expected = host_checksum(src)
        items.append(DeferredStorage(src, _u8(dsts[i], _CPU), format_path(spec.first_path),
                                     g, expected))
    # CUDA device index per item (None: a CPU storage, copied by the copy thread)
    device_of = [
        _index_of(plan.storages[i].device) if plan.storages[i].device.type == "cuda" else None
        for _, i in order
    ]
    done: list[torch.cuda.Event] = []
    # per device: group -> the event recorded after that group's last copy on the side stream
    group_events: dict[int, dict[int, torch.cuda.Event]] = {}
    for index in sorted({d for d in device_of if d is not None}):
        device = torch.device("cuda", index)
        caller = _stream_of(device, streams)
        side = copier.stream(device)
        side.wait_stream(caller)
        events = group_events.setdefault(index, {})
        mine = [item for item, d in zip(items, device_of, strict=True) if d == index]
        for k, item in enumerate(mine):
            with torch.cuda.stream(caller if item.group < 0 else side):
                if item.nbytes and item.src is not None:
                    item.dst.copy_(item.src, non_blocking=pinned)
            if item.group >= 0 and (k + 1 == len(mine) or mine[k + 1].group != item.group):
                event = torch.cuda.Event()
                event.record(side)
                events[item.group] = event
        for stream in (caller, side):
            event = torch.cuda.Event()
            event.record(stream)
            done.append(event)
    position = {i: k for k, (_, i) in enumerate(order)}
    groups: list[GuardGroup] = []
    for optimizer, owned in plan.owners:
        ks = [position[i] for i in owned]
        cpu_items = tuple(k for k in ks if device_of[k] is None)
        waits: dict[int, torch.cuda.Event] = {}
        for index, events in group_events.items():
            on_device = [items[k].group for k in ks if device_of[k] == index]
            if on_device:
                waits[index] = events[max(on_device)]
        if cpu_items or waits:
            groups.append(GuardGroup(optimizer, cpu_items, waits))
    return PendingCopy(items, groups, done, monitor)
