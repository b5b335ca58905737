"""Taking a snapshot: copy what a plan lists into one pooled arena, eagerly or pipelined.

::

    plan_snapshot(state)          (plan.py) what to copy, validated, on the caller's thread
    replay_plan(state, layout)    (replay.py) the same, reusing the last plan while the state's
                                  structure repeats (and each arena's bound placeholders)
    take_snapshot(plan, arena)    copy every storage into the arena (CUDA: on a side stream
                                  into pinned memory) and bind the placeholders to it with the
                                  original offsets / sizes / strides, so storage sharing is
                                  exactly what torch.save would have recorded

After an eager ``take_snapshot`` returns, the snapshot shares no memory with the caller's tensors:
the caller may mutate or free them at once. A pipelined one leaves the storages that an optimizer
in the state updates to a ``PendingCopy`` (``snapshot.pending``, see ``pipelined.py``), which
copies them in the background behind a guard on that optimizer's ``step()``.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Collection
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import anyio
import torch

from .._format.paths import PathKey
from .copy import CpuSplit, CudaCopier, copy_now
from .pending import CopyMonitor, PendingCopy, ProbeEvent
from .pipelined import Guards, stage
from .plan import PlanLayout, SnapshotPlan, plan_snapshot
from .pool import Arena, BufferPool
from .replay import ArenaBinding, replay_plan

__all__ = ["Snapshot", "SnapshotMode", "Snapshotter", "take_snapshot"]

#: ``"eager"``: everything is copied before ``save()`` returns; ``"pipelined"``: what an optimizer
#: in the state updates is copied in the background, guarded by that optimizer's ``step()``.
SnapshotMode = Literal["eager", "pipelined"]


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
    bound = plan.bound
    if bound is not None and arena.binding is not bound:
        raise ValueError("the plan's placeholders are bound to another arena")
    dsts: list[torch.UntypedStorage]
    if isinstance(bound, ArenaBinding):
        dsts = bound.dsts  # the placeholders in the tree already view them
    else:
        base = arena.storage
        dsts = []
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
    summary = _summary(plan)
    with torch.no_grad():
        if group_of:  # pipelined, with something for a guard to defer
            eager = [i for i in range(len(plan.storages)) if i not in group_of]
            pending = stage(plan, dsts, eager, group_of, copier, streams, check, monitor,
                             arena.pinned, helper)
        else:
            copy_now(plan, dsts, summary.everything, copier, streams, arena.pinned, helper,
                     by_device=summary.by_device, cpu_split=summary.cpu_split)
        try:
            if bound is None:
                for tc, dst in zip(plan.tensors, plan.placeholders, strict=True):
                    dst.set_(dsts[tc.storage], tc.storage_offset, tc.size, tc.stride)
                # The next replay of this layout into this arena reuses these placeholders.
                arena.binding = (
                    None if plan.layout is None
                    else ArenaBinding(plan.layout, dsts, plan.placeholders)
                )
        except BaseException:  # (Ctrl-C): the caller gives the arena back when this raises
            arena.binding = None
            if pending is not None:
                pending.cancel()  # a copy never started: returns once queued device copies did
            raise
    locations = {dsts[i]._cdata: plan.storages[i].location for i in summary.off_cpu}
    ranges = [(arena.address, arena.capacity)] if arena.capacity else []
    ranges += [(s.data_ptr(), s.nbytes()) for s in plan.cloned if s.nbytes()]
    keepalive: list[object] = list(dsts)
    keepalive += plan.cloned
    # Drop the references to the caller's storages: the snapshot must not keep them alive
    # (a pending copy holds the ones it still reads until it stopped).
    plan.sources = []
    return Snapshot(
        tree=plan.tree,
        nbytes=summary.data_nbytes + sum(s.nbytes() for s in plan.cloned),
        locations=locations,
        numpy_paths=plan.numpy_paths,
        ranges=ranges,
        arena=arena,
        _keepalive=keepalive,
        pending=pending,
    )


@dataclass(eq=False)
class _Summary:
    """What every snapshot of a plan's storages needs to know about them (kept with a
    reusable layout, so a replayed plan does not recompute it per storage)."""

    everything: list[int]
    by_device: dict[torch.device, list[int]]
    off_cpu: list[int]
    data_nbytes: int
    cpu_split: CpuSplit


def _summary(plan: SnapshotPlan) -> _Summary:
    layout = plan.layout
    cached = getattr(layout, "summary", None)
    if isinstance(cached, _Summary):
        return cached
    by_device: dict[torch.device, list[int]] = {}
    for i, spec in enumerate(plan.storages):
        by_device.setdefault(spec.device, []).append(i)
    summary = _Summary(
        list(range(len(plan.storages))), by_device,
        [i for i, spec in enumerate(plan.storages) if spec.device.type != "cpu"],
        sum(spec.nbytes for spec in plan.storages),
        CpuSplit.of(plan, by_device.get(torch.device("cpu"), [])),
    )
    if layout is not None:
        layout.summary = summary
    return summary


class Snapshotter:
    """Takes one checkpointer's snapshots: plan, reserve an arena from the pool, copy.

    It owns the pool, the CUDA side streams, the copy thread that runs pipelined copies, and
    the :class:`~asyncckpt._snapshot.pipelined.Guards` of those copies.

    Args:
        pool: where arenas come from (one per queued snapshot).
        extra_types: classes snapshotted by deep copy (see ``CheckpointerConfig.extra_types``).
        check: record checksums of deferred sources to detect mutation (``check_snapshot``).
        on_guard: told after every guard of a pipelined copy (waited?, seconds).
    """

    def __init__(
        self,
        pool: BufferPool,
        *,
        extra_types: Collection[type] = (),
        check: bool = False,
        on_guard: Callable[[bool, float], None] | None = None,
    ) -> None:
        self.pool = pool
        self.guards = Guards()
        #: test seam: called by pipelined copies, see ``pending.ProbeEvent``
        self.probe: Callable[[ProbeEvent, int], None] | None = None
        self._extra_types = frozenset(extra_types)
        self._check = check
        self._on_guard = on_guard
        self._copier = CudaCopier()
        self._copy_thread: ThreadPoolExecutor | None = None
        # The layout of the last state planned from scratch (see replay.py); replaced whole,
        # never changed, so concurrent saves may read it.
        self._layout: PlanLayout | None = None
        #: saves planned by replaying the last layout (the others were planned from scratch)
        self.replays = 0

    def open(self) -> None:
        """Start the copy thread (pipelined copies run there; large eager ones share it)."""
        self._copy_thread = ThreadPoolExecutor(1, thread_name_prefix="asyncckpt-copy")

    def take(
        self,
        state: object,
        mode: SnapshotMode = "eager",
        streams: dict[int, Any] | None = None,
    ) -> Snapshot:
        """Plan and copy ``state`` (blocking: the caller's thread or a worker thread).

        A pipelined snapshot's background copy is not started yet: :meth:`start` starts it.
        """
        # The walk allocates objects per container and tensor of the state; on a state of 1e5+
        # tensors they trigger full collections of Python's cyclic GC, each a scan of the whole
        # heap, in the middle of save(). Nothing here makes cycles: pause the collector.
        paused = gc.isenabled()
        if paused:
            gc.disable()
        try:
            return self._take(state, mode, streams)
        finally:
            if paused:
                gc.enable()

    def _take(self, state: object, mode: SnapshotMode,
              streams: dict[int, Any] | None) -> Snapshot:
        plan, arena = self._plan(state, mode)
        try:
            return take_snapshot(
                plan, arena, self._copier,
                pipelined=mode == "pipelined",
                streams=streams,
                check=self._check,
                monitor=CopyMonitor(self._on_guard, self.probe),
                helper=self._copy_thread,
            )
        except BaseException:
            self.pool.release(arena)
            raise

    def _plan(self, state: object, mode: SnapshotMode) -> tuple[SnapshotPlan, Arena]:
        """Plan ``state`` (replaying the last layout when its structure repeats) and take an
        arena for it."""
        layout = self._layout
        if layout is not None:
            arena = self.pool.acquire(layout.nbytes)
            try:
                binding = arena.binding
                plan = replay_plan(
                    state, layout,
                    binding if isinstance(binding, ArenaBinding) and binding.layout is layout
                    else None,
                    self._extra_types, owners=mode == "pipelined",
                )
            except BaseException:
                self.pool.release(arena)
                raise
            if plan is not None:
                self.replays += 1
                return plan, arena
            self.pool.release(arena)
        plan = plan_snapshot(state, self._extra_types)
        self._layout = plan.layout
        return plan, self.pool.acquire(plan.nbytes)

    def start(self, snapshot: Snapshot) -> None:
        """Start a queued snapshot's background copy, if it has one."""
        if snapshot.pending is not None and self._copy_thread is not None:
            snapshot.pending.start(self._copy_thread)

    @staticmethod
    async def stop(snapshot: Snapshot) -> None:
        """Cancel a dropped snapshot's background copy; return once it no longer writes."""
        pending = snapshot.pending
        if pending is not None and not pending.stopped:
            pending.cancel()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(pending.wait_stopped)

    def release(self, snapshot: Snapshot) -> Snapshot:
        """Give a snapshot's arena back (its bytes are durable, or it was dropped); return the
        snapshot emptied of its tree and memory."""
        arena, pending = snapshot.arena, snapshot.pending
        if pending is not None and not pending.stopped:
            pending.cancel()  # only when abandoning: the writer was cancelled mid-wait
        if arena is not None:
            if pending is None or pending.stopped:
                self.pool.release(arena)
            else:  # still being written: never hand it out again; freed with the copy
                self.pool.discard(arena)
        return replace(snapshot, tree=None, arena=None, _keepalive=[])

    async def close(self) -> None:
        """Stop the copy thread, remove every guard, free the pool."""
        if self._copy_thread is not None:
            await anyio.to_thread.run_sync(self._copy_thread.shutdown)
        self.guards.remove_stopped(everything=True)
        self.pool.close()
