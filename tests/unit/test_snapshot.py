"""Snapshot + serialize stages: what gets copied, how it is written, what is rejected."""

from __future__ import annotations

import collections
import io

import numpy as np
import pytest
import torch
from support.helpers import tensors_equal
from support.states import (
    mixed_state,
    serialized,
    snapshot_of,
    torch_save_bytes,
    trained_model_and_optimizer,
)

from asyncckpt._format.serialize import serialize
from asyncckpt._snapshot.plan import plan_snapshot
from asyncckpt._snapshot.pool import BufferPool
from asyncckpt._snapshot.snapshot import take_snapshot


class TestByteIdentical:
    def test_same_bytes_as_torch_save_without_crc(self):
        model, optim, sched = trained_model_and_optimizer()
        mixed = mixed_state()
        state = {"model": model, "optim": optim, "sched": sched, **mixed}
        expected = {"model": model.state_dict(), "optim": optim.state_dict(),
                    "sched": sched.state_dict(), **mixed}
        assert serialized(state) == torch_save_bytes(expected, crc32=False)

    def test_same_bytes_as_default_torch_save_with_crc(self):
        state = mixed_state()
        assert serialized(state, torch_crc32=True) == torch_save_bytes(state, crc32=True)

    def test_plain_torch_load_weights_only_reads_it(self):
        state = mixed_state()
        loaded = torch.load(io.BytesIO(serialized(state)), weights_only=True)
        assert tensors_equal(loaded, state)

    def test_storage_sharing_is_preserved(self):
        loaded = torch.load(io.BytesIO(serialized(mixed_state())), weights_only=True)
        ptr = loaded["whole"].untyped_storage().data_ptr()
        assert loaded["view_a"].untyped_storage().data_ptr() == ptr
        assert loaded["view_b"].untyped_storage().data_ptr() == ptr
        assert loaded["view_b"].stride() == (1, 8)
        loaded["whole"][5] = -1.0
        assert loaded["view_a"][1] == -1.0

    def test_large_tensors_are_handed_over_without_copy(self):
        big = torch.randn(1 << 18)  # 1 MiB: above the zero-copy threshold
        snap = snapshot_of({"big": big})
        chunks: list = []
        serialize(snap, chunks.append)
        arena_start, arena_len = snap.ranges[0]
        views = [c for c in chunks if isinstance(c, memoryview)]
        assert len(views) == 1 and views[0].nbytes == big.numel() * 4


