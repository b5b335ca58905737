"""The multi-rank save: snapshot on the caller's thread, write and agree on the writer's.

One save, on every rank, in the same order::

    prepare(state, name)           caller thread, no collective
      local plan (DCP planner) -> structure key -> cached plan still valid?
      snapshot the items this rank writes (cached plan) or holds (no valid plan)
    commit(part)                   writer thread
      write __<rank>_0.distcp (a shared filesystem: into .asyncckpt-tmp.<name>.<session>.<n>/,
                                  fsync; S3: the object <name>/__<rank>_0.distcp)
      all_gather(record)           durable? files, sizes, checksums, structure key, plan used
        any rank failed / names differ  -> every rank raises DistributedSaveError
        plan used != plan the keys call for
                                   -> gather local plans, rank 0 plans (DCP dedup),
                                      scatter; ranks rewrite their file; all_gather again
      rank 0: .metadata, manifest, publish (rename to <name>, fsync parent; S3: nothing),
              on_published (the index entry: on S3 that is the commit)
      broadcast(outcome)           every rank returns the same CommitResult or raises

Steady state (structure unchanged) costs one all_gather of a ~200-byte record per rank (plus
the changed item offsets, usually none) and one broadcast; re-planning happens only when some
rank's structure key changed, inside the same ordered sequence of collectives, so ranks never
disagree on which collective comes next.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, WriteItem

from .._snapshot.plan import plan_snapshot
from .._snapshot.pool import BufferPool
from .._snapshot.snapshot import Snapshot, take_snapshot
from .errors import DistributedSaveError
from .files import (
    METADATA_NAME,
    FileRecord,
    check_name,
    rank_file_name,
    write_manifest,
    write_rank_file,
    write_small_file,
)
from .group import CheckpointGroup
from .planning import GlobalPlan, is_bytes, make_local_plan, plan_global, plan_id
from .targets import Layout, LocalLayout, SaveTarget, create_file

__all__ = ["CommitResult", "DistSaver", "RankPart"]

_DCP_VERSION = "1.0.0"  # the metadata version DCP's FileSystemWriter records
_METADATA_HAS_VERSION = "version" in {f.name for f in dataclasses.fields(Metadata)}


@dataclass(eq=False)
class RankPart:
    """What one rank contributes to one save (built by :meth:`DistSaver.prepare`)."""

    sequence: int
    name: str | None
    key: str = ""
    local_plan: SavePlan | None = None
    used: str | None = None  # id of the plan whose items were copied; None: all local items
    items: list[WriteItem] = field(default_factory=list)  # aligned with payloads
    payloads: list[torch.Tensor | bytes] = field(default_factory=list)
    snapshot: Snapshot | None = None
    error: BaseException | None = None
    # the outcome broadcast failed: rank 0 may have recorded the checkpoint already
    outcome_unknown: bool = False


@dataclass(frozen=True)
class CommitResult:
    """A committed multi-rank checkpoint, the same on every rank.

    Attributes:
        name: the checkpoint's name under the parent.
        directory: its path (or URI on S3).
        files: every file in it (rank files, ``.metadata``, manifest) with size and checksum:
            what the index entry records and ``verify`` checks.
        world_size: ranks that wrote it.
        replanned: whether this save had to (re)build the plan.
        published: what rank 0's ``on_published`` returned (e.g. the index entry it
            recorded), the same on every rank; None without one.
    """

    name: str
    directory: str
    files: tuple[FileRecord, ...]
    world_size: int
    replanned: bool
    published: Any = None

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class _Record:
    rank: int
    sequence: int
    name: str
    error: str | None
    key: str
    used: str | None
    file: FileRecord | None
    storage: dict[MetadataIndex, tuple[int, int]] | None
    full: bool  # storage is complete (else: the entries that changed since the last commit)


@dataclass(frozen=True)
class _Cached:
    id: str
    key: str  # this rank's structure key the plan was made for
    items: tuple[WriteItem, ...]


class DistSaver:
    """Saves multi-rank checkpoints into one folder every rank reaches: a directory on a shared
    filesystem or an S3 prefix (:mod:`.targets`).

    Collective: every rank creates one, and calls :meth:`prepare` then :meth:`commit` for every
    save, with the same names in the same order. :meth:`prepare` runs on the training thread
    (it copies this rank's share of the state); :meth:`commit` may run on another thread.

    Args:
        parent: the folder that holds the checkpoints: a directory path (a
            :class:`LocalLayout`) or a :class:`Layout`.
        group: the checkpoint process group (owned by the caller).
        pool: host buffers for snapshots (default: a private pool of 2 arenas).
        open_file: how files are created in a directory ``parent`` (tests inject faults).

    Raises:
        ValueError: ``open_file`` was given with a :class:`Layout`.
    """

    def __init__(self, parent: str | os.PathLike[str] | Layout, group: CheckpointGroup, *,
                 pool: BufferPool | None = None,
                 open_file: Callable[[str], BinaryIO] = create_file) -> None:
        if isinstance(parent, Layout) and open_file is not create_file:
            raise ValueError(f"DistSaver: open_file cannot be combined with the layout {parent!r}")
        self.layout = parent if isinstance(parent, Layout) \
            else LocalLayout(parent, open_file=open_file)
        self.parent = self.layout.location
        self.group = group
        self.pool = pool if pool is not None else BufferPool(2)
        self._on_published: Callable[[CommitResult], Any] | None = None
        self._lock = threading.Lock()
        self._plan: _Cached | None = None  # shared with the caller thread
        self._metadata: dict[str, Metadata] = {}  # rank 0: plan id -> metadata
        self._sent: tuple[str | None, dict[MetadataIndex, tuple[int, int]]] = (None, {})
        self._known: list[tuple[str | None, dict[MetadataIndex, tuple[int, int]]]] = [
            (None, {}) for _ in range(group.world_size)
        ]  # rank 0: what each rank's storage was at the last commit
        if group.rank == 0:
            self.layout.prepare()
        self.plans_made = 0

    @property
    def rank(self) -> int:
        return self.group.rank

    # -- caller thread -------------------------------------------------------------------------
    def prepare(self, state: Mapping[str, Any], name: str | None = None) -> RankPart:
        """Plan locally and copy this rank's share of ``state``; never raises for bad state.

        A failure (bad state, bad name) is recorded in the part and reported to every rank at
        :meth:`commit`, so the other ranks get an error naming this rank instead of waiting
        for it. ``name`` may be left to :meth:`commit` (a front door names a save once it is
        queued).
        """
        part = RankPart(self.group.next_sequence(), name)
        try:
            if name is not None:
                check_name(name)
            local = make_local_plan(state, is_coordinator=self.rank == 0)
            part.key, part.local_plan = local.key, dataclasses.replace(local.plan)
            with self._lock:
                cached = self._plan
            if cached is not None and cached.key == local.key:
                part.used, items = cached.id, list(cached.items)
            else:
                items = list(local.plan.items)
            tensors = [i for i in items if not is_bytes(i)]
            values = [i for i in items if is_bytes(i)]
            sources = [local.planner.resolve_data(i).detach() for i in tensors]
            plan = plan_snapshot(sources)
            self.pool.drop_oversized(plan.nbytes)  # the first save copied the whole state
            arena = self.pool.acquire(plan.nbytes)
            try:
                snapshot = take_snapshot(plan, arena)
            except BaseException:
                self.pool.release(arena)
                raise
            part.snapshot = snapshot
            part.items = tensors + values
            part.payloads = [*snapshot.tree, *(_payload_bytes(local.planner.resolve_data(i))
                                                for i in values)]
        except Exception as exc:
            self.release(part)
            part.error = exc
        return part

    def release(self, part: RankPart) -> None:
        """Give the part's host buffer back (commit does it; call it for a part never
        committed)."""
        if part.snapshot is not None and part.snapshot.arena is not None:
            self.pool.release(part.snapshot.arena)
        part.snapshot, part.payloads = None, []

    # -- writer thread -------------------------------------------------------------------------
    def commit(self, part: RankPart, *, name: str | None = None,
               on_published: Callable[[CommitResult], Any] | None = None) -> CommitResult:
        """Write this rank's file, agree with every rank, publish; the same result everywhere.

        Args:
            part: from :meth:`prepare` on this rank.
            name: the checkpoint's name, if :meth:`prepare` was not given one.
            on_published: run on rank 0 once the directory is in place, before the outcome
                is broadcast (a front door records the checkpoint in its index there). If it
                raises, the directory is moved out of the way and every rank gets the error;
                what it returns reaches every rank as ``CommitResult.published``.

        Raises:
            DistributedSaveError: some rank failed (its error is in the message and
                ``ranks``), ranks disagree on the name, or publishing failed; nothing was
                renamed into place.
            CheckpointGroupError: a peer died or did not arrive within the group's timeout.
        """
        if name is not None:
            part.name = name
            try:
                check_name(name)
            except ValueError as exc:  # reported to every rank at the agreement
                part.error = part.error or exc
        if part.name is None:
            part.name = f"unnamed-{part.sequence}"
            part.error = part.error or ValueError(
                "no checkpoint name was given to prepare() or commit()")
        self._on_published = on_published
        target = self.layout.target(part.name, self.group.session, part.sequence)
        try:
            record = self._write(part, target, part.items, part.used)
            return self._agree(part, record, target)
        except BaseException:
            target.discard(self.rank, recorded_maybe=part.outcome_unknown)
            raise
        finally:
            self.release(part)

    def _write(self, part: RankPart, target: SaveTarget,
               items: list[WriteItem] | tuple[WriteItem, ...], used: str | None) -> _Record:
        file: FileRecord | None = None
        storage: dict[MetadataIndex, tuple[int, int]] = {}
        error = None if part.error is None else _describe(part.error)
        if error is None:
            try:
                position = {item.index: k for k, item in enumerate(part.items)}
                payloads = [part.payloads[position[item.index]] for item in items]
                file, where = write_rank_file(target, self.rank, payloads, part.snapshot)
                storage = {item.index: (loc.offset, loc.length)
                           for item, loc in zip(items, where, strict=True)}
            except Exception as exc:
                error = _describe(exc)
        sent_plan, sent = self._sent
        full = used is None or used != sent_plan
        if not full:
            storage = {k: v for k, v in storage.items() if sent.get(k) != v}
        if part.name is None:
            raise RuntimeError("a rank's part reached the commit without a checkpoint name")
        return _Record(self.rank, part.sequence, part.name, error, part.key, used, file,
                       storage, full)

    def _agree(self, part: RankPart, record: _Record, target: SaveTarget) -> CommitResult:
        what = f"commit checkpoint {part.name!r}"
        replanned: GlobalPlan | None = None
        mine: dict[MetadataIndex, tuple[int, int]] = {}
        for _round in range(2):
            records: list[_Record] = self.group.all_gather(record, what=what)
            _check_records(records, part)
            mine = self._merge_own(record)
            with self._lock:
                current = self._plan
            accepted = {replanned.id} if replanned is not None else (
                {current.id} if current is not None else set())
            if (all(r.used in accepted for r in records)
                    and (replanned is not None or plan_id([r.key for r in records]) in accepted)):
                return self._publish(part, records, target, replanned, mine)
            if replanned is not None:  # cannot happen: every rank wrote the scattered plan
                raise DistributedSaveError(f"{what}: ranks wrote different plans after re-planning")
            replanned = self._replan(part, records)
            items = replanned.items[self.rank]
            # a failure here is reported to every rank in the next round
            record = self._write(part, target, items, replanned.id)
        raise AssertionError("unreachable")  # pragma: no cover

    def _merge_own(self, record: _Record) -> dict[MetadataIndex, tuple[int, int]]:
        sent_plan, sent = self._sent
        merged = dict(record.storage or {}) if record.full else {**sent, **(record.storage or {})}
        return merged

    def _replan(self, part: RankPart, records: list[_Record]) -> GlobalPlan:
        what = f"re-plan checkpoint {part.name!r} (the state's structure changed)"
        available = None if part.used is None else frozenset(i.index for i in part.items)
        gathered = self.group.gather((part.local_plan, available), what=what)
        messages: list[tuple[Any, Any, str | None]] | None = None
        if gathered is not None:
            keys = [r.key for r in records]
            try:
                canonical, restricted = plan_global([g[0] for g in gathered], keys,
                                                    [g[1] for g in gathered])
            except ValueError as exc:
                messages = [(None, None, f"DCP rejected the global plan: {exc}")] * len(keys)
            else:
                self._metadata = {p.id: p.metadata for p in (canonical, restricted)
                                  if p is not None and p.metadata is not None}
                messages = [
                    (_Cached(canonical.id, keys[r], canonical.items[r]),
                     None if restricted is None else GlobalPlan(
                         restricted.id, restricted.items, None),
                     None)
                    for r in range(len(keys))
                ]
        cached, restricted, error = self.group.scatter(messages, what=what)
        self.plans_made += 1
        if error is not None:
            raise DistributedSaveError(f"checkpoint {part.name!r}: {error}")
        with self._lock:
            self._plan = cached
        if restricted is None:
            raise DistributedSaveError(
                f"checkpoint {part.name!r} was not saved: the state's structure changed on some "
                "ranks only, and some values are now assigned to ranks that did not copy them; "
                "the plan was rebuilt and the next save will use it"
            )
        return restricted

    def _publish(self, part: RankPart, records: list[_Record], target: SaveTarget,
                 replanned: GlobalPlan | None, mine: dict[MetadataIndex, tuple[int, int]],
                 ) -> CommitResult:
        name = part.name or ""  # set by commit()
        used = records[0].used
        outcome: tuple[str | None, list[FileRecord], Any] = (None, [], None)
        known: list[Any] = []
        files = sorted((r.file for r in records if r.file is not None), key=lambda f: f.name)
        if self.rank == 0:
            try:
                known = [self._merged(r) for r in records]
                extra = self._write_metadata(part, records, target, used, known)
            except Exception as exc:
                outcome = (_describe(exc), [], None)
            else:
                outcome = (None, extra, None)
                if self._on_published is not None:
                    try:
                        value = self._on_published(CommitResult(
                            name, target.location, (*files, *extra), len(records),
                            replanned is not None))
                    except Exception as exc:
                        target.unpublish()
                        outcome = (f"recording it failed: {_describe(exc)}", [], None)
                    else:
                        outcome = (None, extra, value)
        try:
            error, extra, published = self.group.broadcast(
                outcome, what=f"publish checkpoint {name!r}")
        except BaseException:
            part.outcome_unknown = True
            raise
        if error is not None:
            raise DistributedSaveError(
                f"checkpoint {name!r} was not published by rank 0: {error}", (0,))
        self._sent = (used, mine)
        if self.rank == 0:
            self._known = [(used, k) for k in known]
        return CommitResult(name, target.location, (*files, *extra), len(records),
                            replanned is not None, published)

    def _merged(self, record: _Record) -> dict[MetadataIndex, tuple[int, int]]:
        plan, previous = self._known[record.rank]
        if record.full or plan != record.used:
            return dict(record.storage or {})
        return {**previous, **(record.storage or {})}

    def _write_metadata(self, part: RankPart, records: list[_Record], target: SaveTarget,
                        used: str | None, known: list[dict[MetadataIndex, tuple[int, int]]],
                        ) -> list[FileRecord]:
        base = self._metadata.get(used or "")
        if base is None:
            raise RuntimeError(f"no metadata for plan {used!r} on rank 0")
        storage_data = {
            index: _StorageInfo(rank_file_name(r), offset, length)
            for r, entries in enumerate(known)
            for index, (offset, length) in entries.items()
        }
        # DCP records a metadata version from torch 2.9 on (the field is absent before), as its
        # own FileSystemWriter does on the torch it ships with
        versioned: dict[str, Any] = {"version": _DCP_VERSION} if _METADATA_HAS_VERSION else {}
        metadata = dataclasses.replace(
            base, storage_data=storage_data, **versioned,
            storage_meta=StorageMeta(checkpoint_id=target.location, save_id=uuid.uuid4().hex),
        )
        meta = write_small_file(target, METADATA_NAME, pickle.dumps(metadata))
        files = [r.file for r in records if r.file is not None] + [meta]
        if part.name is None:
            raise RuntimeError("a rank's part reached the commit without a checkpoint name")
        manifest = write_manifest(target, part.name, len(records), files)
        target.publish()
        return [meta, manifest]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _check_records(records: list[_Record], part: RankPart) -> None:
    failed = [r for r in records if r.error is not None]
    if failed:
        detail = "; ".join(f"rank {r.rank}: {r.error}" for r in failed)
        raise DistributedSaveError(
            f"checkpoint {part.name!r} was not saved: {detail}",
            tuple(r.rank for r in failed),
        )
    names = {r.name for r in records}
    sequences = {r.sequence for r in records}
    if len(names) > 1 or len(sequences) > 1:
        detail = ", ".join(f"rank {r.rank}: {r.name!r} (save #{r.sequence})" for r in records)
        raise DistributedSaveError(
            "ranks disagree on which checkpoint they are saving (every rank must save the same "
            f"step, in the same order): {detail}"
        )


def _payload_bytes(data: object) -> bytes:
    """A non-tensor item as DCP's planner resolves it: a BytesIO holding its torch.save bytes."""
    getvalue = getattr(data, "getvalue", None)
    if getvalue is None:
        raise TypeError(f"expected the planner to resolve a value to bytes, got {type(data)}")
    return bytes(getvalue())
