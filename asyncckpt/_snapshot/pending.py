"""The staged part of a pipelined snapshot: the background copy and the guards that keep it
consistent (``pipelined.stage`` builds it).

In ``snapshot="pipelined"`` mode ``save()`` copies only what may change before the next optimizer
step (module buffers, loose tensors, everything an optimizer in the state does not own) and
returns; the tensors an optimizer in the state updates (its parameters and its per-parameter
state) are copied here, in the background, while the next forward/backward runs (CheckFreq).
A *guard* runs before anything may write them:

* a step pre-hook on each such optimizer waits for the tensors that optimizer updates (CPU: on
  the host, asking the copy thread to do those first; CUDA: the optimizer's stream waits on the
  copy's event, the host does not wait at all);
* ``wait_snapshot()`` waits for everything, for mutations the hooks cannot see.

One copy's life (the writer awaits ``stopped`` before it serializes or reuses the arena)::

    new ──start()──▶ queued ──copy thread──▶ running ──▶ complete
     │                 │                        │   └──▶ failed     (error kept for the writer)
     └──cancel()───────┴────────cancel()────────┴──────▶ cancelled  (coalesced / abandoned)

CPU storages are copied in fixed-size chunks in optimizer order; a guard that arrives early puts
the storages it needs at the front, so it waits only for what is left of those. CUDA storages
were already queued on the side stream by ``take_snapshot``; the copy thread only waits for
their events. Hooks are never removed from the copy thread: torch iterates an optimizer's hook
dict lazily while the hooks run, so removing one there could break the training thread's
``step()``. The front doors remove them at the next ``save()`` / ``wait_snapshot()`` /
``flush()`` / ``close()``; until then a hook whose copy has stopped returns at once.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import anyio
import torch
import xxhash

from .._errors import SnapshotMutatedError
from .plan import format_path

__all__ = ["CHUNK_BYTES", "CopyMonitor", "DeferredStorage", "GuardGroup", "PendingCopy",
           "host_checksum"]

#: Bytes copied per step of the copy thread: small enough that a guard arriving early is served
#: within about a millisecond, large enough that the per-chunk bookkeeping is noise.
CHUNK_BYTES = 8 << 20

CopyState = Literal["new", "queued", "running", "complete", "failed", "cancelled"]
#: What a probe is told: ``"chunk"`` (copy thread, before copying a chunk of storage ``i``),
#: ``"wait"`` (a guard is about to block), ``"cancel"`` (the copy was cancelled).
ProbeEvent = Literal["chunk", "wait", "cancel"]


def host_checksum(t: torch.Tensor) -> int:
    """xxh3-64 of a contiguous uint8 CPU tensor's bytes (for ``check_snapshot``)."""
    n = t.numel()
    if n == 0:
        return xxhash.xxh3_64_intdigest(b"")
    view = memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")
    return xxhash.xxh3_64_intdigest(view)


@dataclass(eq=False)
class DeferredStorage:
    """One storage left to the background copy.

    Attributes:
        src: the caller's storage (a CPU one as it is, a device one as a uint8 view); dropped
            once the copy stopped.
        dst: its place in the arena (a storage, or a uint8 view for a device copy).
        path: where it first appears in the state (for error messages; a path tuple is
            formatted only when a message needs it).
        group: index of the first guard group (optimizer) that updates it.
        expected: checksum of the source at save() time (``check_snapshot`` only).
    """

    src: torch.Tensor | torch.UntypedStorage | None
    dst: torch.Tensor | torch.UntypedStorage
    path: str | tuple[object, ...]
    group: int
    expected: int | None = None
    on_cuda: bool = field(init=False)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.on_cuda = self.src is not None and self.src.device.type == "cuda"
        dst = self.dst
        self.nbytes = dst.nbytes() if isinstance(dst, torch.UntypedStorage) else dst.numel()

    @property
    def where(self) -> str:
        """Where the storage first appears in the state, as Python source."""
        path = self.path
        return path if isinstance(path, str) else format_path(path)


