"""The index document: round trip and strict validation of what is read back."""

from __future__ import annotations

import json
import math

import pytest

from asyncckpt import CorruptIndexError
from asyncckpt._format.best import BestMetric
from asyncckpt._format.index import IndexEntry, IndexState

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


def one_entry(**fields) -> bytes:
    """A document listing one entry, with ``fields`` of that entry replaced."""
    raw = {"name": "a.pt", "step": 1, "epoch": None, "time": 1, "size": 1, "checksum": "x:1",
           "metrics": {}}
    raw.update(fields)
    return doc(entries=[raw], latest=raw["name"], best={})


def with_literal(data: bytes, field: str, literal: str) -> bytes:
    """``data`` with the JSON value of ``"field": 0`` spelled as ``literal`` (a raw token)."""
    needle = f'"{field}": 0'.encode()
    assert data.count(needle) == 1
    return data.replace(needle, f'"{field}": {literal}'.encode())


HOSTILE_DOCUMENTS = [
    # the parser itself: nesting and numbers Python cannot take faithfully
    pytest.param(b"[" * 200_000 + b"]" * 200_000, "nested too deeply", id="deep-nesting"),
    pytest.param(with_literal(doc(generation=0), "generation", "9" * 5000), "5000 digits",
                 id="5000-digit-int"),
    pytest.param(with_literal(one_entry(time=0), "time", "NaN"), "NaN", id="time-NaN-token"),
    pytest.param(with_literal(one_entry(time=0), "time", "1e400"), "out of range",
                 id="time-1e400"),
    pytest.param(with_literal(one_entry(size=0), "size", "-Infinity"), "Infinity",
                 id="size-infinity-token"),
    # fields: finite where they must be, bounded
    pytest.param(one_entry(time="NaN"), r"entries\[0\]\.time: expected a finite number",
                 id="time-NaN"),
    pytest.param(with_literal(one_entry(time=0), "time", "1" + "0" * 400),
                 r"entries\[0\]\.time: a 1329-bit integer is out of range", id="time-400-digits"),
    pytest.param(one_entry(time=1e300), r"entries\[0\]\.time: .* not a plausible time",
                 id="time-1e300"),
    pytest.param(with_literal(one_entry(metrics={"acc": 0}), "acc", "1" + "0" * 400),
                 r"metrics\['acc'\]: a 1329-bit integer is out of range", id="metric-10**400"),
    pytest.param(one_entry(step=2**63), r"entries\[0\]\.step: expected an int from 0",
                 id="step-2**63"),
    pytest.param(one_entry(size=10**30), r"entries\[0\]\.size", id="size-10**30"),
    pytest.param(doc(generation=-1), "'generation'", id="negative-generation"),
    pytest.param(doc(rotation={"window_origin": "NaN"}), "window_origin", id="origin-NaN"),
    pytest.param(doc(rotation={"series_origins": {"s": "Infinity"}}), "series_origins",
                 id="series-origin-inf"),
    pytest.param(doc(best={"acc": {"mode": "greater", "value": "NaN", "name": "step_2.pt",
                                   "step": 2}}), "NaN cannot be a best value", id="best-NaN"),
    # names, metric keys and series: characters that cannot be stored or printed safely
    pytest.param(one_entry(name="\ud800.pt"), "lone surrogate", id="name-surrogate"),
    pytest.param(one_entry(name="evil\u202egp.pt"), "bidirectional", id="name-bidi-override"),
    pytest.param(one_entry(name="a\u2066b.pt"), "bidirectional", id="name-bidi-isolate"),
    pytest.param(one_entry(name="a\u2028b.pt"), "line separator", id="name-line-separator"),
    pytest.param(one_entry(metrics={"acc\x1b]0;pwned\x07": 1}), "control character",
                 id="metric-key-escape-sequence"),
    pytest.param(one_entry(metrics={"\ud800": 1}), "lone surrogate", id="metric-key-surrogate"),
    pytest.param(one_entry(metrics={"a\u202ec": 1}), "bidirectional", id="metric-key-bidi"),
    pytest.param(one_entry(series="x\u202e"), "bidirectional", id="series-bidi"),
    pytest.param(doc(rotation={"pending_deletes": ["\ud800"]}), "lone surrogate",
                 id="pending-surrogate"),
    pytest.param(doc(best={"a\u202e": {"mode": "greater", "value": 1, "name": "step_2.pt",
                                       "step": 2}}), "bidirectional", id="best-key-bidi"),
]


@pytest.mark.parametrize(("data", "match"), HOSTILE_DOCUMENTS)
def test_hostile_documents_are_corrupt_index_errors_naming_the_file(data, match):
    with pytest.raises(CorruptIndexError, match=match) as info:
        IndexState.from_json(data, "idx.json")
    assert "idx.json" in str(info.value)


def test_numbers_read_back_as_floats_and_ints_in_range():
    state = IndexState.from_json(one_entry(metrics={"acc": 3}, time=5, step=2**63 - 1), "x")
    (e,) = state.entries
    assert e.metrics == {"acc": 3.0} and type(e.metrics["acc"]) is float
    assert e.time == 5.0 and e.step == 2**63 - 1


def test_a_long_index_is_encoded_one_entry_per_line():
    state = IndexState()
    for step in range(3):
        state = state.with_entry(entry(step, 0.1 * step), ACC)
    lines = state.to_json().decode().splitlines()
    assert sum(line.startswith('  {"name": "step_') for line in lines) == 3
    assert IndexState.from_json(state.to_json(), "x") == state
