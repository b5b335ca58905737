"""Plan reuse: a state whose structure repeats is replayed; any structural change re-plans.

Every test saves through a real Snapshotter and serializer and reads the bytes back with plain
``torch.load(weights_only=True)``: a replayed plan must give exactly what a fresh one gives.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from support.helpers import tensors_equal
from support.states import torch_save_bytes

from asyncckpt import Checkpointer
from asyncckpt._format.serialize import serialize
from asyncckpt._snapshot.plan import plan_snapshot
from asyncckpt._snapshot.pool import BufferPool
from asyncckpt._snapshot.replay import replay_plan
from asyncckpt._snapshot.snapshot import Snapshot, Snapshotter


def _bytes(snapshot: Snapshot) -> bytes:
    chunks: list = []
    serialize(snapshot, chunks.append)
    return b"".join(bytes(c) for c in chunks)


class Saver:
    """A Snapshotter with a pool of ``arenas``; ``save`` returns the file's bytes."""

    def __init__(self, arenas: int = 1, mode: str = "eager") -> None:
        self.snapshots = Snapshotter(BufferPool(arenas, pin_memory=False))
        self.snapshots.open()
        self.mode = mode

    def take(self, state: object) -> Snapshot:
        snap = self.snapshots.take(state, self.mode)  # type: ignore[arg-type]
        if snap.pending is not None:
            self.snapshots.start(snap)
            snap.pending.wait_stopped()
            assert snap.pending.error is None
        return snap

    def save(self, state: object) -> bytes:
        snap = self.take(state)
        data = _bytes(snap)
        self.snapshots.release(snap)
        return data

    def close(self) -> None:
        import anyio

        anyio.run(self.snapshots.close)


@pytest.fixture
def saver():
    s = Saver()
    yield s
    s.close()


def _load(data: bytes) -> object:
    return torch.load(io.BytesIO(data), weights_only=True)


def _trained(groups: int = 1) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    params = list(model.parameters())
    optim = torch.optim.Adam(params if groups == 1 else params[:2], lr=0.01)
    _step(model, optim)
    return model, optim


