"""Events stage: what the writer reports, and the statistics aggregated from it.

Observers are plain callables taking one event, called on the writer's event-loop thread (for the
sync ``Checkpointer`` that is its background thread, not the training thread). An observer that
raises does not stop the writer: its exception is raised in the caller at the next call, like a
writer failure. Keep observers quick; they run inline on the loop.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "BestUpdated",
    "CheckpointInfo",
    "CheckpointStats",
    "Committed",
    "DeleteFailed",
    "Event",
    "Failed",
    "Rotated",
    "Skipped",
    "SnapshotTaken",
    "StatsCollector",
    "Written",
]


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as listed by ``checkpoints()``.

    Attributes:
        name: file name inside the folder.
        uri: full path or URI (what ``torch.load`` / ``asyncckpt.load`` take).
        step: training step given to ``save()``.
        epoch: epoch given to ``save()`` (None when not given).
        time: wall-clock time of the ``save()`` call (seconds since the epoch).
        size: bytes in the file.
        checksum: ``"xxh3_128:<hex>"`` of the whole file (of a multi-rank checkpoint: of its
            manifest, which records every file's checksum).
        metrics: metrics given to ``save()``.
        kind: ``"file"`` (one torch.save file) or ``"dcp"`` (a multi-rank checkpoint: a
            directory that ``torch.distributed.checkpoint`` reads).
        world_size: the number of ranks that wrote it (1 for a file).
    """

    name: str
    uri: str
    step: int
    epoch: int | None
    time: float
    size: int
    checksum: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    kind: str = "file"
    world_size: int = 1


@dataclass(frozen=True)
class Event:
    """Base class: every event carries the wall-clock time it was emitted at."""

    at: float = field(default_factory=time.time, kw_only=True)


@dataclass(frozen=True)
class SnapshotTaken(Event):
    """``save()`` took its snapshot and is returning; ``stall`` is what the caller waited, in
    seconds, from the moment ``save()`` was entered until it hands the job to the writer (the
    last thing it does before returning)."""

    step: int
    name: str
    nbytes: int
    stall: float


@dataclass(frozen=True)
class Skipped(Event):
    """A save was dropped: the queue was full (``when_full="skip"``) or a newer one replaced it
    while it waited (``"coalesced"``)."""

    step: int
    name: str
    reason: Literal["queue_full", "coalesced"]


@dataclass(frozen=True)
class Written(Event):
    """A checkpoint's bytes are durable under their final name (not yet in the index)."""

    step: int
    name: str
    nbytes: int
    seconds: float


@dataclass(frozen=True)
class Committed(Event):
    """The index now lists the checkpoint; ``latency`` runs from ``save()`` to this moment."""

    info: CheckpointInfo
    latency: float


@dataclass(frozen=True)
class Rotated(Event):
    """Checkpoints dropped from the index by the retention rules, ``supersedes=`` or
    ``remove()`` (their files are deleted right after)."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class BestUpdated(Event):
    """A best pointer moved."""

    metric: str
    value: float
    name: str
    previous: str | None


@dataclass(frozen=True)
class Failed(Event):
    """A save failed; the error is raised in the caller at its next call."""

    step: int
    name: str
    error: BaseException


@dataclass(frozen=True)
class DeleteFailed(Event):
    """A rotated-out file could not be deleted; it is retried after the next commit."""

    name: str
    error: BaseException


@dataclass(frozen=True)
class CheckpointStats:
    """Counters and timings aggregated over a writer's life.

    Every ``save()`` that returned is counted once in ``saves`` and ends as exactly one of
    ``committed``, ``skipped``, ``coalesced`` or ``failed`` (or is still in flight).
    Stall percentiles (each save's ``SnapshotTaken.stall``: entry to return of ``save()``) cover
    the most recent 10,000 saves; ``stall_max`` covers all of them.
    ``write_throughput`` is committed bytes over the time spent writing them (bytes/s).
    Pipelined snapshots: ``guard_calls`` counts guards that ran (an optimizer step or
    ``wait_snapshot()`` while a background copy was pending; the steps after the copy stopped
    are not counted), ``guard_waits`` those that found
    their tensors not yet copied, and ``guard_wait_seconds`` the time the host spent waiting in
    them (a CUDA guard makes the training stream wait instead, so it adds no host time).
    """

    saves: int
    committed: int
    skipped: int
    coalesced: int
    failed: int
    bytes_committed: int
    stall_p50: float
    stall_p95: float
    stall_max: float
    write_seconds: float
    write_throughput: float
    rotated: int
    delete_failures: int
    guard_calls: int = 0
    guard_waits: int = 0
    guard_wait_seconds: float = 0.0


class StatsCollector:
    """Thread-safe aggregation of events into :class:`CheckpointStats`."""

    _WINDOW = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stalls: deque[float] = deque(maxlen=self._WINDOW)
        self._stall_max = 0.0
        self._counts = dict.fromkeys(
            ("saves", "committed", "skipped", "coalesced", "failed", "rotated", "delete_failures"),
            0,
        )
        self._bytes = 0
        self._write_bytes = 0
        self._write_seconds = 0.0
        self._guards = [0, 0]  # calls, waits
        self._guard_seconds = 0.0

    def record_guard(self, waited: bool, seconds: float) -> None:
        """Count one guard of a pipelined snapshot (called on the training thread)."""
        with self._lock:
            self._guards[0] += 1
            if waited:
                self._guards[1] += 1
                self._guard_seconds += seconds

    def __call__(self, event: Event) -> None:
        with self._lock:
            c = self._counts
            if isinstance(event, SnapshotTaken):
                c["saves"] += 1
                self._stalls.append(event.stall)
                self._stall_max = max(self._stall_max, event.stall)
            elif isinstance(event, Skipped):
                if event.reason == "queue_full":  # this save() never took a snapshot
                    c["saves"] += 1
                    c["skipped"] += 1
                else:  # counted in saves when its snapshot was taken
                    c["coalesced"] += 1
            elif isinstance(event, Written):
                self._write_bytes += event.nbytes
                self._write_seconds += event.seconds
            elif isinstance(event, Committed):
                c["committed"] += 1
                self._bytes += event.info.size
            elif isinstance(event, Failed):
                c["failed"] += 1
            elif isinstance(event, Rotated):
                c["rotated"] += len(event.names)
            elif isinstance(event, DeleteFailed):
                c["delete_failures"] += 1

    def snapshot(self) -> CheckpointStats:
        with self._lock:
            stalls = sorted(self._stalls)
            c = dict(self._counts)
            p50 = statistics.median(stalls) if stalls else 0.0
            p95 = stalls[min(len(stalls) - 1, int(0.95 * len(stalls)))] if stalls else 0.0
            return CheckpointStats(
                saves=c["saves"],
                committed=c["committed"],
                skipped=c["skipped"],
                coalesced=c["coalesced"],
                failed=c["failed"],
                bytes_committed=self._bytes,
                stall_p50=p50,
                stall_p95=p95,
                stall_max=self._stall_max,
                write_seconds=self._write_seconds,
                write_throughput=(
                    self._write_bytes / self._write_seconds if self._write_seconds else 0.0
                ),
                rotated=c["rotated"],
                delete_failures=c["delete_failures"],
                guard_calls=self._guards[0],
                guard_waits=self._guards[1],
                guard_wait_seconds=self._guard_seconds,
            )
