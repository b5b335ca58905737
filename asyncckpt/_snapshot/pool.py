"""Host buffers for snapshots: a small pool of reusable arenas.

Freshly allocated memory is expensive on the machines we target (pages are faulted in from the
hypervisor: a ``clone()`` of 1 GiB costs 0.5-3 s where a copy into already-touched memory costs
~0.07 s), so snapshots never allocate on the hot path once the pool is warm. An arena is one uint8
tensor (pinned when CUDA is available, so device-to-host copies can be asynchronous); a snapshot
packs every storage it copies into one arena at 64-byte aligned offsets.

The pool holds at most ``max_arenas`` arenas (the writer sets it to ``queue_size + 1``, the number
of snapshots that may exist at once). Arenas grow to the largest snapshot seen and are freed on
close. The pool is thread-safe: the sync front door takes snapshots on the training thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

__all__ = ["ALIGNMENT", "Arena", "BufferPool", "align"]

ALIGNMENT = 64
_GRANULE = 1 << 20  # round capacities to 1 MiB ...
_SLACK = 0.02  # ... plus 2 %, so a state that grows a little does not reallocate every save


def _capacity_for(nbytes: int) -> int:
    """The capacity of a new arena for ``nbytes``: whole granules, with slack."""
    return -(-int(nbytes * (1 + _SLACK)) // _GRANULE) * _GRANULE


def align(n: int) -> int:
    """Round ``n`` up to the arena alignment."""
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass(eq=False)
class Arena:
    """One reusable host buffer."""

    tensor: torch.Tensor
    capacity: int
    pinned: bool
    #: what the last snapshot left bound to this arena for the next one to reuse
    #: (``replay.ArenaBinding``); only the holder of the arena reads or replaces it
    binding: object | None = None

    @property
    def storage(self) -> torch.UntypedStorage:
        return self.tensor.untyped_storage()

    @property
    def address(self) -> int:
        return self.tensor.data_ptr() if self.capacity else 0


class BufferPool:
    """A bounded, thread-safe pool of arenas.

    Args:
        max_arenas: how many arenas may exist at once (in use plus free).
        pin_memory: allocate page-locked memory; None means "when CUDA is available".
    """

    def __init__(self, max_arenas: int, *, pin_memory: bool | None = None) -> None:
        if max_arenas < 1:
            raise ValueError(f"max_arenas must be >= 1, got {max_arenas}")
        self.max_arenas = max_arenas
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._free: list[Arena] = []
        self._in_use = 0
        self._lock = threading.Lock()
        self.allocations = 0  # arenas ever allocated: flat after warm-up means no churn
        self.closed = False

    @property
    def reserved_bytes(self) -> int:
        """Bytes held in free arenas (in-use arenas are owned by their snapshots)."""
        with self._lock:
            return sum(a.capacity for a in self._free)

    @property
    def in_use(self) -> int:
        with self._lock:
            return self._in_use

    def acquire(self, nbytes: int) -> Arena:
        """Return an arena of at least ``nbytes``, reusing a free one when one is large enough.

        Raises:
            RuntimeError: more than ``max_arenas`` arenas would be in use (a caller bug: the
                writer's slots bound the number of live snapshots), or the pool is closed.
        """
        with self._lock:
            if self.closed:
                raise RuntimeError("the buffer pool is closed")
            if self._in_use >= self.max_arenas:
                raise RuntimeError(
                    f"buffer pool exhausted: {self._in_use} arenas in use (max {self.max_arenas})"
                )
            fitting = [a for a in self._free if a.capacity >= nbytes]
            if fitting:
                arena = min(fitting, key=lambda a: a.capacity)
                self._free.remove(arena)
                self._in_use += 1
                return arena
            if self._free and self._in_use + len(self._free) >= self.max_arenas:
                # Every slot has an arena but none is big enough: replace the largest.
                self._free.remove(max(self._free, key=lambda a: a.capacity))
            self._in_use += 1
        try:
            return self._allocate(nbytes)
        except BaseException:
            with self._lock:
                self._in_use -= 1
            raise

    def release(self, arena: Arena) -> None:
        """Give ``arena`` back for reuse (it is dropped if the pool is closed)."""
        with self._lock:
            self._in_use -= 1
            if not self.closed:
                self._free.append(arena)

    def discard(self, arena: Arena) -> None:
        """Give up ``arena`` without reusing it: something may still write it (a cancelled copy,
        whose references free it when it stops). Its place in the pool is freed at once."""
        with self._lock:
            self._in_use -= 1

    def drop_oversized(self, nbytes: int) -> int:
        """Drop the free arenas over 1.5 times the size a snapshot of ``nbytes`` needs.

        For callers whose snapshots shrink for good (a multi-rank save copies this rank's
        whole state until the first plan assigns it a share): memory follows the smaller size,
        at the cost of faulting in one new arena. Returns the bytes dropped.
        """
        limit = _capacity_for(nbytes) * 3 // 2
        with self._lock:
            keep = [a for a in self._free if a.capacity <= limit]
            dropped = sum(a.capacity for a in self._free) - sum(a.capacity for a in keep)
            self._free = keep
        return dropped

    def close(self) -> None:
        """Drop every free arena; arenas still in use are dropped when released."""
        with self._lock:
            self.closed = True
            self._free.clear()

    def _allocate(self, nbytes: int) -> Arena:
        if nbytes == 0:
            return Arena(torch.empty(0, dtype=torch.uint8), 0, False)
        capacity = _capacity_for(nbytes)
        tensor = torch.empty(capacity, dtype=torch.uint8, pin_memory=self.pin_memory)
        with self._lock:
            self.allocations += 1
        return Arena(tensor, capacity, self.pin_memory)
