"""Replaying a plan: the state's structure repeats from save to save, so its plan does too.

A training loop saves the same model and optimizer again and again: the values change, the
structure does not. :func:`plan_snapshot` records what it planned as a :class:`PlanLayout`;
:func:`replay_plan` walks the next state the same way (every container, scalar and
``state_dict()`` call, validated as before) but, instead of planning each tensor anew, checks it
against the layout's tensor at the same place in the walk:

* its :data:`~asyncckpt._snapshot.plan.TensorKey` (type, dtype, device, layout, grad flag,
  offset, shape, stride) is the same;
* it views the same storage *as the layout sees it*: the first tensor on a storage opens the
  next storage of the layout (of the same size), and a later tensor on a storage met before
  views the storage the layout has there. Which storage object it is does not matter (a fresh
  ``torch.get_rng_state()`` at every save replays); how the state's tensors share storages does.

Anything else -- a tensor resized, a new optimizer state entry, a parameter group added, two
tensors that now share a storage or no longer do, a numpy array, a tensor that must be cloned --
is a mismatch, and the caller plans from scratch. The optimizers' owned storages (pipelined
snapshots) are computed afresh from the state at every save, so a parameter group that
changes what an optimizer updates is always seen.

With a replayed plan the arena-side work is reused too: an arena remembers the placeholder
tensors it bound for a layout (``pool.Arena.binding``), and a replay into that arena puts those
same placeholders into the new tree instead of binding new ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from .plan import (
    PlanLayout,
    SnapshotPlan,
    _Planner,
    check_key,
    owned_storages,
    placeholder,
    tensor_key,
)

__all__ = ["ArenaBinding", "replay_plan"]


@dataclass(eq=False)
class ArenaBinding:
    """Placeholders bound into one arena for one layout, reused by the next replay there.

    Attributes:
        layout: the layout the placeholders follow.
        dsts: per storage of the layout, its slice of the arena.
        placeholders: per tensor of the layout, its placeholder, viewing its slice.
    """

    layout: PlanLayout
    dsts: list[torch.UntypedStorage]
    placeholders: list[torch.Tensor]


class _Mismatch(Exception):
    """The state no longer has the layout's structure."""


class _Replayer(_Planner):
    def __init__(self, layout: PlanLayout, bound: ArenaBinding | None,
                 extra_types: Collection[type]) -> None:
        super().__init__(extra_types)
        self.layout = layout
        self.bound = bound.placeholders if bound is not None else None
        self._tensors: dict[int, torch.Tensor] = {}
        self.count = 0

    # Tensors are leaves, and the most numerous objects of a large state: they are handled
    # before anything else, without building their path (only errors need it, and a replay
    # reports none for a tensor: it gives up) and memoized apart (a tensor is always reachable
    # from a container the walk holds, so its id cannot be reused meanwhile).
    def visit(self, obj: object, path: tuple[object, ...]) -> object:
        kind = type(obj)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            return self._leaf(obj)  # type: ignore[arg-type]
        return super().visit(obj, path)

    def _visit_new(self, obj: Any, kind: type, path: tuple[object, ...]) -> object:
        if (kind is not dict and kind is not OrderedDict) or kind in self.extra_types:
            return super()._visit_new(obj, kind, path)
        out: dict[object, object] = kind()
        visit, leaf, tensor, parameter = self.visit, self._leaf, torch.Tensor, torch.nn.Parameter
        for key, value in obj.items():
            if type(key) is not str:  # (a str key is always valid)
                check_key(key, path)
            vkind = type(value)
            if vkind is tensor or vkind is parameter:
                out[key] = leaf(value)
            else:
                out[key] = visit(value, (*path, key))
        if kind is OrderedDict and obj.__dict__:
            for attr, value in obj.__dict__.items():
                setattr(out, attr, visit(value, (*path, attr)))
        return out

    def _leaf(self, t: torch.Tensor) -> torch.Tensor:
        oid = id(t)
        copy = self._tensors.get(oid)
        if copy is None:
            copy = self._tensors[oid] = self._tensor(t, ())
        return copy

    def _tensor(self, t: torch.Tensor, path: tuple[object, ...]) -> torch.Tensor:
        k = self.count
        expected = self.layout.expected
        if k >= len(expected):
            raise _Mismatch
        key, index, nbytes = expected[k]
        try:
            # (a quantized or meta tensor differs in its key's dtype or device; a nested one
            # has no strides)
            if tensor_key(t) != key or t.is_neg() or (key[1].is_complex and t.is_conj()):
                raise _Mismatch  # the planner clones those
        except RuntimeError:
            raise _Mismatch from None
        storage = t.untyped_storage()
        cdata = storage._cdata
        seen = self.by_cdata.get(cdata)
        if seen is None:
            if index != len(self.sources) or nbytes != storage.nbytes():
                raise _Mismatch
            self.by_cdata[cdata] = index
            self.sources.append(storage)
        elif seen != index:
            raise _Mismatch
        self.count = k + 1
        if self.bound is not None:
            return self.bound[k]
        dst = placeholder(type(t), t.dtype, t.requires_grad)
        self.placeholders.append(dst)
        return dst

    def _ndarray(self, arr: Any, path: tuple[object, ...], np: Any) -> torch.Tensor:
        raise _Mismatch

    def _clone(self, t: torch.Tensor, path: tuple[object, ...]) -> torch.Tensor:
        raise _Mismatch


def replay_plan(
    state: object,
    layout: PlanLayout,
    bound: ArenaBinding | None = None,
    extra_types: Collection[type] = (),
    *,
    owners: bool = True,
) -> SnapshotPlan | None:
    """Plan ``state`` by replaying ``layout``; None if its structure differs (plan afresh).

    Args:
        state: the state to snapshot.
        layout: from an earlier plan of a state of the same structure.
        bound: the binding of the arena the snapshot will be copied into, if it follows
            ``layout``: its placeholders go into the tree (already bound).
        extra_types: as for :func:`~asyncckpt._snapshot.plan.plan_snapshot`.
        owners: also find what each optimizer in the state updates (pipelined snapshots).

    Raises:
        TypeError: something in the state cannot be checkpointed (as ``plan_snapshot``).
    """
    replayer = _Replayer(layout, bound, extra_types)
    try:
        tree = replayer.visit(state, ())
    except _Mismatch:
        return None
    except RecursionError:
        return None  # plan_snapshot says what is wrong
    if replayer.count != len(layout.keys) or len(replayer.sources) != len(layout.storages):
        return None
    found = [
        (opt, owned_storages(opt, replayer.by_cdata)) for opt in replayer.optimizers
    ] if owners else []
    placeholders = bound.placeholders if bound is not None else replayer.placeholders
    return SnapshotPlan(
        tree, layout.storages, layout.tensors, [], [], layout.nbytes, found,
        replayer.sources, placeholders, layout, bound,
    )
