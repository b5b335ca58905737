"""Where a writer's outcomes go: observers, statistics, and the failures the caller must see.

A failure in the background is recorded here and raised once in the caller (by the save's handle
if the caller waits on it, otherwise at the next ``save()`` / ``flush()`` / ``close()``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from .._errors import WriterError
from .events import CheckpointStats, Event, StatsCollector

__all__ = ["Observer", "Reporter"]

logger = logging.getLogger("asyncckpt")

Observer = Callable[[Event], object]


class Reporter:
    """Events to observers and statistics; failures kept until they are raised in the caller."""

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self.stats = StatsCollector()
        self._observers: list[Observer] = []
        self._errors: list[tuple[str, BaseException]] = []
        # The sync front door checks for failures on the training thread (save() validates
        # there) while the writer records them on its loop.
        self._errors_lock = threading.Lock()
        for observer in observers:
            self.subscribe(observer)

    def subscribe(self, observer: Observer) -> None:
        """Call ``observer(event)`` for every event from now on."""
        if not callable(observer):
            raise TypeError(f"an observer must be callable, got {type(observer).__name__}")
        self._observers.append(observer)

    def snapshot(self) -> CheckpointStats:
        return self.stats.snapshot()

    def emit(self, event: Event) -> None:
        """Count ``event`` and hand it to every observer; an observer's failure is recorded."""
        self.stats(event)
        for observer in self._observers:
            try:
                observer(event)
            except Exception as exc:
                self.record_error(f"observer {observer!r} on {type(event).__name__}", exc)

    def record_error(self, what: str, exc: BaseException) -> None:
        """Keep a background failure for the caller (``what``: the operation that failed)."""
        logger.error("asyncckpt: %s failed: %r", what, exc)
        with self._errors_lock:
            self._errors.append((what, exc))

    def forget_error(self, exc: BaseException) -> None:
        """A handle raised ``exc`` to its caller: it is reported, do not raise it again."""
        with self._errors_lock:
            self._errors = [(what, e) for what, e in self._errors if e is not exc]

    def raise_pending(self) -> None:
        """Raise the failures recorded so far as one :class:`WriterError` (then forget them)."""
        if not self._errors:
            return
        with self._errors_lock:
            errors, self._errors = self._errors, []
        if not errors:
            return
        what, first = errors[0]
        more = f" (and {len(errors) - 1} more failure(s), see .errors)" if len(errors) > 1 else ""
        raise WriterError(
            f"background checkpoint writer: {what} failed: {first!r}{more}",
            tuple(e for _, e in errors),
        ) from first
