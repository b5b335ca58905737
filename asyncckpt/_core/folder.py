"""One checkpoint folder: its index (the single source of truth) and every change to it.

Readers (``load``, ``verify``, ``checkpoints``) use the read-only half: read the index, pick an
entry, check a file against it. The writer uses the rest, always in this order for a save::

    announce(name)          recorded as pending deletion before any byte is written (and a
                            re-saved name unlisted): a crash leaves nothing unlisted behind
    (the data is written and made durable elsewhere)
    commit(entry, ...)      one new index: the entry, latest, best, superseded and rotated names
                            moved to pending_deletes -- published atomically, after the data
    write_pointer()         last_checkpoint names the newest entry
    delete_pending()        files the published index no longer names; failures stay pending

Nothing a published index names is ever deleted or overwritten in place.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import TypeVar

import anyio

from .._errors import (
    CheckpointNotFoundError,
    IntegrityError,
    TransientStorageError,
)
from .._format.best import BestMetric
from .._format.hashing import Hasher
from .._format.index import (
    INDEX_VERSION,
    JOURNALED_VERSION,
    IndexEntry,
    IndexState,
)
from .._format.journal import (
    Journal,
    compact_after,
    encode_record,
    journaled,
    record_name,
)
from .._format.naming import INDEX_NAME, LAST_CHECKPOINT_NAME
from .._format.retention import Retention
from ..storage import Storage
from ..storage._limits import ObjectTooLargeError
from .events import CheckpointInfo
from .journal_io import drop_stale, read_journaled

__all__ = ["CheckpointFolder", "retrying", "select_entry"]

logger = logging.getLogger("asyncckpt")
T = TypeVar("T")


async def retrying(
    action: Callable[[], Awaitable[T]], *, retries: int, backoff: float, what: str
) -> T:
    """Run ``action``; retry TransientStorageError with exponential backoff and jitter."""
    attempt = 0
    while True:
        try:
            return await action()
        except TransientStorageError as exc:
            if attempt >= retries:
                raise
            attempt += 1
            delay = backoff * 2 ** (attempt - 1) * (0.5 + random.random())
            logger.warning("%s failed (%s); retry %d/%d in %.2fs", what, exc, attempt, retries,
                           delay)
            await anyio.sleep(delay)


def select_entry(index: IndexState, which: object, where: str) -> IndexEntry:
    """The entry ``which`` names: ``"latest"``, ``"best:<metric>"``, a step or a file name.

    Raises:
        CheckpointNotFoundError: nothing matches (``where`` names the folder in the message).
        TypeError: ``which`` has none of those forms.
    """
    if not index.entries:
        raise CheckpointNotFoundError(f"{where} holds no committed checkpoints")
    if which == "latest":
        return index.entries[-1]
    if isinstance(which, str) and which.startswith("best:"):
        metric = which[len("best:") :]
        record = index.best.get(metric)
        if record is None:
            tracked = ", ".join(repr(m) for m in index.best) or "none"
            raise CheckpointNotFoundError(
                f"{where} has no best checkpoint for {metric!r} (metrics with one: {tracked})"
            )
        entry = index.get(record.name)
        if entry is None:  # from_json validates this; kept for hand-built states
            raise CheckpointNotFoundError(f"{where}: best {metric!r} names a missing entry")
        return entry
    if isinstance(which, int) and not isinstance(which, bool):
        entry = index.by_step(which)
        if entry is None:
            steps = ", ".join(str(e.step) for e in index.entries[-10:])
            raise CheckpointNotFoundError(
                f"{where} has no checkpoint for step {which} (latest steps: {steps})"
            )
        return entry
    if isinstance(which, str):
        entry = index.get(which)
        if entry is None:
            raise CheckpointNotFoundError(f"{where} has no checkpoint named {which!r}")
        return entry
    raise TypeError(
        "which must be 'latest', 'best:<metric>', a step (int) or a checkpoint name, "
        f"got {which!r}"
    )


class CheckpointFolder:
    """A folder (or prefix) of checkpoints and its index, read or written through ``storage``.

    Args:
        storage: the backend; the caller opens and closes it (except :meth:`close`).
        best: the metrics with best pointers (writers).
        retries: attempts beyond the first for transient storage failures.
        backoff: the first retry's delay in seconds (doubled each time, with jitter).
    """

    def __init__(
        self,
        storage: Storage,
        *,
        best: Sequence[BestMetric] = (),
        retries: int = 0,
        backoff: float = 0.0,
    ) -> None:
        self.storage = storage
        self.best_metrics = tuple(best)
        self._retries = retries
        self._backoff = backoff
        #: the writer's view (published, or with deletions done since)
        self.index = IndexState()
        self._published = self.index
        self._journal = Journal(0, False, [])

    @property
    def uri(self) -> str:
        return self.storage.uri

    # -- reading -----------------------------------------------------------------------------
    async def read_index(self) -> IndexState | None:
        """The folder's index as stored now, or None when there is none.

        A long index is a base document plus journal records (``_format/journal.py``): they are
        read together, and read again if the writer compacted them in between.

        Raises:
            CorruptIndexError: it cannot be read.
        """
        found = await read_journaled(self.storage)
        return None if found is None else found[0]

    def info(self, entry: IndexEntry) -> CheckpointInfo:
        return CheckpointInfo(
            name=entry.name,
            uri=self.storage.uri_of(entry.name),
            step=entry.step,
            epoch=entry.epoch,
            time=entry.time,
            size=entry.size,
            checksum=entry.checksum,
            metrics=dict(entry.metrics),
            kind=entry.kind or "file",
            world_size=entry.world_size or 1,
        )

    async def check(self, entry: IndexEntry) -> None:
        """Read ``entry``'s file and compare it with what the index recorded.

        Raises:
            IntegrityError: the size (``kind="size"``) or the checksum (``kind="checksum"``)
                differs; nothing past the recorded size is read.
            FileNotFoundError: the file is missing.
            NotARegularFileError: (local) the entry is a link, a FIFO, a folder, a device.
        """
        hasher, size = Hasher(), 0
        try:
            stream = self.storage.read_stream(entry.name, max_bytes=entry.size)
            async with aclosing(stream):  # type: ignore[type-var]
                async for chunk in stream:
                    hasher.update(chunk)
                    size += len(chunk)
        except ObjectTooLargeError as exc:
            uri = self.storage.uri_of(entry.name)
            raise IntegrityError(
                f"{uri} holds more than the {entry.size} bytes the index recorded: the file was "
                "replaced after it was committed",
                kind="size",
                uri=uri,
            ) from exc
        self.compare(entry, size, hasher.hexdigest())

    def compare(self, entry: IndexEntry, size: int, checksum: str) -> None:
        """Raise :class:`IntegrityError` unless ``size`` and ``checksum`` are the recorded ones."""
        self.compare_at(self.storage.uri_of(entry.name), entry, size, checksum)

    @staticmethod
    def compare_at(uri: str, entry: IndexEntry, size: int, checksum: str) -> None:
        """:meth:`compare` for the file at ``uri`` (``size``: bytes read, which a reader may
        stop one past the recorded size)."""
        if size != entry.size:
            found = "more than" if size > entry.size else f"{size} bytes, not"
            raise IntegrityError(
                f"{uri} holds {found} the {entry.size} bytes the index recorded: the file was "
                "truncated or replaced after it was committed",
                kind="size",
                uri=uri,
            )
        if checksum != entry.checksum:
            raise IntegrityError(
                f"{uri} does not match its checksum (index {entry.checksum}, file {checksum}): "
                "the file is corrupted",
                kind="checksum",
                uri=uri,
            )

    # -- the writer's view -------------------------------------------------------------------
    def checkpoints(self) -> list[CheckpointInfo]:
        return [self.info(e) for e in self.index.entries]

    def latest(self) -> CheckpointInfo | None:
        entry = self.index.latest
        return None if entry is None else self.info(entry)

    def best(self, metric: str) -> CheckpointInfo | None:
        if metric not in {m.name for m in self.best_metrics}:
            tracked = ", ".join(repr(m.name) for m in self.best_metrics) or "none"
            raise ValueError(f"no best pointer for {metric!r}; tracked metrics: {tracked}")
        record = self.index.best.get(metric)
        if record is None:
            return None
        entry = self.index.get(record.name)
        return None if entry is None else self.info(entry)

    # -- writing -----------------------------------------------------------------------------
    async def open_for_writing(self) -> None:
        """Resume the folder's index (or create one), then clean what a crashed writer left:
        temporaries, and deletions its last index had pending. The storage is open."""
        found = await read_journaled(self.storage)
        if found is None:  # a new folder: make it recognizable (and listable) at once
            index = IndexState()
            await self.publish(index)
        else:
            index, self._journal = found
        self._published = index
        self.index = index.with_best_metrics(
            self.best_metrics, source=self.storage.uri_of(INDEX_NAME)
        )
        leftovers = await self.storage.cleanup_temporaries()
        if leftovers:
            logger.info("removed %d temporary leftovers in %s", len(leftovers), self.uri)
        await drop_stale(self.storage, self._journal)

    @property
    def untracked_best(self) -> list[str]:
        """Metrics the stored index keeps a best pointer for that this writer does not track:
        their checkpoints became ordinary rotation candidates when it opened."""
        tracked = {m.name for m in self.best_metrics}
        return [name for name in self._published.best if name not in tracked]

    async def publish(self, state: IndexState) -> None:
        """Replace the stored index with ``state`` (atomically, durably, retried).

        A short index is rewritten whole; a long one gets a journal record of the change, and
        now and then a new base document instead (a compaction), so that the cost of a commit
        does not grow with the history.
        """
        state = state.with_generation(self._published.generation + 1)
        journal, long = self._journal, journaled(len(state.entries))
        record = None
        if long and journal.journaled and len(journal.records) < compact_after(len(state.entries)):
            record = encode_record(self._published, state)
        if record is not None:
            name = record_name(state.generation)
            await self._retrying(functools.partial(self.storage.write_bytes, name, record),
                                 "writing the index journal")
            journal.records.append(state.generation)
        else:
            encode = functools.partial(
                state.to_json, version=JOURNALED_VERSION if long else INDEX_VERSION
            )
            # (a long document takes long to encode: not on the event loop)
            data = await anyio.to_thread.run_sync(encode) if long else encode()
            await self._retrying(functools.partial(self.storage.write_bytes, INDEX_NAME, data),
                                 "writing the index")
            self._journal = Journal(state.generation, long, [])
            self._journal.stale = journal.stale + [record_name(g) for g in journal.records]
        self.index = self._published = state
        await drop_stale(self.storage, self._journal)

    async def announce(self, name: str) -> None:
        """Before ``name`` is written, publish what a crash before its commit must find.

        A new name is recorded as pending deletion: a file a crash leaves under it (renamed into
        place, never listed) is removed by the next writer, and the commit takes it off the
        list. A listed name being re-saved is unlisted instead (no published index may name a
        file whose bytes are replaced), but not marked for deletion: whichever complete file a
        crash leaves under it -- the old bytes or the new -- stays for the user (unlisted).
        """
        state = self.index
        if name in state.names:
            state = state.without_entry(name, self.best_metrics)
        else:
            state = state.with_pending(name)
        if state is not self.index:
            await self.publish(state)

    async def unlist_many(self, names: Sequence[str]) -> list[str]:
        """Publish an index without ``names`` (listed or not, they become pending deletions);
        return them."""
        state, dropped = self.index.superseding(names, self.best_metrics)
        await self.publish(state)
        return dropped

    async def commit(
        self,
        entry: IndexEntry,
        *,
        supersedes: Sequence[str],
        retention: Retention,
        series: str | None,
    ) -> tuple[IndexState, list[str]]:
        """List ``entry`` (latest, best), drop what it supersedes and what retention drops, and
        publish; return the index before and the names now pending deletion."""
        before = self.index
        state, dropped = before.with_entry(entry, self.best_metrics).superseding(
            supersedes, self.best_metrics
        )
        state, victims = state.rotated(retention, series)
        await self.publish(state)
        return before, dropped + victims

    async def relist_if_intact(self, entry: IndexEntry, prior: IndexState) -> None:
        """After a failed re-save, list the previous file again if its bytes are unchanged:
        back to the index as it was (``prior``: its place in the order, the best pointers),
        not appended as if it were the newest."""
        try:
            if await self.matches(entry):
                pending = tuple(n for n in self.index.pending_deletes if n != entry.name)
                await self.publish(replace(prior, pending_deletes=pending))
        except Exception as exc:  # the write failure being raised matters more
            logger.warning("could not re-list %s after a failed re-save: %s", entry.name, exc)

    async def matches(self, entry: IndexEntry) -> bool:
        """Whether ``entry``'s file holds exactly the bytes the index recorded."""
        try:
            await self.check(entry)
        except IntegrityError:
            return False
        return True

    async def write_pointer(self) -> None:
        """Point ``last_checkpoint`` at the newest entry."""
        latest = self.index.latest
        if latest is None:
            return
        data = self.storage.uri_of(latest.name).encode("utf-8")
        await self._retrying(lambda: self.storage.write_bytes(LAST_CHECKPOINT_NAME, data),
                             f"writing {LAST_CHECKPOINT_NAME}")

    async def delete_pending(self, on_failure: Callable[[str, Exception], None]) -> None:
        """Delete files the published index no longer names; failures stay pending and are
        reported to ``on_failure(name, error)``."""
        listed = self.index.names | self._published.names
        deleted: list[str] = []
        for name in self.index.pending_deletes:
            if name in listed:  # never delete a file an index names (belt and braces)
                continue
            try:
                await self._retrying(
                    lambda name=name: self.storage.delete(name),  # type: ignore[misc]
                    f"deleting {name}",
                )
            except Exception as exc:
                logger.warning("could not delete %s (will retry): %s", name, exc)
                on_failure(name, exc)
            else:
                deleted.append(name)
        if deleted:
            self.index = self.index.forget_deleted(deleted)

    async def flush_index(self) -> None:
        """Publish the writer's view if it differs from the stored index (at close)."""
        if self.index != self._published:
            await self.publish(self.index)

    async def _retrying(self, action: Callable[[], Awaitable[T]], what: str) -> T:
        return await retrying(action, retries=self._retries, backoff=self._backoff, what=what)
