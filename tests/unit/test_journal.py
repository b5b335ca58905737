"""Journal records: every transition of the index replays exactly; damaged records are refused."""

from __future__ import annotations

import json
import random

import pytest

from asyncckpt import CorruptIndexError
from asyncckpt._format import journal
from asyncckpt._format.best import BestMetric
from asyncckpt._format.index import IndexEntry, IndexState
from asyncckpt._format.journal import encode_record, record_generation, record_name, replay
from asyncckpt._format.retention import Retention

ACC = (BestMetric("acc", "greater"),)


def entry(step: int, acc: float, *, series: str | None = None, keep: bool = False) -> IndexEntry:
    return IndexEntry(f"step_{step}.pt", step, None, 1000.0 + 60 * step, 10, "xxh3_128:00",
                      {"acc": acc}, keep=keep, series=series)


def transitions(seed: int, count: int) -> list[IndexState]:
    """Published states of a random run: saves, re-saves, supersedes, rotation, re-listing."""
    rng = random.Random(seed)
    retention = Retention(keep_last=4, keep_every_n_minutes=3)
    state = IndexState()
    published = [state]
    for step in range(count):
        action = rng.random()
        if action < 0.1 and state.entries:  # re-save an existing name
            old = rng.choice(state.entries)
            state = state.with_entry(entry(old.step, rng.random()), ACC)
        elif action < 0.15 and len(state.entries) > 1:  # back to an earlier state
            state = published[rng.randrange(len(published))]
        else:
            new = entry(step + 1000, rng.random(), series=rng.choice([None, "s"]),
                        keep=rng.random() < 0.1)
            state = state.with_entry(new, ACC)
            if action < 0.2:
                state, _ = state.superseding([rng.choice(state.entries).name], ACC)
            state, _ = state.rotated(retention, new.series)
        if rng.random() < 0.5:
            state = state.forget_deleted(state.pending_deletes[:1])
        state = state.with_generation(published[-1].generation + 1)
        published.append(state)
    return published


@pytest.mark.parametrize("seed", range(5))
def test_replaying_the_records_of_every_transition_gives_each_state_back(seed):
    states = transitions(seed, 120)
    base = states[0]
    records = []
    for before, after in zip(states, states[1:], strict=False):
        data = encode_record(before, after)
        if data is None:  # too big for a record: a new base
            base, records = after, []
            continue
        records.append((record_name(after.generation), data))
        assert replay(base, records) == after


def test_a_change_too_big_for_a_record_asks_for_a_new_base(monkeypatch):
    monkeypatch.setattr(journal, "MAX_RECORD_ENTRIES", 3)
    state = IndexState()
    for step in range(10):
        state = state.with_entry(entry(step, 0.1), ACC)
    moved = state.with_entry(entry(0, 0.2), ACC)  # the oldest, re-saved: 1 drop, 1 add
    assert encode_record(state, moved) is not None
    relisted = IndexState(entries=(moved.entries[-1],) + moved.entries[:-1])  # 10 moves
    assert encode_record(moved, relisted) is None


def test_record_names_sort_by_generation_and_nothing_else_parses_as_one():
    names = [record_name(g) for g in (1, 9, 10, 123456789)]
    assert sorted(names) == names
    assert [record_generation(n) for n in names] == [1, 9, 10, 123456789]
    for other in ("step_1.pt", journal.JOURNAL_PREFIX + "12", journal.JOURNAL_PREFIX + "x" * 20,
                  journal.JOURNAL_PREFIX + "\u0661" * 20):
        assert record_generation(other) is None


def _records(count: int) -> tuple[IndexState, list[tuple[str, bytes]], IndexState]:
    states = transitions(1, count)
    records = []
    for before, after in zip(states, states[1:], strict=False):
        data = encode_record(before, after)
        assert data is not None
        records.append((record_name(after.generation), data))
    return states[0], records, states[-1]


def _edit(data: bytes, **changes: object) -> bytes:
    doc = json.loads(data)
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda r: r[:1] + r[2:], "generation 3 follows 1"),
        (lambda r: [(r[0][0], _edit(r[0][1], drop=["nowhere.pt"]))] + r[1:], "not listed"),
        (lambda r: [(r[0][0], _edit(r[0][1], latest="x.pt"))] + r[1:], "'latest'"),
        (lambda r: [(r[0][0], _edit(r[0][1], format="x"))] + r[1:], "not an asyncckpt journal"),
        (lambda r: [(r[0][0], r[0][1][:-5])] + r[1:], "not a JSON document"),
        (lambda r: [(r[0][0], b"[" * 100_000)] + r[1:], "nested too deeply"),
        (lambda r: [(r[0][0], _edit(r[0][1], generation=2**64))] + r[1:], "generation"),
        (lambda r: r + [(r[-1][0], r[-1][1])], "follows"),
    ],
)
def test_damaged_records_are_corrupt_index_errors_naming_the_record(damage, match):
    base, records, _ = _records(6)
    damaged = damage(records)
    with pytest.raises(CorruptIndexError, match=match) as info:
        replay(base, damaged)
    assert journal.JOURNAL_PREFIX in str(info.value)


def test_a_record_that_adds_a_listed_name_is_refused():
    state = IndexState().with_entry(entry(1, 0.5), ACC).with_generation(1)
    after = state.with_entry(entry(2, 0.6), ACC).with_generation(2)
    data = encode_record(state, after)
    assert data is not None
    doubled = _edit(data, add=json.loads(data)["add"] * 2)
    with pytest.raises(CorruptIndexError, match="which is listed"):
        replay(state, [(record_name(2), doubled)])
