"""Planning a snapshot: walk the caller's state once, validate it, and list what to copy.

``plan_snapshot(state)`` runs on the caller's thread: it validates every object (TypeError
naming its path), calls ``state_dict()`` on modules / optimizers / schedulers, deep-copies
instances of the configured extra types, collects each distinct tensor storage once, and builds
the result tree with empty placeholder tensors. Nothing is copied yet, so the writer can size
and reserve a buffer first (``snapshot.take_snapshot`` copies).
"""

from __future__ import annotations

import copy
import sys
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.serialization import location_tag

from .._format.paths import PathKey
from .pool import align

__all__ = [
    "PlanLayout",
    "SnapshotPlan",
    "TensorKey",
    "check_key",
    "format_path",
    "owned_storages",
    "placeholder",
    "plan_snapshot",
    "tensor_key",
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


@dataclass(eq=False, slots=True)
class _StorageCopy:
    nbytes: int
    device: torch.device
    location: str
    dtype: torch.dtype
    first_path: tuple[object, ...]
    offset: int = 0


@dataclass(eq=False, slots=True)
class _TensorCopy:
    storage: int
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


#: What identifies a planned tensor, besides the storage it views: a tensor of another type,
#: dtype, device, layout, grad flag, offset, shape or stride needs another plan.
TensorKey = tuple[type[torch.Tensor], torch.dtype, torch.device, torch.layout, bool,
                  int | torch.SymInt, torch.Size, tuple[int, ...]]


def tensor_key(t: torch.Tensor) -> TensorKey:
    """The :data:`TensorKey` of ``t``."""
    return (type(t), t.dtype, t.device, t.layout, t.requires_grad, t.storage_offset(), t.shape,
            t.stride())


@dataclass(eq=False)
class PlanLayout:
    """What a plan is, once its state's values are set aside: reused while the structure repeats.

    Attributes:
        storages: the storages to copy, in order of first appearance, with their arena offsets.
        tensors: per tensor met in the walk, in walk order: the storage it views and how.
        keys: per tensor, its :data:`TensorKey` (what a repeated state must match).
        nbytes: arena bytes needed.
    """

    storages: list[_StorageCopy]
    tensors: list[_TensorCopy]
    keys: list[TensorKey]
    nbytes: int
    #: derived figures a snapshot needs, computed once (``snapshot._summary``)
    summary: object | None = None
    #: per tensor: its key, the index of its storage and that storage's size (what a replay
    #: checks, in one place)
    expected: list[tuple[TensorKey, int, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.expected = [
            (key, tc.storage, self.storages[tc.storage].nbytes)
            for key, tc in zip(self.keys, self.tensors, strict=True)
        ]


@dataclass(eq=False)
class SnapshotPlan:
    """What a snapshot will copy; built by :func:`plan_snapshot` (or replayed from a
    :class:`PlanLayout` by ``replay.replay_plan``)."""

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
    #: the caller's storage behind each entry of ``storages`` (the list is emptied once the
    #: snapshot is copied, so that it keeps none of them alive)
    sources: list[torch.UntypedStorage] = field(default_factory=list)
    #: the placeholder tensor in ``tree`` for each entry of ``tensors``
    placeholders: list[torch.Tensor] = field(default_factory=list)
    #: the reusable part (None: this state cannot be replayed, e.g. it holds numpy arrays)
    layout: PlanLayout | None = None
    #: the placeholders are already bound to this arena binding (``pool.Arena.binding``)
    bound: object | None = None

    @property
    def devices(self) -> set[torch.device]:
        return {s.device for s in self.storages}



def _numpy() -> Any:
    return sys.modules.get("numpy")  # never import numpy just to find out a value is not an array


def check_key(key: object, path: tuple[object, ...]) -> None:
    if key == b"":
        raise TypeError(
            f"{format_path(path)} has the dict key b'', which torch.load(weights_only=True) "
            "cannot read back (empty bytes); use another key"
        )
    if type(key) in _KEY_SCALARS:
        return
    if type(key) is tuple:
        for k in key:
            check_key(k, path)
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
        self.sources: list[torch.UntypedStorage] = []
        self.tensors: list[_TensorCopy] = []
        self.placeholders: list[torch.Tensor] = []
        self.keys: list[TensorKey] = []
        self.numpy_paths: list[PathKey] = []
        self.cloned: list[torch.UntypedStorage] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.by_cdata: dict[int, int] = {}
        self.saw_numpy = False
        self.saw_clone = False
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
                check_key(key, path)
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
        self.saw_numpy = True  # a fresh tensor over the array each time: nothing to replay
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
            self.storages.append(_StorageCopy(storage.nbytes(), device, location, t.dtype, path))
            self.sources.append(storage)
        else:
            spec = self.storages[index]
            if spec.dtype != t.dtype:
                raise TypeError(
                    f"{format_path(path)} ({t.dtype}) and {format_path(spec.first_path)} "
                    f"({spec.dtype}) view the same storage as different dtypes, which torch.save "
                    "cannot store; clone one of them"
                )
        self.tensors.append(
            _TensorCopy(index, int(t.storage_offset()), tuple(t.size()), tuple(t.stride()))
        )
        self.keys.append(tensor_key(t))
        dst = placeholder(kind, t.dtype, t.requires_grad)
        self.placeholders.append(dst)
        return dst

    def _clone(self, t: torch.Tensor, path: tuple[object, ...]) -> torch.Tensor:
        """Copy a tensor the pool cannot hold (sparse, quantized, conj/neg views, meta)."""
        self.saw_clone = True  # copied while planning, each time: nothing to replay
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


def placeholder(kind: type, dtype: torch.dtype, requires_grad: bool) -> torch.Tensor:
    """An empty tensor of ``kind`` (Tensor or Parameter), bound to the arena later."""
    dst = torch.empty(0, dtype=dtype)
    if kind is torch.nn.Parameter:
        return torch.nn.Parameter(dst, requires_grad=requires_grad)
    if requires_grad:
        dst.requires_grad_(True)
    return dst


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
    owners = [(opt, owned_storages(opt, planner.by_cdata)) for opt in planner.optimizers]
    layout = None
    if not (planner.saw_numpy or planner.saw_clone):
        layout = PlanLayout(planner.storages, planner.tensors, planner.keys, offset)
    return SnapshotPlan(
        tree, planner.storages, planner.tensors, planner.numpy_paths, planner.cloned, offset,
        owners, planner.sources, planner.placeholders, layout,
    )


def owned_storages(optimizer: torch.optim.Optimizer, by_cdata: dict[int, int]) -> tuple[int, ...]:
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
