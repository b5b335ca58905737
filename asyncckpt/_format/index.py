"""The index: the single source of truth for what a checkpoint folder holds.

A small JSON document next to the checkpoints, replaced atomically after each commit::

    {"format": "asyncckpt.index", "version": 1, "generation": 7, "updated": 1731000000.0,
     "latest": "step_30.pt",
     "entries": [{"name": "step_10.pt", "step": 10, "epoch": 0, "time": ..., "size": ...,
                  "checksum": "xxh3_128:...", "metrics": {"acc": 0.5}, "numpy": []}, ...],
                  (optional: "encryption": "AES-GCM", "series": "CKP")
     "best": {"acc": {"mode": "greater", "value": 0.9, "name": "step_20.pt", "step": 20}},
     "rotation": {"window_origin": 1731000000.0, "pending_deletes": ["step_0.pt"],
                  (optional: "series_origins": {"CKP": 1731000100.0})}}

Entries are in commit order (oldest first); ``latest`` is always the last entry. Listing, rotation,
best pointers and resume read the index only — never a directory listing or mtimes. A long index
(see ``journal.py``) is written as a version-2 document plus journal records of the commits since,
so that a commit costs the same at any length; the document is then rewritten now and then.
``IndexState`` is immutable: every operation returns a new state, so the writer can compute the
next index, publish it, and only then act on it (delete what it no longer references).
"""

from __future__ import annotations

import functools
import json
import operator
import time as _time
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from typing import Any

from .._errors import CorruptIndexError
from .best import BestMetric, Mode, check_metric_key
from .entry import (
    IndexEntry,
    decode_count,
    decode_number,
    decode_time,
    encode_number,
    load_json,
    text,
)
from .naming import check_series, validate_name
from .paths import PathKey
from .retention import Retention

__all__ = [
    "INDEX_FORMAT",
    "INDEX_VERSION",
    "JOURNALED_VERSION",
    "BestRecord",
    "IndexEntry",
    "IndexState",
    "PathKey",
    "parse_document",
]

INDEX_FORMAT = "asyncckpt.index"
#: A complete index: the document alone is the folder's state.
INDEX_VERSION = 1
#: The document is the base of a journal: records beside it carry the later commits (see
#: ``journal.py``). Readers that know only version 1 refuse it rather than read a stale state.
JOURNALED_VERSION = 2
_name_of = operator.attrgetter("name")


@dataclass(frozen=True)
class BestRecord:
    """The best value seen for a metric and the checkpoint that holds it."""

    metric: str
    mode: Mode
    value: float
    name: str
    step: int


def _without(entries: tuple[IndexEntry, ...], gone: Set[str]) -> tuple[IndexEntry, ...]:
    """``entries`` without the names in ``gone``. Victims and re-saved names are usually
    recent, so the scan runs from the newest entry and stops once all are found."""
    positions: list[int] = []
    for i in range(len(entries) - 1, -1, -1):
        if entries[i].name in gone:
            positions.append(i)
            if len(positions) == len(gone):
                break
    out: list[IndexEntry] = []
    start = 0
    for i in reversed(positions):
        out.extend(entries[start:i])
        start = i + 1
    return tuple(out) + entries[start:] if positions else entries


def _derived(
    parent: IndexState,
    child: IndexState,
    *,
    added: Iterable[IndexEntry] = (),
    removed: Iterable[str] = (),
) -> IndexState:
    """``child`` (made from ``parent``), with the parent's name lookup carried over when the
    parent has one: a copy and a few changes instead of a scan of every entry."""
    lookup: dict[str, IndexEntry] | None = parent.__dict__.get("_by_name")
    if lookup is not None:
        if child.entries is not parent.entries:
            lookup = lookup.copy()
            for name in removed:
                lookup.pop(name, None)
            for entry in added:
                lookup[entry.name] = entry
        child.__dict__["_by_name"] = lookup  # a cache, not a field: frozen-ness is kept
    return child


def _best_among(entries: Iterable[IndexEntry], metric: BestMetric) -> BestRecord | None:
    best: BestRecord | None = None
    for e in entries:
        value = e.metrics.get(metric.name)
        if value is not None and metric.is_better(value, None if best is None else best.value):
            best = BestRecord(metric.name, metric.mode, value, e.name, e.step)
    return best


