"""Hostile input: odd states round-trip bit-exactly or fail cleanly; odd names and files too."""

from __future__ import annotations

import json
import math
import os
import pickle
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncckpt
from asyncckpt import Checkpointer, CorruptIndexError
from asyncckpt._format.index import IndexState

DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.bfloat16, torch.float32,
    torch.float64, torch.complex64, torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2,
]
V3 = torch.storage._new_dtypes()  # torch cannot load these back when they require grad
FAST = {"storage_options": {"fsync": False}}  # these properties are about bytes, not durability


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Random bit patterns (NaNs, infs, subnormals included) in any dtype, rank 0-10."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 3), min_size=0, max_size=10))
    numel = math.prod(shape)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    high = 2 if dtype == torch.bool else 256
    raw = torch.randint(0, high, (numel * itemsize,), dtype=torch.uint8, generator=g)
    t = raw.view(dtype).reshape(shape)
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.transpose(0, -1)  # non-contiguous
    if (t.is_floating_point() or t.is_complex()) and dtype not in V3 and draw(st.booleans()):
        t.requires_grad_(True)
    return t


@st.composite
def shared_views(draw: st.DrawFn) -> list[torch.Tensor]:
    """A base and views of it that share (and overlap in) its storage."""
    base = draw(tensors()).detach().reshape(-1)
    if base.numel() < 2:
        return [base]
    views = [base]
    for _ in range(draw(st.integers(1, 3))):
        size = draw(st.integers(1, base.numel()))
        stride = draw(st.integers(0, 2))  # 0: every element aliases one
        offset = draw(st.integers(0, base.numel() - 1 - (size - 1) * stride)) if (
            (size - 1) * stride < base.numel()
        ) else 0
        if (size - 1) * stride + offset < base.numel():
            views.append(base.as_strided((size,), (stride,), offset))
    return views


keys = st.one_of(
    st.text(max_size=12), st.integers(-5, 2**40), st.booleans(), st.none(),
    st.tuples(st.integers(0, 3), st.text(max_size=3)), st.binary(min_size=1, max_size=4),
)
leaves = st.one_of(
    tensors(), shared_views(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.text(), st.binary(min_size=1, max_size=16), st.none(), st.booleans(),
    st.sampled_from([torch.float16, torch.int8, torch.device("cpu"), torch.Size([2, 0, 3])]),
)
states = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(keys, inner, max_size=4),
    ),
    max_leaves=12,
)


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    dense = torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())  # fresh standard strides
    return dense.reshape(-1).view(torch.uint8)


def bits_equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or (a.dtype, a.shape, a.stride()) != (
            b.dtype, b.shape, b.stride()
        ) or a.requires_grad != b.requires_grad:
            return False
        return torch.equal(_raw_bytes(a), _raw_bytes(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            bits_equal(a[k], b[k]) for k in a
        )
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(bits_equal, a, b))
    return type(a) is type(b) and a == b


