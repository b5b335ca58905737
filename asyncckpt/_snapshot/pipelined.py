"""Pipelined snapshots: what is deferred, and the guards the front doors keep installed.

In ``snapshot="pipelined"`` mode ``save()`` copies only what may change before the next optimizer
step and returns; the tensors an optimizer in the state updates are copied in the background by
a :class:`~asyncckpt._snapshot.pending.PendingCopy` (the staged object: ``install()`` its guards,
``wait_all()``), while the next forward/backward runs (CheckFreq). Here:

* :func:`stage` builds that object while the snapshot is taken (the eager part copied, CUDA
  copies queued, one guard group per optimizer);
* :class:`Guards` is what a front door owns: the staged copies whose guard hooks are installed,
  removed on the caller's thread once they stopped, and waited for by ``wait_snapshot()``.
"""

from __future__ import annotations

from concurrent.futures import Executor

import torch

from .copy import CudaCopier, byte_view, copy_now, device_index, stream_of
from .pending import CopyMonitor, DeferredStorage, GuardGroup, PendingCopy, host_checksum
from .plan import SnapshotPlan

__all__ = ["Guards", "stage"]

_CPU = torch.device("cpu")


def stage(
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
    copy_now(plan, dsts, eager_cpu, copier, streams, pinned, helper)
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
        on_cuda = spec.device.type == "cuda"
        source = plan.sources[i]
        expected = None
        if check:  # debug only: a full read now (for CUDA, a synchronous copy to the host)
            if on_cuda:
                with torch.cuda.stream(stream_of(spec.device, streams)):
                    expected = host_checksum(byte_view(source, spec.device).cpu())
            else:
                expected = host_checksum(byte_view(source, spec.device))
        if on_cuda:  # copied with copy_ below: tensors
            items.append(DeferredStorage(byte_view(source, spec.device),
                                         byte_view(dsts[i], _CPU), spec.first_path, g, expected))
        else:  # memmoved by the copy thread: the storages do
            items.append(DeferredStorage(source, dsts[i], spec.first_path, g, expected))
    # CUDA device index per item (None: a CPU storage, copied by the copy thread)
    device_of = [
        device_index(plan.storages[i].device) if plan.storages[i].device.type == "cuda" else None
        for _, i in order
    ]
    done: list[torch.cuda.Event] = []
    # per device: group -> the event recorded after that group's last copy on the side stream
    group_events: dict[int, dict[int, torch.cuda.Event]] = {}
    for index in sorted({d for d in device_of if d is not None}):
        device = torch.device("cuda", index)
        caller = stream_of(device, streams)
        side = copier.stream(device)
        side.wait_stream(caller)
        events = group_events.setdefault(index, {})
        mine = [item for item, d in zip(items, device_of, strict=True) if d == index]
        for k, item in enumerate(mine):
            src, dst = item.src, item.dst
            with torch.cuda.stream(caller if item.group < 0 else side):
                # (a device item's source and place are uint8 tensors, see above)
                if item.nbytes and isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
                    dst.copy_(src, non_blocking=pinned)
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


class Guards:
    """The staged copies of one checkpointer whose guards may still be installed.

    Every method runs on the thread that calls ``save()`` / ``wait_snapshot()`` / ``flush()`` /
    ``close()`` -- never on the copy thread, which could otherwise remove a hook while torch
    iterates the hooks inside ``step()``.
    """

    def __init__(self) -> None:
        self._copies: list[PendingCopy] = []

    @property
    def copies(self) -> list[PendingCopy]:
        """The staged copies still tracked, oldest first."""
        return list(self._copies)

    def install(self, copy: PendingCopy | None) -> None:
        """Install the guards of a staged copy about to be queued (None: nothing deferred)."""
        if copy is not None:
            copy.install()
            self._copies.append(copy)

    def remove_stopped(self, *, everything: bool = False) -> None:
        """Remove the guard hooks of copies that stopped (all of them with ``everything``)."""
        keep: list[PendingCopy] = []
        for copy in self._copies:
            if everything or copy.stopped:
                copy.remove()
            else:
                keep.append(copy)
        self._copies = keep

    def wait(self) -> None:
        """Block this thread until every staged copy is complete (``wait_snapshot()``)."""
        for copy in list(self._copies):
            copy.wait_all()
        self.remove_stopped()

    async def wait_async(self) -> None:
        """Like :meth:`wait`, without blocking the event loop."""
        for copy in list(self._copies):
            await copy.wait_all_async()
        self.remove_stopped()