@dataclass(frozen=True)
class IndexState:
    """An immutable snapshot of the index document."""

    entries: tuple[IndexEntry, ...] = ()
    best: Mapping[str, BestRecord] = field(default_factory=dict)
    window_origin: float | None = None
    pending_deletes: tuple[str, ...] = ()
    generation: int = 0
    #: per named series, the time its minute windows count from (fixed at its first commit)
    series_origins: Mapping[str, float] = field(default_factory=dict)

    # -- queries -------------------------------------------------------------------------------
    @functools.cached_property
    def _by_name(self) -> dict[str, IndexEntry]:
        # Built once per state (in C), so lookups do not scan a long history at every save.
        return dict(zip(map(_name_of, self.entries), self.entries, strict=True))

    @property
    def latest(self) -> IndexEntry | None:
        return self.entries[-1] if self.entries else None

    @property
    def names(self) -> Set[str]:
        return self._by_name.keys()

    def get(self, name: str) -> IndexEntry | None:
        return self._by_name.get(name)

    def by_step(self, step: int) -> IndexEntry | None:
        """The newest entry with this step."""
        for e in reversed(self.entries):
            if e.step == step:
                return e
        return None

    # -- transitions ---------------------------------------------------------------------------
    def without_entry(self, name: str, metrics: Sequence[BestMetric]) -> IndexState:
        """Drop entry ``name``; a best pointer that named it falls back to the best remaining."""
        entries = _without(self.entries, {name})
        best = dict(self.best)
        for m in metrics:
            record = best.get(m.name)
            if record is not None and record.name == name:
                replacement = _best_among(entries, m)
                if replacement is None:
                    del best[m.name]
                else:
                    best[m.name] = replacement
        return _derived(self, replace(self, entries=entries, best=best), removed=(name,))

    def with_entry(self, entry: IndexEntry, metrics: Sequence[BestMetric]) -> IndexState:
        """Append ``entry`` (replacing one of the same name) and advance the best pointers."""
        state = self.without_entry(entry.name, metrics) if entry.name in self.names else self
        best = dict(state.best)
        for m in metrics:
            value = entry.metrics.get(m.name)
            current = best.get(m.name)
            if value is not None and m.is_better(value, None if current is None else current.value):
                best[m.name] = BestRecord(m.name, m.mode, value, entry.name, entry.step)
        origins = state.series_origins
        if entry.series is not None and entry.series not in origins:
            # (an index written before origins were stored: its oldest listed entry)
            first = next((e.time for e in state.entries if e.series == entry.series), entry.time)
            origins = {**origins, entry.series: first}
        child = replace(
            state,
            entries=state.entries + (entry,),
            best=best,
            window_origin=entry.time if state.window_origin is None else state.window_origin,
            pending_deletes=tuple(n for n in state.pending_deletes if n != entry.name),
            series_origins=origins,
        )
        return _derived(state, child, added=(entry,))

    def superseding(
        self, names: Iterable[str], metrics: Sequence[BestMetric]
    ) -> tuple[IndexState, list[str]]:
        """Drop the named entries (``save(..., supersedes=...)``); like rotation, their files
        become pending deletions. Names the index does not list (files another tool wrote into
        the folder) become pending deletions as well. Return the new state and the names."""
        state = self
        dropped: list[str] = []
        for name in names:
            if name in dropped:
                continue
            if name in state.names:
                state = state.without_entry(name, metrics)
            dropped.append(name)
        if not dropped:
            return self, []
        pending = state.pending_deletes
        pending += tuple(n for n in dropped if n not in pending)
        return _derived(state, replace(state, pending_deletes=pending)), dropped

    def rotated(
        self, retention: Retention, series: str | None = None
    ) -> tuple[IndexState, list[str]]:
        """Apply ``retention`` to ``series``: return the state without the victims, and the victims.

        Entries saved with ``keep=True`` and entries of other series are left out of retention
        entirely. The default series (None) counts its minute windows from the index's
        ``window_origin``; a named series from its own origin (``series_origins``), so that
        removing its oldest entry never moves the windows.

        Victims move to ``pending_deletes``; the caller deletes their files only after publishing
        the returned state, and then calls :meth:`forget_deleted`.
        """
        if not retention.limiting:
            return self, []
        # Kept entries are outside retention: never deleted, and not counted by keep_last.
        victims = retention.victims(
            [e for e in self.entries if not e.keep and e.series == series],
            protected={r.name for r in self.best.values()},
            window_origin=(
                self.window_origin if series is None else self.series_origins.get(series)
            ),
        )
        if not victims:
            return self, []
        gone = set(victims)
        pending = self.pending_deletes + tuple(v for v in victims if v not in self.pending_deletes)
        child = replace(self, entries=_without(self.entries, gone), pending_deletes=pending)
        return _derived(self, child, removed=victims), victims

    def with_pending(self, name: str) -> IndexState:
        """``name`` recorded as pending deletion: a file about to be written, deleted by the next
        writer unless a commit lists it first (``with_entry`` takes it off the list)."""
        if name in self.pending_deletes:
            return self
        return _derived(self, replace(self, pending_deletes=(*self.pending_deletes, name)))

    def forget_deleted(self, names: Iterable[str]) -> IndexState:
        gone = set(names)
        pending = tuple(n for n in self.pending_deletes if n not in gone)
        return _derived(self, replace(self, pending_deletes=pending))

    def with_generation(self, generation: int) -> IndexState:
        """The same state, published as ``generation``."""
        return _derived(self, replace(self, generation=generation))

    def with_best_metrics(self, metrics: Sequence[BestMetric], *, source: str) -> IndexState:
        """Reconcile remembered best pointers with the metrics this writer tracks.

        Pointers for metrics no longer tracked are dropped (their checkpoints become ordinary
        rotation candidates). A metric tracked from now on starts from the best checkpoint
        already listed. A metric tracked with the opposite rule is a conflict.

        Raises:
            ValueError: a metric's rule differs from the one the index remembers.
        """
        wanted = {m.name: m for m in metrics}
        best: dict[str, BestRecord] = {}
        for name, record in self.best.items():
            metric = wanted.get(name)
            if metric is None:
                continue
            if metric.mode != record.mode:
                raise ValueError(
                    f"{source} tracks best {name!r} as {record.mode!r} but this writer was "
                    f"configured with {metric.mode!r}; use the same rule or a new folder"
                )
            best[name] = record
        for metric in metrics:
            if metric.name not in best:  # newly tracked: listed checkpoints compete too
                found = _best_among(self.entries, metric)
                if found is not None:
                    best[metric.name] = found
        return replace(self, best=best)

    # -- (de)serialization ---------------------------------------------------------------------
    def to_json(self, *, version: int = INDEX_VERSION) -> bytes:
        """The index document (strict JSON, one entry per line).

        Args:
            version: :data:`INDEX_VERSION`, or :data:`JOURNALED_VERSION` for the base of a
                journal.
        """
        head = {
            "format": INDEX_FORMAT,
            "version": version,
            "generation": self.generation,
            "updated": _time.time(),
            "latest": self.latest.name if self.latest else None,
        }
        tail = {"best": best_to_json(self.best), "rotation": rotation_to_json(self)}
        # json's C encoder runs only without indent: format by hand, one entry per line.
        dump = functools.partial(json.dumps, allow_nan=False)
        entries = ",\n  ".join(dump(e.to_json()) for e in self.entries)
        return (
            dump(head)[:-1] + ',\n "entries": [' + (f"\n  {entries}\n " if entries else "")
            + "],\n " + dump(tail)[1:] + "\n"
        ).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, source: str) -> IndexState:
        """Parse and validate a complete (version 1) index document.

        Raises:
            CorruptIndexError: it is not valid JSON, not a complete index, or does not describe
                a consistent one.
        """
        state, journaled = parse_document(data, source)
        if journaled:
            raise CorruptIndexError(f"{source}: the document is the base of a journal; read "
                                    "the folder's index through the folder")
        return state


