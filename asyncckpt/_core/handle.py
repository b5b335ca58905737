"""The outcome of one ``save()``, resolved by the writer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import anyio

from .._errors import WriterError
from .events import CheckpointInfo

__all__ = ["SaveHandle", "SaveStatus"]

SaveStatus = Literal["pending", "committed", "skipped", "coalesced", "failed", "cancelled"]


class SaveHandle:
    """The outcome of one ``save()``.

    Attributes:
        step: the step given to ``save()``.
        epoch: the epoch given to ``save()``.
        name: the checkpoint's file name.
        status: ``"pending"`` until it is resolved as ``"committed"``, ``"skipped"`` (queue full),
            ``"coalesced"`` (replaced by a newer save while waiting), ``"failed"`` or
            ``"cancelled"`` (abandoned at close).
        info: the committed checkpoint, once committed.
        error: the exception, once failed.
    """

    def __init__(
        self,
        step: int,
        name: str,
        epoch: int | None,
        on_raised: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.step = step
        self.name = name
        self.epoch = epoch
        self.status: SaveStatus = "pending"
        self.info: CheckpointInfo | None = None
        self.error: BaseException | None = None
        self._done = anyio.Event()
        self._on_raised = on_raised

    def __repr__(self) -> str:
        return f"<SaveHandle {self.name!r} step={self.step} {self.status}>"

    def done(self) -> bool:
        """Whether the save is resolved (committed, skipped, coalesced, failed or cancelled)."""
        return self.status != "pending"

    async def committed(self) -> CheckpointInfo | None:
        """Wait until this save is resolved.

        When it returns, the index lists the checkpoint and ``last_checkpoint`` names it; files
        that rotation dropped may still be being deleted (``flush()`` waits for that too).

        Returns:
            The committed checkpoint, or None if the save was skipped or coalesced.

        Raises:
            WriterError: the save failed or was abandoned at close (``__cause__``: the error).
                A failure raised here counts as reported: the checkpointer does not raise it
                again at the next ``save()`` / ``flush()`` / ``close()``.
        """
        await self._done.wait()
        if self.status == "failed":
            if self._on_raised is not None and self.error is not None:
                self._on_raised(self.error)
            raise WriterError(
                f"saving {self.name!r} (step {self.step}) failed: {self.error!r}",
                (self.error,) if self.error else (),
            ) from self.error
        if self.status == "cancelled":
            raise WriterError(
                f"saving {self.name!r} (step {self.step}) was abandoned when the checkpointer "
                "closed"
            )
        return self.info

    def resolve(self, status: SaveStatus, *, info: CheckpointInfo | None = None,
                error: BaseException | None = None) -> None:
        """Settle the outcome (the writer's side); later calls are ignored."""
        if self.status != "pending":
            return
        self.status, self.info, self.error = status, info, error
        self._done.set()
