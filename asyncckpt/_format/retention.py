"""What to keep: small preservation policies composed into one retention rule.

A checkpoint is deleted only when a *limiting* policy is configured (``keep_last`` or
``keep_every_n_minutes``) and no policy preserves it. The newest checkpoint and every checkpoint
a best pointer names are always preserved. Rotation runs after commit, against the index only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["KeepEveryNMinutes", "KeepLast", "KeepPeriod", "Retention", "RetainedEntry"]


class RetainedEntry(Protocol):
    """What a policy looks at: an index entry's name, step and commit time."""

    @property
    def name(self) -> str: ...
    @property
    def step(self) -> int: ...
    @property
    def time(self) -> float: ...


@dataclass(frozen=True)
class KeepLast:
    """Preserve the newest ``n`` checkpoints."""

    n: int

    def preserve(self, entries: Sequence[RetainedEntry], window_origin: float | None) -> set[str]:
        return {e.name for e in entries[-self.n :]}


@dataclass(frozen=True)
class KeepPeriod:
    """Preserve checkpoints whose step is a multiple of ``k`` (Orbax ``keep_period``)."""

    k: int

    def preserve(self, entries: Sequence[RetainedEntry], window_origin: float | None) -> set[str]:
        return {e.name for e in entries if e.step % self.k == 0}


@dataclass(frozen=True)
class KeepEveryNMinutes:
    """Preserve the first checkpoint of every ``minutes``-long window.

    Windows are counted from ``window_origin`` (the commit time of the first checkpoint the folder
    ever held, kept in the index so restarts continue the same grid).
    """

    minutes: float

    def preserve(self, entries: Sequence[RetainedEntry], window_origin: float | None) -> set[str]:
        if not entries:
            return set()
        origin = entries[0].time if window_origin is None else window_origin
        width = self.minutes * 60.0
        seen: set[int] = set()
        kept: set[str] = set()
        for e in entries:
            window = math.floor((e.time - origin) / width)
            if window not in seen:
                seen.add(window)
                kept.add(e.name)
        return kept


class _Policy(Protocol):
    def preserve(
        self, entries: Sequence[RetainedEntry], window_origin: float | None
    ) -> set[str]: ...


@dataclass(frozen=True)
class Retention:
    """The composed rule built from ``keep_last`` / ``keep_every_n_minutes`` / ``keep_period``."""

    keep_last: int | None = None
    keep_every_n_minutes: float | None = None
    keep_period: int | None = None

    @property
    def limiting(self) -> bool:
        """Whether this rule ever deletes anything."""
        return self.keep_last is not None or self.keep_every_n_minutes is not None

    def policies(self) -> list[_Policy]:
        out: list[_Policy] = []
        if self.keep_last is not None:
            out.append(KeepLast(self.keep_last))
        if self.keep_every_n_minutes is not None:
            out.append(KeepEveryNMinutes(self.keep_every_n_minutes))
        if self.keep_period is not None:
            out.append(KeepPeriod(self.keep_period))
        return out

    def victims(
        self,
        entries: Sequence[RetainedEntry],
        *,
        protected: Iterable[str] = (),
        window_origin: float | None = None,
    ) -> list[str]:
        """Names to delete from ``entries`` (oldest first), never the newest nor ``protected``."""
        if not self.limiting or not entries:
            return []
        keep = set(protected)
        keep.add(entries[-1].name)
        for policy in self.policies():
            keep |= policy.preserve(entries, window_origin)
        return [e.name for e in entries if e.name not in keep]