def best_to_json(best: Mapping[str, BestRecord]) -> dict[str, Any]:
    return {
        k: {"mode": r.mode, "value": encode_number(r.value), "name": r.name, "step": r.step}
        for k, r in best.items()
    }


def rotation_to_json(state: IndexState) -> dict[str, Any]:
    rotation: dict[str, Any] = {
        "window_origin": state.window_origin,
        "pending_deletes": list(state.pending_deletes),
    }
    if state.series_origins:
        rotation["series_origins"] = {k: encode_number(v) for k, v in state.series_origins.items()}
    return rotation


def _object(value: object, where: str) -> dict[str, Any]:
    """A JSON object of the index document, or CorruptIndexError naming ``where``."""
    if not isinstance(value, dict):
        raise CorruptIndexError(f"{where} must be an object")
    return value


def _name(value: object, where: str) -> str:
    return validate_name(value, where=where)


def best_from_json(raw_best: object, source: str) -> dict[str, BestRecord]:
    """The ``best`` object of a document or journal record (names not yet checked as listed)."""
    best: dict[str, BestRecord] = {}
    for metric, raw in _object(raw_best, f"{source}: 'best'").items():
        where = f"{source}: best[{metric!r}]"
        text(check_metric_key, metric, where)
        if not isinstance(raw, dict) or raw.get("mode") not in ("greater", "less"):
            raise CorruptIndexError(f"{where}: expected an object with mode greater|less")
        value = decode_number(raw.get("value"), f"{where}.value")
        if value != value:  # NaN is never better than anything: a NaN best is damage
            raise CorruptIndexError(f"{where}.value: NaN cannot be a best value")
        best[metric] = BestRecord(
            metric, raw["mode"], value, text(_name, raw.get("name"), f"{where}.name"),
            decode_count(raw.get("step"), f"{where}.step"),
        )
    return best


