"""Events the writer emits (pass ``observers=[fn]`` or call ``subscribe(fn)``), and its stats."""

from __future__ import annotations

from ._core.events import (
    BestUpdated,
    CheckpointStats,
    Committed,
    DeleteFailed,
    Event,
    Failed,
    Rotated,
    Skipped,
    SnapshotTaken,
    Written,
)

__all__ = [
    "BestUpdated",
    "CheckpointStats",
    "Committed",
    "DeleteFailed",
    "Event",
    "Failed",
    "Rotated",
    "Skipped",
    "SnapshotTaken",
    "Written",
]