class TestSnapshotIsolation:
    def test_snapshot_does_not_share_memory_with_the_source(self):
        model, optim, _ = trained_model_and_optimizer()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        snap = snapshot_of({"model": model, "optim": optim})
        with torch.no_grad():
            for t in model.state_dict().values():
                t.add_(1) if t.is_floating_point() else t.add_(7)
        for k, v in snap.tree["model"].items():
            assert torch.equal(v, before[k]), k

    def test_parameters_and_requires_grad_are_kept(self):
        p = torch.nn.Parameter(torch.randn(3))
        leaf = torch.randn(2, requires_grad=True)
        snap = snapshot_of({"p": p, "leaf": leaf})
        assert type(snap.tree["p"]) is torch.nn.Parameter and snap.tree["p"].requires_grad
        assert snap.tree["leaf"].requires_grad and snap.tree["leaf"].is_leaf

    def test_module_state_dict_metadata_is_kept(self):
        model, _, _ = trained_model_and_optimizer()
        snap = snapshot_of({"model": model})
        assert isinstance(snap.tree["model"], collections.OrderedDict)
        assert snap.tree["model"]._metadata == model.state_dict()._metadata

    def test_same_object_twice_stays_one_object(self):
        t = torch.ones(3)
        shared = {"x": t}
        snap = snapshot_of({"a": shared, "b": shared, "t1": t, "t2": t})
        assert snap.tree["a"] is snap.tree["b"]
        assert snap.tree["t1"] is snap.tree["t2"]

    def test_numpy_arrays_become_tensors_and_are_recorded(self):
        arr = np.arange(6, dtype=np.float64).reshape(2, 3)
        snap = snapshot_of({"a": arr, "n": [np.float32(1.5)], "t": arr.T, "ro": np.ones(2)})
        assert isinstance(snap.tree["a"], torch.Tensor)
        assert snap.tree["n"][0] == 1.5 and type(snap.tree["n"][0]) is float
        assert torch.equal(snap.tree["t"], torch.from_numpy(arr.T.copy()))
        assert ("a",) in snap.numpy_paths and ("t",) in snap.numpy_paths
        arr[0, 0] = 99
        assert snap.tree["a"][0, 0] == 0

    # torch >= 2.14 warns that a weights_only load validates each sparse tensor (its own check)
    @pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants:UserWarning")
    def test_odd_tensors_fall_back_to_a_clone(self):
        sparse = torch.randn(4, 4).to_sparse()
        conj = torch.randn(3, dtype=torch.complex64).conj()
        snap = snapshot_of({"sparse": sparse, "conj": conj})
        loaded = torch.load(io.BytesIO(_bytes(snap)), weights_only=True)
        assert torch.equal(loaded["sparse"].to_dense(), sparse.to_dense())
        assert torch.equal(loaded["conj"], conj)

    def test_pool_arenas_are_reused(self):
        pool = BufferPool(1, pin_memory=False)
        state = {"w": torch.randn(1000)}
        for _ in range(5):
            plan = plan_snapshot(state)
            snap = take_snapshot(plan, pool.acquire(plan.nbytes))
            pool.release(snap.arena)
        assert pool.allocations == 1

    def test_drop_oversized_frees_only_arenas_over_one_and_a_half_times_the_need(self):
        pool = BufferPool(3, pin_memory=False)
        big, mid, small = (pool.acquire(n << 20) for n in (16, 5, 3))
        for arena in (big, mid, small):
            pool.release(arena)
        # 3 MiB needs a 4 MiB arena: 16 MiB (17 with slack) goes, 5 MiB (6) stays
        assert pool.drop_oversized(3 << 20) == big.capacity
        assert sorted(a.capacity for a in pool._free) == sorted([mid.capacity, small.capacity])
        assert pool.drop_oversized(3 << 20) == 0
        assert pool.acquire(5 << 20) is mid  # what is left is still reused


def _bytes(snap) -> bytes:
    chunks: list = []
    serialize(snap, chunks.append)
    return b"".join(bytes(c) for c in chunks)


class _Custom:
    pass


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize(
    ("state", "path", "what"),
    [
        ({"optim": {"param_groups": [{"lr": 0.1, "fn": lambda x: x}]}},
         "state['optim']['param_groups'][0]['fn']", "function"),
        ({"a": [1, _Custom()]}, "state['a'][1]", "_Custom"),
        ({"a": collections.defaultdict(int)}, "state['a']", "defaultdict"),
        ({"a": torch.ones(2).as_subclass(_Sub)}, "state['a']", "subclass"),
        ({"a": {object(): 1}}, "state['a']", "dict key"),
        ({"a": np.array(["x"])}, "state['a']", "dtype"),
        ({"a": {1, 2}}, "state['a']", "set"),
    ],
)
def test_unsupported_objects_raise_type_error_naming_the_path(state, path, what):
    with pytest.raises(TypeError) as info:
        plan_snapshot(state)
    assert path in str(info.value)
    assert what in str(info.value)


def test_state_dict_objects_name_their_path():
    class Holder:
        def state_dict(self):
            return {"bad": _Custom()}

    with pytest.raises(TypeError, match=r"state\['h'\]\.state_dict\(\)\['bad'\]"):
        plan_snapshot({"h": Holder()})


def test_cycles_are_rejected():
    a: dict = {"x": 1}
    a["self"] = a
    with pytest.raises(TypeError, match=r"state\['self'\] refers back to state"):
        plan_snapshot(a)


