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
best pointers and resume read this document only — never a directory listing or mtimes.
``IndexState`` is immutable: every operation returns a new state, so the writer can compute the
next index, publish it, and only then act on it (delete what it no longer references).
"""

from __future__ import annotations

import json
import math
import time as _time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, get_args

from ._config import BestMetric, Mode, check_series
from ._crypto import EncMode
from ._errors import CorruptIndexError
from ._naming import validate_name
from ._retention import Retention

__all__ = ["INDEX_FORMAT", "INDEX_VERSION", "BestRecord", "IndexEntry", "IndexState", "PathKey"]

INDEX_FORMAT = "asyncckpt.index"
INDEX_VERSION = 1

PathKey = tuple[str | int, ...]
ENCRYPTION_MODES = frozenset(get_args(EncMode))
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _encode_number(value: float) -> float | str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _object(value: object, where: str) -> dict[str, Any]:
    """A JSON object of the index document, or CorruptIndexError naming ``where``."""
    if not isinstance(value, dict):
        raise CorruptIndexError(f"{where} must be an object")
    return value


def _decode_number(value: object, where: str) -> float:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CorruptIndexError(f"{where}: expected a number, got {value!r}")
    return value


@dataclass(frozen=True)
class IndexEntry:
    """One committed checkpoint as the index records it."""

    name: str
    step: int
    epoch: int | None
    time: float
    size: int
    checksum: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    #: paths in the state where the caller passed numpy arrays (stored as tensors)
    numpy_paths: tuple[PathKey, ...] = ()
    #: exempt from retention (``save(..., keep=True)``)
    keep: bool = False
    #: the encryption mode of the stored bytes (never the key); None: a plain torch.save file
    encryption: str | None = None
    #: the series the entry belongs to (``CheckpointerConfig.series``); retention is per series
    series: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "step": self.step,
            "epoch": self.epoch,
            "time": self.time,
            "size": self.size,
            "checksum": self.checksum,
            "metrics": {k: _encode_number(v) for k, v in self.metrics.items()},
            "numpy": [list(p) for p in self.numpy_paths],
            "keep": self.keep,
        }
        if self.encryption is not None:
            doc["encryption"] = self.encryption
        if self.series is not None:
            doc["series"] = self.series
        return doc

    @classmethod
    def from_json(cls, raw: object, where: str) -> IndexEntry:
        if not isinstance(raw, dict):
            raise CorruptIndexError(f"{where}: expected an object, got {type(raw).__name__}")
        try:
            name = validate_name(raw["name"], where=where)
            step, epoch, size = raw["step"], raw["epoch"], raw["size"]
            checksum, metrics, numpy_paths = raw["checksum"], raw["metrics"], raw.get("numpy", [])
            keep = raw.get("keep", False)
            encryption, series = raw.get("encryption"), raw.get("series")
            when = _decode_number(raw["time"], f"{where}.time")
        except KeyError as exc:
            raise CorruptIndexError(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise CorruptIndexError(f"{where}: {exc}") from None
        for label, value, optional in (("step", step, False), ("epoch", epoch, True),
                                       ("size", size, False)):
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CorruptIndexError(f"{where}.{label}: expected an int >= 0, got {value!r}")
        if not isinstance(checksum, str) or ":" not in checksum:
            raise CorruptIndexError(f"{where}.checksum: expected 'algo:hex', got {checksum!r}")
        if not isinstance(metrics, dict) or not all(isinstance(k, str) for k in metrics):
            raise CorruptIndexError(f"{where}.metrics: expected an object of numbers")
        if not isinstance(numpy_paths, list) or not all(
            isinstance(p, list) and all(isinstance(k, (str, int)) for k in p) for p in numpy_paths
        ):
            raise CorruptIndexError(f"{where}.numpy: expected a list of key paths")
        if not isinstance(keep, bool):
            raise CorruptIndexError(f"{where}.keep: expected a bool, got {keep!r}")
        if encryption is not None and encryption not in ENCRYPTION_MODES:
            raise CorruptIndexError(f"{where}.encryption: unknown mode {encryption!r}")
        if series is not None:
            try:
                check_series(series, f"{where}.series")
            except (TypeError, ValueError) as exc:
                raise CorruptIndexError(str(exc)) from None
        return cls(
            name=name,
            step=step,
            epoch=epoch,
            time=when,
            size=size,
            checksum=checksum,
            metrics={k: _decode_number(v, f"{where}.metrics.{k}") for k, v in metrics.items()},
            numpy_paths=tuple(tuple(p) for p in numpy_paths),
            keep=keep,
            encryption=encryption,
            series=series,
        )


@dataclass(frozen=True)
class BestRecord:
    """The best value seen for a metric and the checkpoint that holds it."""

    metric: str
    mode: Mode
    value: float
    name: str
    step: int


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
    @property
    def latest(self) -> IndexEntry | None:
        return self.entries[-1] if self.entries else None

    @property
    def names(self) -> set[str]:
        return {e.name for e in self.entries}

    def get(self, name: str) -> IndexEntry | None:
        for e in self.entries:
            if e.name == name:
                return e
        return None

    def by_step(self, step: int) -> IndexEntry | None:
        """The newest entry with this step."""
        for e in reversed(self.entries):
            if e.step == step:
                return e
        return None

    # -- transitions ---------------------------------------------------------------------------
    def without_entry(self, name: str, metrics: Sequence[BestMetric]) -> IndexState:
        """Drop entry ``name``; a best pointer that named it falls back to the best remaining."""
        entries = tuple(e for e in self.entries if e.name != name)
        best = dict(self.best)
        for m in metrics:
            record = best.get(m.name)
            if record is not None and record.name == name:
                replacement = _best_among(entries, m)
                if replacement is None:
                    del best[m.name]
                else:
                    best[m.name] = replacement
        return replace(self, entries=entries, best=best)

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
        return replace(
            state,
            entries=state.entries + (entry,),
            best=best,
            window_origin=entry.time if state.window_origin is None else state.window_origin,
            pending_deletes=tuple(n for n in state.pending_deletes if n != entry.name),
            series_origins=origins,
        )

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
        return replace(state, pending_deletes=pending), dropped

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
        return (
            replace(
                self,
                entries=tuple(e for e in self.entries if e.name not in gone),
                pending_deletes=pending,
            ),
            victims,
        )

    def forget_deleted(self, names: Iterable[str]) -> IndexState:
        gone = set(names)
        pending = tuple(n for n in self.pending_deletes if n not in gone)
        return replace(self, pending_deletes=pending)

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
    def to_json(self) -> bytes:
        rotation: dict[str, object] = {
            "window_origin": self.window_origin,
            "pending_deletes": list(self.pending_deletes),
        }
        if self.series_origins:
            rotation["series_origins"] = {
                k: _encode_number(v) for k, v in self.series_origins.items()
            }
        doc = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "generation": self.generation,
            "updated": _time.time(),
            "latest": self.latest.name if self.latest else None,
            "entries": [e.to_json() for e in self.entries],
            "best": {
                k: {
                    "mode": r.mode,
                    "value": _encode_number(r.value),
                    "name": r.name,
                    "step": r.step,
                }
                for k, r in self.best.items()
            },
            "rotation": rotation,
        }
        return (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, source: str) -> IndexState:
        """Parse and validate an index document.

        Raises:
            CorruptIndexError: it is not valid JSON or does not describe a consistent index.
        """
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptIndexError(f"{source}: not a JSON document ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
            raise CorruptIndexError(f"{source}: not an asyncckpt index (no format marker)")
        if doc.get("version") != INDEX_VERSION:
            raise CorruptIndexError(
                f"{source}: index version {doc.get('version')!r} is not supported "
                f"(this asyncckpt reads version {INDEX_VERSION})"
            )
        raw_entries = doc.get("entries")
        if not isinstance(raw_entries, list):
            raise CorruptIndexError(f"{source}: 'entries' must be a list")
        entries = tuple(
            IndexEntry.from_json(raw, f"{source}: entries[{i}]")
            for i, raw in enumerate(raw_entries)
        )
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise CorruptIndexError(f"{source}: an entry name appears twice")
        latest = doc.get("latest")
        if latest != (names[-1] if names else None):
            raise CorruptIndexError(f"{source}: 'latest' ({latest!r}) is not the newest entry")
        raw_best = _object(doc.get("best", {}), f"{source}: 'best'")
        best: dict[str, BestRecord] = {}
        for metric, raw in raw_best.items():
            where = f"{source}: best[{metric!r}]"
            if not isinstance(raw, dict) or raw.get("mode") not in ("greater", "less"):
                raise CorruptIndexError(f"{where}: expected an object with mode greater|less")
            if raw.get("name") not in names:
                raise CorruptIndexError(f"{where} names {raw.get('name')!r}, which is not listed")
            step = raw.get("step")
            if isinstance(step, bool) or not isinstance(step, int):
                raise CorruptIndexError(f"{where}.step: expected an int")
            best[metric] = BestRecord(
                metric, raw["mode"], _decode_number(raw.get("value"), f"{where}.value"),
                raw["name"], step,
            )
        rotation = _object(doc.get("rotation", {}), f"{source}: 'rotation'")
        origin = rotation.get("window_origin")
        if origin is not None:
            origin = _decode_number(origin, f"{source}: rotation.window_origin")
        pending = rotation.get("pending_deletes", [])
        if not isinstance(pending, list):
            raise CorruptIndexError(f"{source}: rotation.pending_deletes must be a list")
        try:
            pending_names = tuple(
                validate_name(p, where=f"{source}: pending_deletes") for p in pending
            )
        except (TypeError, ValueError) as exc:
            raise CorruptIndexError(str(exc)) from None
        if set(pending_names) & set(names):
            raise CorruptIndexError(f"{source}: a listed checkpoint is also pending deletion")
        generation = doc.get("generation", 0)
        if isinstance(generation, bool) or not isinstance(generation, int):
            raise CorruptIndexError(f"{source}: 'generation' must be an int")
        raw_origins = _object(rotation.get("series_origins", {}),
                              f"{source}: rotation.series_origins")
        series_origins: dict[str, float] = {}
        for key, value in raw_origins.items():
            where = f"{source}: rotation.series_origins[{key!r}]"
            try:
                check_series(key, where)
            except (TypeError, ValueError) as exc:
                raise CorruptIndexError(str(exc)) from None
            series_origins[key] = _decode_number(value, where)
        return cls(entries, best, origin, pending_names, generation, series_origins)