def rotation_from_json(
    raw_rotation: object, source: str
) -> tuple[float | None, tuple[str, ...], dict[str, float]]:
    """The ``rotation`` object: window origin, pending deletions, series origins."""
    rotation = _object(raw_rotation, f"{source}: 'rotation'")
    origin = rotation.get("window_origin")
    if origin is not None:
        origin = decode_time(origin, f"{source}: rotation.window_origin")
    pending = rotation.get("pending_deletes", [])
    if not isinstance(pending, list):
        raise CorruptIndexError(f"{source}: rotation.pending_deletes must be a list")
    pending_names = tuple(text(_name, p, f"{source}: pending_deletes") for p in pending)
    raw_origins = _object(rotation.get("series_origins", {}),
                          f"{source}: rotation.series_origins")
    series_origins: dict[str, float] = {}
    for key, value in raw_origins.items():
        where = f"{source}: rotation.series_origins[{key!r}]"
        series_origins[text(check_series, key, where)] = decode_time(value, where)
    return origin, pending_names, series_origins


def check_consistent(state: IndexState, latest: object, source: str) -> IndexState:
    """Raise CorruptIndexError unless ``state`` is internally consistent; return it."""
    names = state.names
    if len(names) != len(state.entries):
        raise CorruptIndexError(f"{source}: an entry name appears twice")
    if latest != (state.latest.name if state.latest else None):
        raise CorruptIndexError(f"{source}: 'latest' ({latest!r:.80}) is not the newest entry")
    for metric, record in state.best.items():
        if record.name not in names:
            raise CorruptIndexError(
                f"{source}: best[{metric!r}] names {record.name!r}, which is not listed"
            )
    if not names.isdisjoint(state.pending_deletes):
        raise CorruptIndexError(f"{source}: a listed checkpoint is also pending deletion")
    return state


def parse_document(data: bytes, source: str) -> tuple[IndexState, bool]:
    """Parse and validate an index document; return the state and whether it is the base of a
    journal (version 2).

    Raises:
        CorruptIndexError: it is not valid JSON or does not describe a consistent index.
    """
    doc = load_json(data, source)
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise CorruptIndexError(f"{source}: not an asyncckpt index (no format marker)")
    version = doc.get("version")
    if version not in (INDEX_VERSION, JOURNALED_VERSION) or isinstance(version, bool):
        raise CorruptIndexError(
            f"{source}: index version {version!r:.40} is not supported "
            f"(this asyncckpt reads versions {INDEX_VERSION} and {JOURNALED_VERSION})"
        )
    raw_entries = doc.get("entries")
    if not isinstance(raw_entries, list):
        raise CorruptIndexError(f"{source}: 'entries' must be a list")
    entries = tuple(
        IndexEntry.from_json(raw, f"{source}: entries[{i}]") for i, raw in enumerate(raw_entries)
    )
    origin, pending, series_origins = rotation_from_json(doc.get("rotation", {}), source)
    generation = doc.get("generation", 0)
    if isinstance(generation, bool) or not isinstance(generation, int):
        raise CorruptIndexError(f"{source}: 'generation' must be an int")
    state = IndexState(
        entries, best_from_json(doc.get("best", {}), source), origin, pending,
        decode_count(generation, f"{source}: 'generation'"), series_origins,
    )
    return check_consistent(state, doc.get("latest"), source), version == JOURNALED_VERSION