def test_views_with_different_dtypes_are_rejected_up_front():
    base = torch.zeros(4)
    with pytest.raises(TypeError, match="different dtypes"):
        plan_snapshot({"f": base, "i": base.view(torch.int32)})


def test_deep_nesting_is_a_type_error():
    deep: list = []
    node = deep
    for _ in range(5000):
        node.append([])
        node = node[0]
    with pytest.raises(TypeError, match="nested too deeply"):
        plan_snapshot(deep)


BROKEN_STREAM = """
import gc, torch
from asyncckpt._snapshot.pool import BufferPool
from asyncckpt._snapshot.plan import plan_snapshot
from asyncckpt._snapshot.snapshot import take_snapshot
from asyncckpt._format.serialize import serialize
state = {"a": torch.randn(100_000), "b": torch.randn(100_000)}
plan = plan_snapshot(state)
snap = take_snapshot(plan, BufferPool(1, pin_memory=False).acquire(plan.nbytes))
calls = []
def emit(chunk):
    calls.append(chunk)
    if len(calls) == 2:
        raise BrokenPipeError("the storage went away")
try:
    serialize(snap, emit)
except BrokenPipeError:
    print("raised")
gc.collect()
print("survived")
"""


def test_a_stream_that_breaks_mid_write_does_not_abort_the_process():
    """Regression: an unfinished torch zip writer used to std::terminate the process on GC."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", BROKEN_STREAM], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["raised", "survived"]


def test_a_shared_copy_never_waits_for_a_helper_that_has_not_started():
    """The caller copies every piece itself when the helper thread is busy elsewhere."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from asyncckpt._snapshot.copy import SharedCopy

    src = torch.arange(48 << 20, dtype=torch.uint8)  # 48 MiB: worth sharing
    dst = torch.zeros_like(src)
    pieces = [(dst.data_ptr() + off, src.data_ptr() + off, min(8 << 20, src.numel() - off))
              for off in range(0, src.numel(), 8 << 20)]
    release = threading.Event()
    with ThreadPoolExecutor(1) as helper:
        helper.submit(release.wait)  # the helper's only thread is busy
        SharedCopy(pieces).run(helper)  # returns without it
        assert torch.equal(dst, src)
        release.set()
    dst.zero_()
    with ThreadPoolExecutor(1) as helper:  # and with an idle helper both threads copy
        SharedCopy(pieces).run(helper)
    assert torch.equal(dst, src)


