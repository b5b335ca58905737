"""The index document: round trip and strict validation of what is read back."""

from __future__ import annotations

import json
import math

import pytest

from asyncckpt import CorruptIndexError
from asyncckpt._config import BestMetric
from asyncckpt._index import IndexEntry, IndexState

ACC = (BestMetric("acc", "greater"),)


def entry(step: int, acc: float | None = None, **kw) -> IndexEntry:
    metrics = {} if acc is None else {"acc": acc}
    name = f"step_{step}.pt"
    return IndexEntry(name, step, None, 1000.0 + step, 10, "xxh3_128:00", metrics, **kw)


def doc(**changes) -> bytes:
    state = IndexState().with_entry(entry(1, 0.5), ACC).with_entry(entry(2, 0.7), ACC)
    raw = json.loads(state.to_json())
    raw.update(changes)
    return json.dumps(raw).encode()


def test_round_trip_keeps_everything():
    state = (
        IndexState()
        .with_entry(entry(1, 0.5, numpy_paths=(("a", 0),)), ACC)
        .with_entry(entry(2, math.nan, keep=True), ACC)
        .with_entry(IndexEntry("e.pt", 3, 7, 1.5, 0, "xxh3_128:ff", {"loss": math.inf}), ACC)
    )
    back = IndexState.from_json(state.to_json(), "test")
    assert back.entries[:1] == state.entries[:1] and back.entries[2] == state.entries[2]
    assert math.isnan(back.entries[1].metrics["acc"]) and back.entries[1].keep
    assert back.best == state.best and back.window_origin == 1001.0
    json.loads(state.to_json())  # strict JSON (no NaN/Infinity tokens)


def test_replacing_an_entry_recomputes_its_best_pointer():
    state = IndexState().with_entry(entry(1, 0.5), ACC).with_entry(entry(2, 0.9), ACC)
    assert state.best["acc"].name == "step_2.pt"
    state = state.with_entry(entry(2, 0.1), ACC)
    assert state.best["acc"].name == "step_1.pt"
    assert [e.name for e in state.entries] == ["step_1.pt", "step_2.pt"]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\xff\xfe", "not a JSON document"),
        (b"[1, 2]", "not an asyncckpt index"),
        (b'{"format": "something else"}', "not an asyncckpt index"),
        (doc(version=99), "version 99 is not supported"),
        (doc(entries={}), "'entries' must be a list"),
        (doc(latest="step_1.pt"), "'latest'"),
        (doc(entries=[{"name": "a.pt"}]), "missing field"),
        (doc(entries=[{"name": "../a.pt", "step": 1, "epoch": None, "time": 1, "size": 1,
                       "checksum": "x:1", "metrics": {}}], latest="../a.pt"), "path separator"),
        (doc(entries=[{"name": "a.pt", "step": -1, "epoch": None, "time": 1, "size": 1,
                       "checksum": "x:1", "metrics": {}}], latest="a.pt"), "step"),
        (doc(entries=[{"name": "a.pt", "step": 1, "epoch": None, "time": 1, "size": 1,
                       "checksum": "nocolon", "metrics": {}}], latest="a.pt"), "checksum"),
        (doc(entries=[{"name": "a.pt", "step": 1, "epoch": None, "time": "soon", "size": 1,
                       "checksum": "x:1", "metrics": {}}], latest="a.pt"), "time"),
        (doc(best={"acc": {"mode": "greater", "value": 1, "name": "gone.pt", "step": 1}}),
         "not listed"),
        (doc(best={"acc": {"mode": "up", "value": 1, "name": "step_1.pt", "step": 1}}), "mode"),
        (doc(rotation={"pending_deletes": ["step_1.pt"]}), "also pending deletion"),
        (doc(rotation={"pending_deletes": "step_0.pt"}), "must be a list"),
        (doc(generation="7"), "generation"),
    ],
)
def test_corrupt_documents_are_rejected_with_a_reason(data, match):
    with pytest.raises(CorruptIndexError, match=match) as info:
        IndexState.from_json(data, "idx.json")
    assert "idx.json" in str(info.value)


def test_duplicate_names_are_rejected():
    raw = json.loads(doc())
    raw["entries"].append(raw["entries"][-1])
    with pytest.raises(CorruptIndexError, match="appears twice"):
        IndexState.from_json(json.dumps(raw).encode(), "idx.json")
