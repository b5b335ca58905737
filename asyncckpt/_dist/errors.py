"""Exceptions of the multi-rank engine (all under :class:`asyncckpt.WriterError`)::

    WriterError
     └── DistributedSaveError      a multi-rank save was not committed; ``ranks`` names the
          │                        ranks that failed (empty when unknown: a peer died or
          │                        never arrived)
          └── CheckpointGroupError  a checkpoint collective failed or timed out; the group
                                    is unusable from then on (a peer is dead or hung)
"""

from __future__ import annotations

from .._errors import WriterError

__all__ = ["CheckpointGroupError", "DistributedSaveError"]


class DistributedSaveError(WriterError):
    """A multi-rank save was not committed on any rank.

    Attributes:
        ranks: the ranks that reported a failure (empty when no rank reported one, e.g. when
            a peer died or did not arrive in time).
    """

    def __init__(self, message: str, ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ranks = ranks


class CheckpointGroupError(DistributedSaveError):
    """A collective on the checkpoint process group failed or timed out.

    After this error the group is broken (gloo collectives cannot be resumed once a peer is
    lost), so every later save on it raises this error again at once.
    """
