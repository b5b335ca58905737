"""A long index is a base plus journal records: every reader sees each commit, on disk and S3."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from support.helpers import WrappedStorage
from support.s3fixtures import object_keys

import asyncckpt
from asyncckpt import Checkpointer, CorruptIndexError
from asyncckpt._core.folder import CheckpointFolder
from asyncckpt._format import journal
from asyncckpt._format.best import BestMetric
from asyncckpt._format.index import IndexEntry, IndexState
from asyncckpt._format.naming import INDEX_NAME
from asyncckpt._format.retention import Retention
from asyncckpt.storage import LocalStorage, storage_for

FAST = {"storage_options": {"fsync": False}}


@pytest.fixture
def small_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Journal from 4 entries on, compact after 3 records: a few saves cross every path."""
    monkeypatch.setattr(journal, "JOURNAL_FROM", 4)
    monkeypatch.setattr(journal, "COMPACT_MIN", 3)
    monkeypatch.setattr(journal, "COMPACT_PER_ENTRIES", 10**6)


def records_in(names: list[str]) -> list[int]:
    return sorted(g for n in names if (g := journal.record_generation(n)) is not None)


def read_raw(location: Any, options: dict[str, Any] | None, name: str) -> bytes:
    async def read() -> bytes:
        storage = storage_for(location, storage_options=options)
        await storage.open(writer=False)
        try:
            return await storage.read_bytes(name)
        finally:
            await storage.aclose()

    return anyio.run(read)


#: odd steps rotate out once 3 newer ones exist: records drop entries as well as add them
OPTIONS: dict[str, Any] = {"keep_last": 3, "keep_period": 2, "best": {"acc": "greater"}}


def kept(latest: int) -> list[int]:
    return [s for s in range(latest + 1) if s % 2 == 0 or s > latest - 3]


def run_and_check(location: Any, options: dict[str, Any] | None, listed) -> None:
    """Save 12 steps (a record or a new base each), checking every reader after each."""
    with Checkpointer(location, storage_options=options, **OPTIONS) as ckpt:
        for step in range(12):
            ckpt.save({"w": step}, step=step, metrics={"acc": step % 5}).wait()
            steps = [c.step for c in asyncckpt.checkpoints(location, storage_options=options)]
            assert steps == kept(step)
            assert asyncckpt.load(location, storage_options=options) == {"w": step}
            best = asyncckpt.load(location, "best:acc", storage_options=options)
            assert best["w"] == min(step, 4)
            assert len(records_in(listed())) <= journal.COMPACT_MIN  # stale ones deleted
    assert asyncckpt.verify(location, storage_options=options).ok
    base = json.loads(read_raw(location, options, INDEX_NAME))
    assert base["version"] == 2  # 12 entries: journaled
    # A reader that knows only complete documents refuses the base instead of misreading it.
    with pytest.raises(CorruptIndexError, match="base of a journal"):
        IndexState.from_json(read_raw(location, options, INDEX_NAME), "x")
    # Resume: the next writer reads base and records and continues the generations.
    with Checkpointer(location, storage_options=options, **OPTIONS) as ckpt:
        assert ckpt.latest().step == 11 and ckpt.best("acc").step == 4
        ckpt.save({"w": 12}, step=12, metrics={"acc": 9}).wait()
    assert asyncckpt.load(location, "best:acc", storage_options=options) == {"w": 12}
    assert [c.step for c in asyncckpt.checkpoints(location, storage_options=options)] == kept(12)


def test_a_journaled_index_on_disk(tmp_path, small_journal):
    folder = tmp_path / "run"
    run_and_check(folder, {"fsync": False}, lambda: [p.name for p in folder.iterdir()])


def test_a_journaled_index_on_s3(s3_uri, s3_prefix, s3_client, s3_options, small_journal):
    """S3 has no append: each record is an object of its own."""
    run_and_check(s3_uri, s3_options,
                  lambda: [k.rpartition("/")[2] for k in object_keys(s3_client, s3_prefix)])