def _bytes(x: torch.Tensor | torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over ``x``."""
    if isinstance(x, torch.UntypedStorage):
        return torch.empty(0, dtype=torch.uint8, device=x.device).set_(x)
    return x


@dataclass(eq=False)
class GuardGroup:
    """The storages one optimizer in the state updates, and what its guard waits on.

    Attributes:
        optimizer: the optimizer (dropped when the guard is removed).
        cpu_items: indices (into the copy's storages) of the CPU storages it updates.
        events: per CUDA device index, the event after which its CUDA storages are copied.
        handle: the installed step pre-hook.
    """

    optimizer: torch.optim.Optimizer | None
    cpu_items: tuple[int, ...]
    events: dict[int, torch.cuda.Event] = field(default_factory=dict)
    handle: Any = None


@dataclass(eq=False)
class CopyMonitor:
    """Where a copy reports to.

    Attributes:
        on_guard: called after every guard with (whether it had to wait, seconds waited).
        probe: test seam, see :data:`ProbeEvent`; it may block to hold the copy thread.
    """

    on_guard: Callable[[bool, float], None] | None = None
    probe: Callable[[ProbeEvent, int], None] | None = None


class PendingCopy:
    """The part of one pipelined snapshot that is still being copied.

    Args:
        items: the deferred storages; CUDA ones are already queued on their side streams.
        groups: one per optimizer in the state, in state order.
        cuda_done: events recorded after the last deferred copy on every stream used.
        monitor: guard statistics and the test probe.
        chunk_bytes: bytes per chunk of the CPU copy (default :data:`CHUNK_BYTES`).
    """

    def __init__(
        self,
        items: list[DeferredStorage],
        groups: list[GuardGroup],
        cuda_done: list[torch.cuda.Event],
        monitor: CopyMonitor | None = None,
        *,
        chunk_bytes: int | None = None,
    ) -> None:
        chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.items = items
        self.groups = groups
        self._cuda_done = cuda_done
        self._monitor = monitor or CopyMonitor()
        self._chunk = chunk_bytes
        self._cond = threading.Condition()
        self.state: CopyState = "new"
        self.error: BaseException | None = None
        self._cancelled = False
        self._stopped = False
        cpu = [i for i, item in enumerate(items) if not item.on_cuda]
        #: bytes not yet copied per storage (CUDA storages: until their event completed)
        self._left = [item.nbytes for item in items]
        self._next = [0] * len(items)  # next byte of each CPU storage to hand out
        self._order = sorted(cpu, key=lambda i: (items[i].group, i))
        self._cursor = 0
        self._priority: deque[int] = deque()

    # -- state -----------------------------------------------------------------------------------
    @property
    def stopped(self) -> bool:
        """Whether the copy finished, failed or was cancelled (the arena is no longer written)."""
        return self._stopped

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self.items)

    def copied(self, index: int) -> bool:
        """Whether storage ``index`` is completely copied."""
        with self._cond:
            return self._left[index] == 0

    # -- the copy thread -------------------------------------------------------------------------
    def start(self, executor: Executor) -> None:
        """Hand the copy to ``executor`` (one worker thread per checkpointer)."""
        with self._cond:
            if self.state != "new":
                return
            self.state = "queued"
        executor.submit(self.run)

    def run(self) -> None:
        """Copy every CPU chunk, wait for the CUDA events, verify; never raises."""
        outcome: CopyState = "complete"
        try:
            with self._cond:
                if self._cancelled:
                    outcome = "cancelled"
                else:
                    self.state = "running"
            with torch.no_grad():
                if outcome != "cancelled":
                    outcome = self._copy_cpu()
                # Even a cancelled copy waits for its queued device copies: they write the arena.
                for event in self._cuda_done:
                    event.synchronize()
                if outcome == "complete":
                    with self._cond:
                        for i, item in enumerate(self.items):
                            if item.on_cuda:
                                self._left[i] = 0
                        self._cond.notify_all()
                    for item in self.items:
                        if item.on_cuda:
                            self._verify(item)
        except BaseException as exc:  # kept for the writer, which raises it for this save
            self.error = exc
            outcome = "failed"
            # A failed copy (a CPU chunk, a verification) may have device copies still queued:
            # "stopped" must mean that nothing writes the arena any more.
            for event in self._cuda_done:
                try:
                    event.synchronize()
                except BaseException:  # noqa: S110 - the first error is the one reported
                    pass
        finally:
            with self._cond:
                self.state = outcome
                for item in self.items:
                    item.src = None  # the snapshot must not keep the caller's storages alive
                self._stopped = True
                self._cond.notify_all()

    def _copy_cpu(self) -> CopyState:
        probe = self._monitor.probe
        while True:
            with self._cond:
                if self._cancelled:
                    return "cancelled"
                claim = self._claim()
            if claim is None:
                return "complete"
            index, start, end = claim
            item = self.items[index]
            if probe is not None:
                probe("chunk", index)
            if item.src is None:
                raise RuntimeError(f"{item.where}: source dropped before its copy")
            if item.src.device.type == "cpu":  # memmove: releases the GIL, no OpenMP barrier
                ctypes.memmove(item.dst.data_ptr() + start, item.src.data_ptr() + start,
                               end - start)
            else:
                _bytes(item.dst)[start:end].copy_(_bytes(item.src)[start:end])
            with self._cond:
                self._left[index] -= end - start
                finished = self._left[index] == 0
                self._cond.notify_all()
            if finished:
                self._verify(item)

    def _claim(self) -> tuple[int, int, int] | None:
        """The next chunk to copy (under the lock): storages a guard waits for come first."""
        while self._priority:
            index = self._priority[0]
            if self._next[index] < self.items[index].nbytes:
                return self._take(index)
            self._priority.popleft()
        while self._cursor < len(self._order):
            index = self._order[self._cursor]
            if self._next[index] < self.items[index].nbytes:
                return self._take(index)
            self._cursor += 1
        return None

    def _take(self, index: int) -> tuple[int, int, int]:
        start = self._next[index]
        end = min(start + self._chunk, self.items[index].nbytes)
        self._next[index] = end
        return index, start, end

    def _verify(self, item: DeferredStorage) -> None:
        if item.expected is None:
            return
        if host_checksum(_bytes(item.dst)) != item.expected:
            raise SnapshotMutatedError(
                f"{item.where} ({item.nbytes} bytes) was modified in place after save() returned "
                "and before its background copy completed, so the checkpoint would not hold "
                "the state at save(). Only the optimizer step of an optimizer in the state is "
                "guarded: call wait_snapshot() before changing its tensors any other way, or "
                "use snapshot='eager'.",
                item.where,
            )

    # -- cancelling and waiting ------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop copying (the snapshot was coalesced away or abandoned); guards stop waiting.

        A copy that never started stops at once; a running one stops after its current chunk
        and after its queued CUDA copies completed (see :attr:`stopped`).
        """
        with self._cond:
            if self._stopped or self._cancelled:
                return
            self._cancelled = True
            never_started = self.state == "new"
        if self._monitor.probe is not None:
            self._monitor.probe("cancel", 0)
        if never_started:
            self.run()  # marks it cancelled; waits only for CUDA copies already queued

    def wait_stopped(self) -> None:
        """Block until the copy stopped (blocking; worker or training thread)."""
        with self._cond:
            self._cond.wait_for(lambda: self._stopped)

    async def finished(self) -> None:
        """Wait, without blocking the event loop, until the copy stopped.

        Raises:
            Exception: the copy failed (the error it failed with).
            RuntimeError: the copy was cancelled.
        """
        if not self._stopped:
            await anyio.to_thread.run_sync(self.wait_stopped, abandon_on_cancel=True)
        if self.error is not None:
            raise self.error
        if self.state == "cancelled":
            raise RuntimeError("the pipelined snapshot copy was cancelled")

    # -- guards ----------------------------------------------------------------------------------
    def wait_all(self) -> None:
        """Host barrier: return once every storage is copied (``wait_snapshot()``)."""
        self._guarded(range(len(self.items)), {})

    async def wait_all_async(self) -> None:
        """Like :meth:`wait_all`, without blocking the event loop."""
        if self._stopped:
            return  # nothing pending: not a guard that ran (see _guarded)
        t0 = time.perf_counter()
        self._prioritize(range(len(self.items)))
        if self._monitor.probe is not None:
            self._monitor.probe("wait", 0)
        await anyio.to_thread.run_sync(self.wait_stopped, abandon_on_cancel=True)
        self._report(True, time.perf_counter() - t0)

    def guard(self, group: GuardGroup) -> None:
        """Step pre-hook body: return once ``group``'s optimizer may update its tensors."""
        self._guarded(group.cpu_items, group.events)

    def install(self) -> None:
        """Register a step pre-hook on every optimizer whose tensors are still being copied."""
        for group in self.groups:
            if group.optimizer is None or group.handle is not None:
                continue
            group.handle = group.optimizer.register_step_pre_hook(partial(self._hook, group))

    def _hook(self, group: GuardGroup, _optimizer: object, _args: object, _kwargs: object) -> None:
        self.guard(group)

    def remove(self) -> None:
        """Remove the hooks (training thread, outside ``step()``) and drop the optimizers."""
        for group in self.groups:
            if group.handle is not None:
                group.handle.remove()
                group.handle = None
            group.optimizer = None

    @property
    def hooked(self) -> bool:
        return any(group.handle is not None for group in self.groups)

    def _prioritize(self, indices: Any) -> list[int]:
        """Put the storages among ``indices`` that are not copied yet at the front."""
        with self._cond:
            if self._stopped:
                return []
            missing = [i for i in indices if self._left[i]]
            self._priority.extend(i for i in missing if not self.items[i].on_cuda)
            return missing

    def _guarded(self, cpu_items: Any, events: dict[int, torch.cuda.Event]) -> None:
        # A hook stays installed until the front door removes it at a safe point, so most
        # steps after a save find the copy stopped: those are not guards that ran while a
        # copy was pending, and are neither counted nor timed.
        if self._stopped:
            return
        t0 = time.perf_counter()
        waited = False
        for device, event in events.items():
            if not event.query():
                # The training stream waits on the device; the host goes on at once.
                torch.cuda.current_stream(device).wait_event(event)
                waited = True
        missing = self._prioritize(cpu_items)
        if missing:
            waited = True
            if self._monitor.probe is not None:
                self._monitor.probe("wait", len(missing))
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or not any(self._left[i]
                                                                    for i in missing))
        self._report(waited, time.perf_counter() - t0 if missing else 0.0)

    def _report(self, waited: bool, seconds: float) -> None:
        if self._monitor.on_guard is not None:
            self._monitor.on_guard(waited, seconds)
