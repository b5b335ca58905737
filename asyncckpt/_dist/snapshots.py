"""The snapshot stage of a multi-rank checkpointer: each rank copies only its own share.

:class:`PartSnapshots` stands where a single-process checkpointer has its
:class:`~asyncckpt._snapshot.snapshot.Snapshotter`: the front doors call ``take`` on the training
thread and the queue gives the result back with ``release``. ``take`` hands the state to
:meth:`DistSaver.prepare` (plan with DCP, copy this rank's items into a pooled arena) and wraps
the part in a :class:`PartSnapshot`, which is what the queue carries to the writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._snapshot.snapshot import Snapshot, SnapshotMode, Snapshotter
from .saver import DistSaver, RankPart

__all__ = ["PartSnapshot", "PartSnapshots"]


@dataclass(eq=False)
class PartSnapshot(Snapshot):
    """A queued multi-rank save: this rank's part (its arena is the part's, not the queue's)."""

    part: RankPart | None = None


class PartSnapshots(Snapshotter):
    """Takes this rank's share of each save through a :class:`DistSaver` (set once the
    checkpoint group exists)."""

    saver: DistSaver | None = None

    def take(
        self,
        state: object,
        mode: SnapshotMode = "eager",
        streams: dict[int, Any] | None = None,
    ) -> Snapshot:
        """Plan and copy this rank's share of ``state``; a bad state is reported to every rank
        when the save commits, not raised here (the other ranks would wait for this one).

        Raises:
            ValueError: ``mode`` is ``"pipelined"`` (multi-rank snapshots are eager).
        """
        if mode != "eager":
            raise ValueError(
                f"snapshot={mode!r} is not available for multi-rank checkpoints; every rank "
                "copies its share before save() returns (snapshot='eager')"
            )
        if self.saver is None:
            raise RuntimeError("the multi-rank checkpointer is not open")
        part = self.saver.prepare(state)  # type: ignore[arg-type]  # checked there
        nbytes = part.snapshot.nbytes if part.snapshot is not None else 0
        return PartSnapshot(None, nbytes, {}, [], [], None, part=part)

    def release(self, snapshot: Snapshot) -> Snapshot:
        """Give the part's arena back (a no-op once its commit did)."""
        if isinstance(snapshot, PartSnapshot) and snapshot.part is not None \
                and self.saver is not None:
            self.saver.release(snapshot.part)
        return super().release(snapshot)