def test_a_short_index_stays_a_complete_version_1_document(tmp_path, small_journal):
    with Checkpointer(tmp_path, keep_last=2, **FAST) as ckpt:
        for step in range(10):
            ckpt.save({"w": step}, step=step).wait()
    assert json.loads((tmp_path / INDEX_NAME).read_bytes())["version"] == 1
    assert not records_in([p.name for p in tmp_path.iterdir()])
    assert [e.step for e in IndexState.from_json((tmp_path / INDEX_NAME).read_bytes(),
                                                 "x").entries] == [8, 9]


def test_shrinking_below_the_journal_threshold_returns_to_version_1(tmp_path, small_journal):
    with Checkpointer(tmp_path, **FAST) as ckpt:
        for step in range(6):
            ckpt.save({"w": step}, step=step).wait()
    assert json.loads((tmp_path / INDEX_NAME).read_bytes())["version"] == 2
    with Checkpointer(tmp_path, keep_last=1, **FAST) as ckpt:
        ckpt.save({"w": 6}, step=6).wait()
    assert json.loads((tmp_path / INDEX_NAME).read_bytes())["version"] == 1
    assert [c.step for c in asyncckpt.checkpoints(tmp_path)] == [6]
    assert not records_in([p.name for p in tmp_path.iterdir()])  # stale records went too


def entry(step: int) -> IndexEntry:
    return IndexEntry(f"step_{step}.pt", step, None, 1000.0 + step, 1, "xxh3_128:00", {})


class CompactingDuringRead(WrappedStorage):
    """A reader's storage: between reading the base and listing the records, the writer
    commits until it compacts (the race a reader of a live folder meets)."""

    def __init__(self, inner: LocalStorage, writer: CheckpointFolder) -> None:
        super().__init__(inner)
        self.writer = writer
        self.raced = False
        self.base_reads = 0

    async def read_bytes(self, name: str) -> bytes:
        self.base_reads += name == INDEX_NAME
        return await super().read_bytes(name)

    async def list(self) -> list[str]:
        if not self.raced:
            self.raced = True
            step = len(self.writer.index.entries)
            while self.writer._journal.records:  # until a new base holds them all
                await self.writer.commit(entry(step), supersedes=(), retention=Retention(),
                                         series=None)
                step += 1
            await self.writer.commit(entry(step), supersedes=(), retention=Retention(),
                                     series=None)
        return await super().list()


def test_a_reader_racing_a_compaction_reads_again_and_gets_a_committed_state(tmp_path,
                                                                           small_journal):
    async def main() -> None:
        storage = LocalStorage(tmp_path, fsync=False)
        await storage.open(writer=True)
        writer = CheckpointFolder(storage, best=(BestMetric("acc", "greater"),))
        await writer.open_for_writing()
        for step in range(6):
            await writer.commit(entry(step), supersedes=(), retention=Retention(), series=None)
        assert writer._journal.records  # the base is followed by records
        reader = CheckpointFolder(CompactingDuringRead(LocalStorage(tmp_path), writer))
        state = await reader.read_index()
        assert reader.storage.raced and reader.storage.base_reads == 2 and state is not None
        assert state.entries == writer.index.entries  # the new base, read again
        await storage.aclose()

    anyio.run(main)


def test_a_missing_record_is_a_corrupt_index(tmp_path, small_journal):
    with Checkpointer(tmp_path, **FAST) as ckpt:
        for step in range(40):  # until two records stand beside the base
            ckpt.save({"w": step}, step=step).wait()
            if len(records_in([p.name for p in tmp_path.iterdir()])) >= 2:
                break
    live = records_in([p.name for p in tmp_path.iterdir()])
    assert len(live) >= 2
    (tmp_path / journal.record_name(live[0])).unlink()
    with pytest.raises(CorruptIndexError, match=f"record .*{live[0]} is missing"):
        asyncckpt.checkpoints(tmp_path)
    with pytest.raises(CorruptIndexError, match="is missing"):
        Checkpointer(tmp_path, **FAST)