def _instrumented_copy(monkeypatch, on_caller_piece):
    """A SharedCopy of ten 8 MiB pieces whose helper thread, once it holds a piece, copies it
    only after ``go`` is set; ``on_caller_piece(helper_in, go, memmove, *piece)`` stands for the
    caller's memmove. Returns the copy and the lists of pieces the helper started / finished."""
    import ctypes
    import threading

    import asyncckpt._snapshot.copy as snapshot_module
    from asyncckpt._snapshot.copy import SharedCopy

    src = torch.arange(80 << 20, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    pieces = [(dst.data_ptr() + off, src.data_ptr() + off, 8 << 20)
              for off in range(0, src.numel(), 8 << 20)]
    caller = threading.get_ident()
    helper_in, go = threading.Event(), threading.Event()
    started: list[int] = []
    finished: list[int] = []
    real_memmove = ctypes.memmove

    class _Ctypes:
        @staticmethod
        def memmove(dst_ptr: int, src_ptr: int, n: int) -> None:
            if threading.get_ident() == caller:
                on_caller_piece(helper_in, go, real_memmove, dst_ptr, src_ptr, n)
                return
            started.append(dst_ptr)
            helper_in.set()
            assert go.wait(30)
            real_memmove(dst_ptr, src_ptr, n)
            finished.append(dst_ptr)

    monkeypatch.setattr(snapshot_module, "ctypes", _Ctypes)
    return SharedCopy(pieces), (src, dst), started, finished


def test_a_shared_copy_returns_only_after_the_helpers_last_piece(monkeypatch):
    """Regression: the caller's own claims cleared the helper's busy flag, so run() could
    return (and an eager save() let training go on) while the helper was still copying."""
    from concurrent.futures import ThreadPoolExecutor

    done = []

    def caller_piece(helper_in, go, memmove, *piece):
        assert helper_in.wait(30)  # the helper holds its first piece while the caller copies
        memmove(*piece)  # the other nine; only then does the helper's copy go on
        done.append(piece)
        if len(done) == 9:
            go.set()

    copy, (src, dst), started, finished = _instrumented_copy(monkeypatch, caller_piece)
    with ThreadPoolExecutor(1) as helper:
        copy.run(helper)
        at_return = (list(started), list(finished))
    assert at_return[0] and at_return[0] == at_return[1]
    assert torch.equal(dst, src)


def test_an_interrupted_shared_copy_leaves_no_helper_writing(monkeypatch):
    """Ctrl-C during a shared copy: when run() raises, the helper is not in the middle of a
    piece and takes no more (the caller hands the destination buffer back for reuse at once)."""
    from concurrent.futures import ThreadPoolExecutor

    def caller_piece(helper_in, go, memmove, *piece):
        assert helper_in.wait(30)  # the helper holds a piece ...
        go.set()
        raise KeyboardInterrupt  # ... when the caller is interrupted

    copy, _, started, finished = _instrumented_copy(monkeypatch, caller_piece)
    with ThreadPoolExecutor(1) as helper:
        with pytest.raises(KeyboardInterrupt):
            copy.run(helper)
        at_raise = (list(started), list(finished))
    assert at_raise[0] and at_raise[0] == at_raise[1]  # no piece half-copied when run() raised
    assert started == at_raise[0]  # and no piece started afterwards
    assert copy._next < len(copy._pieces)


def test_a_shared_copy_interrupted_while_starting_its_helper_stops_it():
    """Ctrl-C inside executor.submit(), after the helper's work was queued: the helper must
    not go on copying into the buffer the caller gives back."""
    from concurrent.futures import ThreadPoolExecutor

    from asyncckpt._snapshot.copy import SharedCopy

    src = torch.arange(64 << 20, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    pieces = [(dst.data_ptr() + off, src.data_ptr() + off, 8 << 20)
              for off in range(0, src.numel(), 8 << 20)]
    pool = ThreadPoolExecutor(1)

    class _InterruptedSubmit:
        def submit(self, fn):
            pool.submit(fn)
            raise KeyboardInterrupt

    copy = SharedCopy(pieces)
    with pytest.raises(KeyboardInterrupt):
        copy.run(_InterruptedSubmit())  # type: ignore[arg-type]
    claimed_when_raised = copy._next
    pool.shutdown(wait=True)  # the helper ran, late
    assert copy._next == claimed_when_raised < len(pieces)  # and found the work closed


def test_a_pipelined_snapshot_interrupted_after_queueing_its_copy_cancels_it():
    """Ctrl-C after the deferred copy was set up but before take_snapshot() returned: the copy
    is cancelled (and waited for) before the arena goes back, instead of being lost."""
    from asyncckpt._snapshot.pending import CopyMonitor

    model = torch.nn.Linear(64, 64)
    optim = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optim.step()
    plan = plan_snapshot({"model": model, "optim": optim})

    class _Interrupted:
        def set_(self, *args):
            raise KeyboardInterrupt

    plan.placeholders[-1] = _Interrupted()  # type: ignore[call-overload]
    events: list[str] = []
    monitor = CopyMonitor(probe=lambda event, index: events.append(event))
    pool = BufferPool(1, pin_memory=False)
    with pytest.raises(KeyboardInterrupt):
        take_snapshot(plan, pool.acquire(plan.nbytes), pipelined=True, monitor=monitor)
    assert events == ["cancel"]  # stopped before any chunk was copied into the arena
