"""The index journal: a long index is a base document plus one small record per commit.

Rewriting a document of every entry at each commit makes a commit cost grow with the history.
Once an index is long, the writer instead publishes each new state as a *record* of what changed
since the previous one, in an object of its own beside the document::

    asyncckpt-index.json                       base: version 2, generation G, the state at G
    .asyncckpt-journal.<G+1, 20 digits>        {"generation": G+1, "drop": [...], "add": [...],
    .asyncckpt-journal.<G+2, 20 digits>         "latest": ..., "best": {...}, "rotation": {...}}

Every record and the base are written whole and atomically (temporary file, fsync, rename; an S3
object PUT), so a commit is one small object on every backend -- S3 has no append, so records
are objects, not lines of one file. A record is visible once complete; the state is the base
plus the records G+1, G+2, ... with no gap. Now and then the writer *compacts*: it writes the
current state as a new base document (generation G'), then deletes the records up to G'.
A crash at any instant leaves either the old base with every record, or the new base (records
up to G' are then ignored, and removed at the next open).

Short indexes are written whole as version 1 (no journal), the format every asyncckpt reads;
readers that know only version 1 refuse a version-2 base instead of reading a stale state.
"""

from __future__ import annotations

import json
import operator
from dataclasses import replace
from itertools import compress

from .._errors import CorruptIndexError
from .entry import IndexEntry, decode_count, load_json
from .index import (
    IndexState,
    best_from_json,
    best_to_json,
    check_consistent,
    rotation_from_json,
    rotation_to_json,
)

__all__ = [
    "JOURNAL_PREFIX",
    "Journal",
    "compact_after",
    "encode_record",
    "journaled",
    "record_generation",
    "record_name",
    "replay",
]

JOURNAL_FORMAT = "asyncckpt.journal"
JOURNAL_PREFIX = ".asyncckpt-journal."
#: Indexes with fewer entries are rewritten whole at each commit (version 1, no journal).
JOURNAL_FROM = 256
#: Compact once this many records, or one record per this many entries, wait to be folded in:
#: a compaction rewrites every entry, so spacing compactions in proportion to the length keeps
#: the mean cost of a commit constant (and the records a reader fetches a small fraction).
COMPACT_MIN = 64
COMPACT_PER_ENTRIES = 64
#: A change bigger than this (a re-listed old entry moves everything after it) is written as a
#: new base instead.
MAX_RECORD_ENTRIES = 1024


def journaled(entries: int) -> bool:
    """Whether an index of ``entries`` entries is written as a base and journal records."""
    return entries >= JOURNAL_FROM


def compact_after(entries: int) -> int:
    """How many records may follow a base whose state has ``entries`` entries."""
    return max(COMPACT_MIN, entries // COMPACT_PER_ENTRIES)


def record_name(generation: int) -> str:
    return f"{JOURNAL_PREFIX}{generation:020d}"


def record_generation(name: str) -> int | None:
    """The generation a journal record's name carries, or None for any other name."""
    if not name.startswith(JOURNAL_PREFIX):
        return None
    digits = name[len(JOURNAL_PREFIX):]
    return int(digits) if len(digits) == 20 and digits.isascii() and digits.isdigit() else None


class Journal:
    """What a folder's index is made of: the base and the records beside it."""

    def __init__(self, base_generation: int, journaled: bool, records: list[int]) -> None:
        #: the generation of the stored document
        self.base_generation = base_generation
        #: whether the document is a version-2 base (records may follow)
        self.journaled = journaled
        #: generations of the records that follow the base (G+1, G+2, ...)
        self.records = records
        #: names of records the base already holds (deleted when convenient)
        self.stale: list[str] = []


def encode_record(before: IndexState, after: IndexState) -> bytes | None:
    """The record that turns ``before`` into ``after``, or None when the change is too big for
    one (write a new base instead). Entries are compared by identity: ``after`` is derived
    from ``before`` by the index's transitions, which share unchanged entries."""
    old, new = before.entries, after.entries
    # The common prefix, found in C: the first position where the two differ.
    shared = min(len(old), len(new))
    first = next(compress(range(shared), map(operator.is_not, old, new)), shared)
    # Past the prefix: keep what stays in order, drop the rest, add what follows. (A long
    # walk only when an old entry left: rare, and still far cheaper than a new base.)
    drop: list[str] = []
    j = first
    for entry in old[first:]:
        if j < len(new) and new[j] is entry:
            j += 1
        else:
            drop.append(entry.name)
            if len(drop) > MAX_RECORD_ENTRIES:
                return None
    add = new[j:]
    if len(drop) + len(add) > MAX_RECORD_ENTRIES:
        return None
    doc = {
        "format": JOURNAL_FORMAT,
        "generation": after.generation,
        "drop": drop,
        "add": [e.to_json() for e in add],
        "latest": after.latest.name if after.latest else None,
        "best": best_to_json(after.best),
        "rotation": rotation_to_json(after),
    }
    return (json.dumps(doc, allow_nan=False) + "\n").encode("utf-8")


def replay(base: IndexState, records: list[tuple[str, bytes]]) -> IndexState:
    """Apply journal records (``(source, data)``, generations base+1, base+2, ...) to ``base``.

    Raises:
        CorruptIndexError: a record is unreadable, out of sequence or inconsistent with the
            state it applies to.
    """
    if not records:
        return base
    entries = dict(zip(map(operator.attrgetter("name"), base.entries), base.entries,
                       strict=True))
    state, latest = base, None
    for source, data in records:
        doc = load_json(data, source)
        if not isinstance(doc, dict) or doc.get("format") != JOURNAL_FORMAT:
            raise CorruptIndexError(f"{source}: not an asyncckpt journal record")
        generation = decode_count(doc.get("generation"), f"{source}: 'generation'")
        if generation != state.generation + 1:
            raise CorruptIndexError(
                f"{source}: record of generation {generation} follows {state.generation}"
            )
        drop, add = doc.get("drop"), doc.get("add")
        if not isinstance(drop, list) or not isinstance(add, list):
            raise CorruptIndexError(f"{source}: 'drop' and 'add' must be lists")
        for name in drop:
            if not isinstance(name, str) or entries.pop(name, None) is None:
                raise CorruptIndexError(f"{source}: drops {name!r:.80}, which is not listed")
        for i, raw in enumerate(add):
            entry = IndexEntry.from_json(raw, f"{source}: add[{i}]")
            if entry.name in entries:
                raise CorruptIndexError(f"{source}: adds {entry.name!r}, which is listed")
            entries[entry.name] = entry
        latest = doc.get("latest")
        if latest != (next(reversed(entries)) if entries else None):
            raise CorruptIndexError(f"{source}: 'latest' ({latest!r:.80}) is not the newest")
        origin, pending, series_origins = rotation_from_json(doc.get("rotation", {}), source)
        state = replace(
            state, best=best_from_json(doc.get("best", {}), source), window_origin=origin,
            pending_deletes=pending, series_origins=series_origins, generation=generation,
        )
    state = replace(state, entries=tuple(entries.values()))
    return check_consistent(state, latest, records[-1][0])