def _step(model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
    optim.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    optim.step()


def _expected(state: dict[str, object]) -> bytes:
    plain = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
    return torch_save_bytes(plain, crc32=False)


def test_a_repeated_structure_is_replayed_and_holds_each_saves_values(saver):
    model, optim = _trained()
    state = {"model": model, "optim": optim, "epoch": 0, "rng": torch.get_rng_state()}
    for epoch in range(4):
        state["epoch"] = epoch
        state["rng"] = torch.get_rng_state()  # a new tensor (new storage) every save
        assert saver.save(state) == _expected(state)  # byte for byte what torch.save writes
        _step(model, optim)
    assert saver.snapshots.replays == 3  # the first save planned, the others replayed


def test_replayed_placeholders_are_reused_per_arena():
    saver = Saver(arenas=2)
    try:
        model, optim = _trained()
        state = {"model": model, "optim": optim}
        first = saver.take(state)  # arena A, planned
        second = saver.take(state)  # arena B, replayed, new placeholders
        w1, w2 = first.tree["model"]["0.weight"], second.tree["model"]["0.weight"]
        assert w1 is not w2 and w1.data_ptr() != w2.data_ptr()
        with torch.no_grad():
            model[0].weight.add_(1.0)
        saver.snapshots.release(first)
        third = saver.take(state)  # arena A again: its placeholders, the new values
        assert third.tree["model"]["0.weight"] is w1
        assert torch.equal(_load(_bytes(third))["model"]["0.weight"], model[0].weight)
        assert not torch.equal(second.tree["model"]["0.weight"], model[0].weight)  # untouched
        saver.snapshots.release(second)
        saver.snapshots.release(third)
        assert saver.snapshots.replays == 2
    finally:
        saver.close()


def _resize(model, optim):
    model[2].bias.data = torch.zeros(5)  # a tensor resized (a new, larger storage)


def _new_state_entry(model, optim):
    optim.state[model[2].bias]["extra"] = torch.ones(3)  # a new optimizer state entry


def _share(model, optim):
    model[2].bias.data = model[0].bias.data[:2]  # a storage now shared with another tensor


def _dtype(model, optim):
    model.double()


def _view(model, optim):
    model[0].bias.data = torch.zeros(10)[2:]  # same shape, viewing another offset


def _frozen(model, optim):
    model[2].weight.requires_grad_(False)


def _extra_param(model, optim):
    model.register_parameter("extra", torch.nn.Parameter(torch.ones(2)))


@pytest.mark.parametrize("change", [_resize, _new_state_entry, _share, _dtype, _view, _frozen,
                                    _extra_param])
def test_a_structural_change_is_planned_afresh(saver, change):
    model, optim = _trained()
    # the live head weight (a Parameter) too: it shares its storage with the model's copy
    state = {"model": model, "optim": optim, "head": model[2].weight}
    assert saver.save(state) == _expected(state)
    assert saver.save(state) == _expected(state)
    change(model, optim)
    assert saver.save(state) == _expected(state)
    assert saver.snapshots.replays == 1  # only the second save
    assert saver.save(state) == _expected(state)
    assert saver.snapshots.replays == 2  # the new structure is replayed from then on


def test_a_shared_storage_split_apart_is_planned_afresh(saver):
    base = torch.arange(8.0)
    state = {"a": base[:4], "b": base[4:]}
    assert saver.save(state) == _expected(state)
    state["b"] = torch.arange(8.0)[4:]  # same key, shape, offset: in a storage of its own
    assert saver.save(state) == _expected(state)
    assert saver.snapshots.replays == 0
    loaded = _load(saver.save(state))
    assert loaded["a"].untyped_storage().data_ptr() != loaded["b"].untyped_storage().data_ptr()


def test_a_new_param_group_is_guarded_by_a_replayed_pipelined_snapshot():
    """add_param_group does not change the tensors in the state (its params are the model's),
    so the plan replays; what the optimizer now updates must still be guarded."""
    saver = Saver(mode="pipelined")
    try:
        model, optim = _trained(groups=2)  # the optimizer updates the first layer only
        state = {"model": model, "optim": optim}
        snap = saver.take(state)
        # 2 params, and Adam's exp_avg, exp_avg_sq and step for each
        assert len(snap.pending.groups[0].cpu_items) == 2 + 2 * 3
        saver.snapshots.release(snap)
        optim.add_param_group({"params": list(model[2].parameters()), "lr": 0.5})
        snap = saver.take(state)
        assert saver.snapshots.replays == 1
        assert len(snap.pending.groups[0].cpu_items) == 4 + 2 * 3  # the new group's params too
        assert _load(_bytes(snap))["optim"]["param_groups"][1]["lr"] == 0.5
        saver.snapshots.release(snap)
    finally:
        saver.close()


def test_renamed_keys_and_new_scalars_come_from_the_state_not_the_plan(saver):
    state = {"w": torch.ones(3), "meta": {"lr": 0.1, "name": "a"}}
    saver.save(state)
    state = {"w2": state["w"], "meta": {"lr": 0.2, "name": "b", "more": [1, 2]}}
    loaded = _load(saver.save(state))
    assert saver.snapshots.replays == 1
    assert loaded.keys() == {"w2", "meta"} and loaded["meta"] == state["meta"]


def test_numpy_arrays_and_cloned_tensors_are_never_replayed(saver):
    state = {"a": np.arange(4.0), "s": torch.ones(3, dtype=torch.complex64).conj()}
    for _ in range(3):
        loaded = _load(saver.save(state))
        assert tensors_equal(loaded["s"], state["s"])
    assert saver.snapshots.replays == 0


def test_replay_reports_a_mismatch_rather_than_raising():
    plan = plan_snapshot({"w": torch.ones(3)})
    assert plan.layout is not None
    assert replay_plan({"w": torch.ones(4)}, plan.layout) is None
    assert replay_plan({"w": torch.ones(3), "v": torch.ones(3)}, plan.layout) is None
    assert replay_plan({}, plan.layout) is None
    with pytest.raises(TypeError, match=r"state\['f'\]"):  # validation still applies
        replay_plan({"w": torch.ones(3), "f": len}, plan.layout)


def test_a_checkpointer_replays_and_every_checkpoint_holds_its_own_values(tmp_path):
    import asyncckpt

    model, optim = _trained()
    with Checkpointer(tmp_path, queue_size=2, keep_last=10) as ckpt:
        expected = {}
        for step in range(6):
            ckpt.save({"model": model, "optim": optim}, step=step)  # several arenas in flight
            expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
            _step(model, optim)
        ckpt.flush()
        assert ckpt._engine.snapshots.replays == 5
    for step, weights in expected.items():
        assert tensors_equal(asyncckpt.load(tmp_path, step)["model"], weights)


def test_sharing_moved_to_another_storage_is_planned_afresh(saver):
    """Same tensors, same number of storages, but ``c`` now shares ``b``'s storage, not
    ``a``'s: replaying would give ``c`` the bytes of ``a``."""
    s0, s1 = torch.arange(8.0), torch.arange(8.0) + 100
    state = {"a": s0[:4], "b": s1[:4], "c": s0[4:]}
    assert saver.save(state) == _expected(state)
    state = {"a": s0[:4], "b": s1[:4], "c": s1[4:]}
    assert saver.save(state) == _expected(state)
    assert torch.equal(_load(saver.save(state))["c"], s1[4:])
    assert saver.snapshots.replays == 1  # only the last save


def test_a_view_of_a_larger_storage_is_planned_afresh(saver):
    state = {"a": torch.arange(10.0)[:4]}
    assert saver.save(state) == _expected(state)
    state = {"a": torch.arange(20.0)[:4]}  # same key, shape, offset and stride
    assert saver.save(state) == _expected(state)  # the whole storage, as torch.save writes
    assert saver.snapshots.replays == 0


def test_empty_and_small_and_large_storages_mixed(saver):
    """Empty storages (not slices of the arena), small ones (copied in one loop) and large
    ones (copied in shared pieces), first planned then replayed."""
    state = {"empty": torch.empty(0), "small": torch.arange(5.0),
             "large": torch.arange(40_000.0), "tail": torch.ones(3, dtype=torch.int64)}
    for _ in range(2):
        for t in state.values():
            t.add_(1)
        assert saver.save(state) == _expected(state)
    assert saver.snapshots.replays == 1
