"""Planning: what each rank writes, through DCP's own planner, and when a cached plan still holds.

DCP's ``DefaultSavePlanner`` does the work: ``set_up_planner`` flattens the state dict (nested
dicts/lists become dotted keys, recorded in ``planner_data``), ``create_local_plan`` lists one
``WriteItem`` per tensor, DTensor/ShardedTensor shard and non-tensor value on this rank, and
``create_global_plan`` (rank 0) de-duplicates the items several ranks hold (replicated
tensors: DDP parameters, ``Replicate()`` DTensors, equal plain values), spreading them over the
ranks by size, and builds the checkpoint's ``Metadata``. We call those methods; we do not
reimplement them.

What we add is the cache. A rank's *structure key* hashes its local plan (keys, shard offsets,
shapes, dtypes, placements as chunks, flattening map). The global plan is a deterministic
function of all ranks' local plans, so its identity is the hash of all ranks' keys
(:func:`plan_id`): a rank that snapshots with a cached plan records that id, and the commit
collective, which gathers every rank's key anyway, tells whether the plan everyone used is
the plan the current structure calls for. Steady-state saves therefore plan locally only (no
collective); a structure change re-plans inside the commit round.

A re-plan must never ask a rank for data it did not copy (the writer cannot touch live
tensors), so besides the canonical plan, :func:`plan_global` returns a *restricted* plan that
assigns every item to a rank holding it in its snapshot; when no such rank exists for some
item, the save cannot be completed and fails, and the canonical plan serves the next save.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType
from torch.distributed.checkpoint.stateful import Stateful

__all__ = [
    "GlobalPlan",
    "is_bytes",
    "LocalPlan",
    "make_local_plan",
    "plan_global",
    "plan_id",
    "structure_key",
]


@dataclass(eq=False)
class LocalPlan:
    """One rank's view of one save, built on the caller's thread.

    Attributes:
        planner: DCP's planner, set up on the flattened state (holds live references: read it
            on the caller's thread only, to take the snapshot).
        plan: the local ``SavePlan`` (every item this rank holds, before de-duplication).
        key: the structure key of ``plan``.
    """

    planner: DefaultSavePlanner
    plan: SavePlan
    key: str


@dataclass(frozen=True)
class GlobalPlan:
    """The outcome of one global planning round, as rank 0 hands it to every rank.

    Attributes:
        id: the plan's identity (:func:`plan_id` of all ranks' keys for the canonical plan).
        items: per rank, the items that rank writes.
        metadata: the checkpoint's DCP metadata, without ``storage_data`` (rank 0 only; None
            in the copies scattered to other ranks).
    """

    id: str
    items: tuple[tuple[WriteItem, ...], ...]
    metadata: Metadata | None


def _to_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level values with ``state_dict()`` (modules, optimizers) become their state dicts,
    as ``dcp.save`` does."""
    if not isinstance(state, Mapping):
        raise TypeError(
            f"a multi-rank checkpoint needs a dict of named values (as torch.distributed."
            f"checkpoint does), got {type(state).__qualname__}"
        )
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"state key {key!r}: multi-rank checkpoints need str keys")
        out[key] = value.state_dict() if isinstance(value, Stateful) else value
    return out


def structure_key(plan: SavePlan) -> str:
    """Hash of everything in a local plan that decides the global plan and metadata."""
    h = xxhash.xxh3_128()
    for item in plan.items:
        parts: list[object] = [item.index.fqn, item.index.offset, item.type.name]
        data = item.tensor_data
        if data is not None:
            parts += [tuple(data.size), tuple(data.chunk.offsets), tuple(data.chunk.sizes),
                      data.properties.dtype]
        h.update(repr(parts).encode())
    h.update(repr(sorted((k, tuple(v)) for k, v in (plan.planner_data or {}).items())).encode())
    return h.hexdigest()


def plan_id(keys: Sequence[str]) -> str:
    """The identity of the canonical global plan for these per-rank structure keys."""
    return xxhash.xxh3_64_hexdigest("\0".join(keys).encode())


def make_local_plan(state: Mapping[str, Any], *, is_coordinator: bool) -> LocalPlan:
    """Flatten ``state`` and list what this rank holds (no collective)."""
    planner = DefaultSavePlanner()
    planner.set_up_planner(_to_state_dict(state), None, is_coordinator)
    plan = planner.create_local_plan()
    return LocalPlan(planner, plan, structure_key(plan))


def _global(plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
    # A fresh planner per round: DCP's own plan cache is class-level state we do not use.
    return DefaultSavePlanner().create_global_plan(plans)


def _covers(metadata: Metadata, reference: Metadata) -> bool:
    """Whether ``metadata`` describes every key and chunk ``reference`` does."""
    if metadata.state_dict_metadata.keys() != reference.state_dict_metadata.keys():
        return False
    for key, ref in reference.state_dict_metadata.items():
        got = metadata.state_dict_metadata[key]
        if isinstance(ref, TensorStorageMetadata):
            if not isinstance(got, TensorStorageMetadata):
                return False
            mine = {(tuple(c.offsets), tuple(c.sizes)) for c in got.chunks}
            if mine != {(tuple(c.offsets), tuple(c.sizes)) for c in ref.chunks}:
                return False
    return True


def plan_global(
    plans: Sequence[SavePlan],
    keys: Sequence[str],
    available: Sequence[frozenset[MetadataIndex] | None],
) -> tuple[GlobalPlan, GlobalPlan | None]:
    """Rank 0: the canonical plan, and the plan this save can use given what ranks copied.

    Args:
        plans: every rank's local plan.
        keys: every rank's structure key.
        available: per rank, the items its snapshot holds (None: all of its local plan).

    Returns:
        ``(canonical, restricted)``; ``restricted`` is the canonical plan itself when every
        rank copied what the canonical plan asks of it, another plan when some items had to be
        moved to other holders, and None when some item is held by no rank that copied it.

    Raises:
        ValueError: DCP rejected the global plan (overlapping or out-of-bounds shards).
    """
    canonical_id = plan_id(keys)
    global_plans, metadata = _global(list(plans))
    canonical = GlobalPlan(canonical_id, tuple(tuple(p.items) for p in global_plans), metadata)

    def has(rank: int, item: WriteItem) -> bool:
        held = available[rank]
        return held is None or item.index in held

    if all(has(r, item) for r, items in enumerate(canonical.items) for item in items):
        return canonical, canonical
    filtered = [
        dataclasses.replace(p, items=[i for i in p.items if has(r, i)])
        for r, p in enumerate(plans)
    ]
    try:
        sub_plans, sub_metadata = _global(filtered)
    except ValueError:
        return canonical, None
    if not _covers(sub_metadata, metadata):
        return canonical, None
    restricted_id = "r" + xxhash.xxh3_64_hexdigest(
        (canonical_id + repr([sorted(repr(i.index) for i in p.items) for p in sub_plans])).encode()
    )
    return canonical, GlobalPlan(
        restricted_id, tuple(tuple(p.items) for p in sub_plans), sub_metadata
    )


def is_bytes(item: WriteItem) -> bool:
    """Whether the item is a non-tensor value (written as a ``torch.save`` blob of it)."""
    return item.type == WriteItemType.BYTE_IO
