"""Copy mechanics: host memmoves shared with a helper thread, device copies on side streams.

Used by :func:`~asyncckpt._snapshot.snapshot.take_snapshot` (eager copies) and by
:mod:`~asyncckpt._snapshot.pipelined` (what a pipelined snapshot copies at once).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from .plan import SnapshotPlan

__all__ = [
    "CpuSplit",
    "CudaCopier",
    "SharedCopy",
    "byte_view",
    "caller_streams",
    "copy_now",
    "device_index",
    "stream_of",
]


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


def byte_view(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    """A flat uint8 tensor over ``storage`` (on ``device``)."""
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


def device_index(device: torch.device) -> int:
    """The CUDA device index of ``device`` (the current device when it names none)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def caller_streams() -> dict[int, torch.cuda.Stream]:
    """The calling thread's current CUDA stream per device ({} when CUDA is not initialized).

    CUDA's current stream is per thread: a snapshot planned in a worker thread must order its
    copies after the work queued by the training thread, not after the worker's default stream.
    """
    if not torch.cuda.is_initialized():
        return {}
    return {i: torch.cuda.current_stream(i) for i in range(torch.cuda.device_count())}


def stream_of(device: torch.device, streams: dict[int, torch.cuda.Stream] | None
               ) -> torch.cuda.Stream:
    index = device_index(device)
    stream = (streams or {}).get(index)
    return stream if stream is not None else torch.cuda.current_stream(index)


_PIECE = 8 << 20  # a unit of work in a shared CPU copy
_SHARE_MIN = 32 << 20  # below this a second thread costs more than it saves
_SMALL = 64 << 10  # storages below this are copied in one loop, keeping the GIL


def _gil_memmove() -> Callable[[int, int, int], object]:
    """libc's memmove called *without* releasing the GIL (ctypes.memmove releases and
    re-takes it at every call, which for a 64-byte copy costs more than the copy, and lets
    every other thread cut in); ctypes.memmove where libc cannot be opened that way."""
    try:
        fn = ctypes.PyDLL(None).memmove
    except (OSError, AttributeError, TypeError):  # pragma: no cover - e.g. Windows
        return ctypes.memmove
    fn.restype = None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    return fn


_small_memmove = _gil_memmove()


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


@dataclass(frozen=True)
class CpuSplit:
    """CPU storages to copy, split by size: the small ones (index, arena offset, size) are
    memmoved in one loop on the caller's thread, the large ones in shared pieces."""

    small: list[int]
    offsets: list[int]
    sizes: list[int]
    large: list[int]

    @classmethod
    def of(cls, plan: SnapshotPlan, indices: list[int]) -> CpuSplit:
        small = [i for i in indices if 0 < plan.storages[i].nbytes < _SMALL]
        return cls(
            small,
            [plan.storages[i].offset for i in small],
            [plan.storages[i].nbytes for i in small],
            [i for i in indices if plan.storages[i].nbytes >= _SMALL],
        )


def copy_now(
    plan: SnapshotPlan,
    dsts: list[torch.UntypedStorage],
    indices: list[int],
    copier: CudaCopier,
    streams: dict[int, torch.cuda.Stream] | None,
    pinned: bool,
    helper: Executor | None = None,
    *,
    by_device: dict[torch.device, list[int]] | None = None,
    cpu_split: CpuSplit | None = None,
) -> None:
    """The eager copy: CPU storages directly (shared with ``helper``'s thread when they are
    large), CUDA ones on a side stream, then wait for them.

    ``dsts`` are slices of one arena, at the planned offsets. ``by_device``: ``indices``
    grouped by device, and ``cpu_split``: its CPU ones split by size, when the caller has
    them already."""
    cuda_events: list[torch.cuda.Event] = []
    if by_device is None:
        by_device = {}
        for i in indices:
            by_device.setdefault(plan.storages[i].device, []).append(i)
    side_streams: list[torch.cuda.Stream] = []
    try:
        _queue_and_copy(plan, dsts, by_device, copier, streams, pinned, helper, cuda_events,
                        side_streams, cpu_split)
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
    cpu_split: CpuSplit | None = None,
) -> None:
    """``copy_now``'s work: queue the device copies (recording an event per device, and the
    side streams used), copy the host ones."""
    for device, specs in by_device.items():
        if device.type == "cuda":
            stream = copier.stream(device)
            side_streams.append(stream)
            stream.wait_stream(stream_of(device, streams))
            with torch.cuda.stream(stream):
                for i in specs:
                    spec = plan.storages[i]
                    if spec.nbytes:
                        src = byte_view(plan.sources[i], device)
                        byte_view(dsts[i], _CPU).copy_(src, non_blocking=pinned)
            event = torch.cuda.Event()
            event.record(stream)
            cuda_events.append(event)
        elif device.type == "cpu":
            # memmove, not copy_: ctypes releases the GIL, and it never wakes torch's OpenMP
            # pool, whose barrier costs 10-20x the copy itself when the other cores are busy
            # (our own writer thread, the data loader). A helper thread may share the pieces.
            # Small storages (many-tensor states) are copied in one tight loop instead.
            storages, sources = plan.storages, plan.sources
            split = cpu_split if cpu_split is not None else CpuSplit.of(plan, specs)
            # the arena's address (every non-empty dst is a slice of it at its offset)
            base = dsts[split.small[0]].data_ptr() - split.offsets[0] if split.small else 0
            memmove = _small_memmove
            for i, offset, n in zip(split.small, split.offsets, split.sizes, strict=True):
                memmove(base + offset, sources[i].data_ptr(), n)
            large = split.large
            if large:
                pieces = [
                    (dsts[i].data_ptr() + start, sources[i].data_ptr() + start,
                     min(_PIECE, storages[i].nbytes - start))
                    for i in large
                    for start in range(0, storages[i].nbytes, _PIECE)
                ]
                SharedCopy(pieces).run(helper)
        else:
            for i in specs:
                spec = plan.storages[i]
                if spec.nbytes:
                    byte_view(dsts[i], _CPU).copy_(byte_view(plan.sources[i], device))
