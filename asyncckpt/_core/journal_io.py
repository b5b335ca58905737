"""Reading a folder's journaled index whole, and removing the records its base already holds.

The format (base document, records, compaction) is ``_format/journal.py``; this is the storage
side of it, used by :class:`~asyncckpt._core.folder.CheckpointFolder`.
"""

from __future__ import annotations

import logging

import anyio

from .._errors import CorruptIndexError
from .._format.index import IndexState, parse_document
from .._format.journal import Journal, record_generation, record_name, replay
from .._format.naming import INDEX_NAME
from ..storage import Storage

__all__ = ["drop_stale", "read_journaled"]

logger = logging.getLogger("asyncckpt")

_READ_ATTEMPTS = 5
_READ_CONCURRENCY = 16
#: stale records removed per publish: a compaction's leftovers go over the next commits
_STALE_PER_PUBLISH = 16


async def read_journaled(storage: Storage) -> tuple[IndexState, Journal] | None:
    """The index (base document and journal records) and its layout, or None without one.

    A compaction between reading the base and reading the records shows as a gap or a missing
    record: the whole read starts again from the (new) base.
    """
    uri = storage.uri_of(INDEX_NAME)
    problem = ""
    for _ in range(_READ_ATTEMPTS):
        try:
            data = await storage.read_bytes(INDEX_NAME)
        except FileNotFoundError:
            return None
        base, journaled = parse_document(data, uri)
        listed = sorted(g for n in await storage.list() if (g := record_generation(n)) is not None)
        first = base.generation + 1
        live = [g for g in listed if journaled and g >= first]
        expected = range(first, first + len(live))
        missing = next((g for g, have in zip(expected, live, strict=True) if g != have), None)
        if missing is not None:
            problem = f"journal record {storage.uri_of(record_name(missing))} is missing"
            continue
        records = await _read_records(storage, live)
        if records is None:
            problem = "a journal record disappeared while it was read"
            continue
        journal = Journal(base.generation, journaled, live)
        journal.stale = [record_name(g) for g in listed if not journaled or g < first]
        return replay(base, records), journal
    raise CorruptIndexError(f"{uri}: {problem} (read {_READ_ATTEMPTS} times)")


async def _read_records(storage: Storage, generations: list[int]) -> list[tuple[str, bytes]] | None:
    """The records' sources and bytes (a few at a time), or None if one is gone."""
    out: list[tuple[str, bytes]] = [("", b"")] * len(generations)
    failures: list[BaseException] = []
    limiter = anyio.CapacityLimiter(_READ_CONCURRENCY)

    async def read(i: int, name: str) -> None:
        async with limiter:
            try:
                out[i] = (storage.uri_of(name), await storage.read_bytes(name))
            except Exception as exc:  # raised below, outside the task group
                failures.append(exc)

    async with anyio.create_task_group() as tg:
        for i, generation in enumerate(generations):
            tg.start_soon(read, i, record_name(generation))
    if any(isinstance(exc, FileNotFoundError) for exc in failures):
        return None
    if failures:
        raise failures[0]
    return out


async def drop_stale(storage: Storage, journal: Journal) -> None:
    """Delete a few journal records the base already holds; what fails stays for later."""
    batch, journal.stale = journal.stale[:_STALE_PER_PUBLISH], journal.stale[_STALE_PER_PUBLISH:]
    for name in batch:
        try:
            await storage.delete(name)
        except Exception as exc:  # harmless: readers ignore records the base holds
            logger.warning("could not delete the stale index journal record %s: %s", name, exc)
            journal.stale.append(name)