def storages(tree: object, out: list[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        out.append(tree)
    elif isinstance(tree, dict):
        for v in tree.values():
            storages(v, out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            storages(v, out)
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=states)
def test_any_supported_state_round_trips_bit_exactly(state):
    with tempfile.TemporaryDirectory() as folder:
        with Checkpointer(folder, **FAST) as ckpt:
            info = ckpt.save({"s": state}, step=0).wait()
        assert info is not None
        for loaded in (asyncckpt.load(folder), torch.load(info.uri, weights_only=True)):
            assert bits_equal(loaded["s"], state)
            # storage sharing survives: tensors that shared memory still do, and only they
            before, after = storages(state, []), storages(loaded["s"], [])
            for (x, y), (u, v) in zip(
                [(p, q) for p in before for q in before],
                [(p, q) for p in after for q in after], strict=True,
            ):
                same_before = x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
                same_after = u.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
                if x.untyped_storage().nbytes() and y.untyped_storage().nbytes():
                    assert same_before == same_after


class Opaque:
    pass


def _rebuild(tree: object) -> object:
    if isinstance(tree, dict):
        return {k: _rebuild(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_rebuild(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_rebuild(v) for v in tree)
    return tree


unsupported = st.sampled_from(
    [Opaque(), {1, 2}, frozenset(), lambda: 0, print, object(), range(3), bytearray(b"x"),
     1 + 0j and Opaque, type]
)


@settings(max_examples=60, deadline=None)
@given(state=states, bad=unsupported, where=st.integers(0, 5))
def test_unsupported_objects_anywhere_raise_a_type_error_with_a_path(state, bad, where):
    state = _rebuild(state)  # never mutate values hypothesis generated
    holder: dict = {"outer": [state, {"k": state}]}
    node: object = holder
    for _ in range(where):  # walk down a little, then plant the bad object
        if isinstance(node, dict) and node:
            node = next(iter(node.values()))
        elif isinstance(node, list) and node:
            node = node[-1]
    if isinstance(node, dict):
        node["bad"] = bad
    elif isinstance(node, list):
        node.append(bad)
    else:
        holder["bad"] = bad
    with tempfile.TemporaryDirectory() as folder:
        with Checkpointer(folder, **FAST) as ckpt:
            with pytest.raises(TypeError, match=r"^state\[") as info:
                ckpt.save(holder, step=0)
            assert "cannot checkpoint" in str(info.value)
            ckpt.save({"fine": 1}, step=1).wait()  # the writer is unharmed


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (b"", "empty bytes"),
        (torch.zeros(2, dtype=torch.float8_e4m3fn).requires_grad_(), "requires grad"),
        ({b"": 1}, "the dict key b''"),
    ],
)
def test_values_torch_cannot_read_back_are_refused_up_front(tmp_path, value, match):
    """torch.save would write these, but torch.load(weights_only=True) cannot read them."""
    with Checkpointer(tmp_path, **FAST) as ckpt:
        with pytest.raises(TypeError, match=match):
            ckpt.save({"v": value}, step=0)


def test_cycles_through_lists_and_tuples_are_rejected(tmp_path):
    a: list = [1]
    b = {"a": a}
    a.append((b,))
    with Checkpointer(tmp_path, **FAST) as ckpt:
        with pytest.raises(TypeError, match="refers back to"):
            ckpt.save({"root": b}, step=0)


@settings(max_examples=150, deadline=None)
@given(template=st.text(max_size=40), step=st.integers(0, 10**6), epoch=st.integers(0, 999))
def test_hostile_templates_are_rejected_or_stay_inside_the_folder(template, step, epoch):
    with tempfile.TemporaryDirectory() as root:
        folder = os.path.join(root, "ckpt")
        try:
            ckpt = Checkpointer(folder, filename=template + "{step}", **FAST)
        except ValueError:
            return
        with ckpt:
            try:
                info = ckpt.save({"x": 1}, step=step, epoch=epoch).wait()
            except ValueError:
                return
        assert info is not None and os.path.dirname(info.uri) == os.path.abspath(folder)
        assert os.listdir(root) == ["ckpt"]  # nothing was created outside the folder


@settings(max_examples=100, deadline=None)
@given(metric=st.text(min_size=0, max_size=60), value=st.floats())
def test_hostile_metric_names_are_rejected_or_round_trip(metric, value):
    with tempfile.TemporaryDirectory() as folder:
        try:
            ckpt = Checkpointer(folder, best={metric: "greater"}, **FAST)
        except (TypeError, ValueError):
            return
        with ckpt:
            ckpt.save({"x": 1}, step=1, metrics={metric: value}).wait()
        (info,) = asyncckpt.checkpoints(folder)
        stored = info.metrics[metric]
        assert stored == value or (math.isnan(stored) and math.isnan(value))


def _valid_index_document() -> bytes:
    from asyncckpt._format.best import BestMetric
    from asyncckpt._format.index import IndexEntry

    state = IndexState()
    for step in range(3):
        entry = IndexEntry(f"step_{step}.pt", step, 0, 1.0 + step, 10, "xxh3_128:ab", {"acc": step})
        state = state.with_entry(entry, (BestMetric("acc", "greater"),))
    return state.to_json()


VALID_INDEX = _valid_index_document()  # built once: it carries a timestamp


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mangled_index_documents_parse_or_fail_cleanly(data):
    """Bit flips, truncation or rewritten fields: CorruptIndexError, never another exception."""
    raw = bytearray(VALID_INDEX)
    how = data.draw(st.sampled_from(["flip", "truncate", "field"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        doc = json.loads(raw)
        path = data.draw(st.sampled_from(["entries", "best", "rotation", "latest", "generation"]))
        doc[path] = data.draw(st.one_of(st.none(), st.integers(), st.text(max_size=5),
                                        st.lists(st.integers(), max_size=2)))
        raw = bytearray(json.dumps(doc).encode())
    try:
        parsed = IndexState.from_json(bytes(raw), "mangled.json")
    except CorruptIndexError:
        return
    # If it parsed, it is internally consistent.
    names = [e.name for e in parsed.entries]
    assert len(set(names)) == len(names)
    assert {r.name for r in parsed.best.values()} <= set(names)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.filterwarnings("ignore::asyncckpt.UnverifiedCheckpointWarning")  # loose files
def test_loading_is_safe_by_default(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        asyncckpt.load(path)
    benign = tmp_path / "custom.pt"
    torch.save({"x": Opaque()}, benign)
    with pytest.raises(pickle.UnpicklingError):
        asyncckpt.load(benign)
    assert isinstance(asyncckpt.load(benign, weights_only=False)["x"], Opaque)  # explicit opt-in


def _rewrite_index(folder: os.PathLike[str] | str, change) -> None:
    """Apply ``change`` to the parsed index document of ``folder`` and write it back as text
    (``change`` returns the new text, so it can spell raw tokens)."""
    from asyncckpt._format.naming import INDEX_NAME

    path = os.path.join(folder, INDEX_NAME)
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        f.write(change(doc))


def _entry_field(field: str, literal: str):
    def change(doc: dict) -> str:
        doc["entries"][-1][field] = "@@"
        return json.dumps(doc).replace('"@@"', literal)

    return change


@pytest.mark.parametrize("literal", ['"NaN"', "NaN", "1" + "0" * 400])
def test_a_bad_time_in_the_index_stops_the_writer_at_open_not_every_later_save(tmp_path,
                                                                               literal):
    with Checkpointer(tmp_path, keep_every_n_minutes=1, **FAST) as ckpt:
        ckpt.save({"x": 1}, step=1).wait()
    _rewrite_index(tmp_path, _entry_field("time", literal))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(CorruptIndexError, match=r"entries\[0\]\.time|the token NaN"):
        Checkpointer(tmp_path, keep_every_n_minutes=1, **FAST)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, nothing left unlisted


def test_ls_reports_a_huge_metric_as_a_corrupt_index(tmp_path, capsys):
    from asyncckpt._cli import main

    with Checkpointer(tmp_path, **FAST) as ckpt:
        ckpt.save({"x": 1}, step=1, metrics={"acc": 0.5}).wait()

    def change(doc: dict) -> str:
        doc["entries"][0]["metrics"]["acc"] = "@@"
        return json.dumps(doc).replace('"@@"', "1" + "0" * 400)

    _rewrite_index(tmp_path, change)
    assert main(["ls", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "asyncckpt ls:" in err and "metrics['acc']" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("name", "match"),
    [("\ud800.pt", "lone surrogate"), ("evil\u202egp.pt", "bidirectional"),
     ("a\u2069.pt", "bidirectional"), ("a\x1b[2J.pt", "control character")],
)
def test_unsafe_names_are_refused_at_save(tmp_path, name, match):
    with Checkpointer(tmp_path, **FAST) as ckpt:
        with pytest.raises(ValueError, match=match):
            ckpt.save({"x": 1}, step=1, name=name)
        ckpt.save({"x": 1}, step=2).wait()  # the writer is unharmed
    assert [c.step for c in asyncckpt.checkpoints(tmp_path)] == [2]


@pytest.mark.parametrize("key", ["\ud800", "acc\u202e", "a\u2066b", "acc\x1b]0;title\x07"])
def test_unsafe_metric_keys_are_refused_at_save_and_in_best(tmp_path, key):
    with Checkpointer(tmp_path, **FAST) as ckpt:
        with pytest.raises(ValueError, match=r"save\(metrics=...\): metric name"):
            ckpt.save({"x": 1}, step=1, metrics={key: 1.0})
    with pytest.raises(ValueError, match="best: metric name"):
        Checkpointer(tmp_path, best={key: "greater"}, **FAST)


def test_unsafe_series_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="bidirectional"):
        Checkpointer(tmp_path, series="run\u202e1", **FAST)


def test_readers_refuse_an_index_listing_a_lone_surrogate(tmp_path):
    with Checkpointer(tmp_path, **FAST) as ckpt:
        ckpt.save({"x": 1}, step=1).wait()

    def change(doc: dict) -> str:
        doc["entries"][0]["name"] = doc["latest"] = "\ud800.pt"
        return json.dumps(doc)  # ensure_ascii: the surrogate travels as the escape \ud800

    _rewrite_index(tmp_path, change)
    for read in (asyncckpt.load, asyncckpt.checkpoints):
        with pytest.raises(CorruptIndexError, match="lone surrogate"):
            read(tmp_path)
    report = asyncckpt.verify(tmp_path)
    assert not report.ok and [p.kind for p in report.problems] == ["index"]


def test_deeply_nested_index_is_a_corrupt_index_for_every_reader(tmp_path):
    from asyncckpt._format.naming import INDEX_NAME

    with Checkpointer(tmp_path, **FAST) as ckpt:
        ckpt.save({"x": 1}, step=1).wait()
    (tmp_path / INDEX_NAME).write_bytes(b"[" * 200_000 + b"]" * 200_000)
    for read in (asyncckpt.load, asyncckpt.checkpoints):
        with pytest.raises(CorruptIndexError, match="nested too deeply"):
            read(tmp_path)
    with pytest.raises(CorruptIndexError, match="nested too deeply"):
        Checkpointer(tmp_path, **FAST)
