"""The writer through both front doors: save, commit, load, errors, backpressure, close."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import warnings

import anyio
import numpy as np
import pytest
import torch
from support.helpers import folder_files, tensors_equal

import asyncckpt
from asyncckpt import (
    AsyncCheckpointer,
    Checkpointer,
    CheckpointError,
    TransientStorageError,
    WriterClosedError,
    WriterError,
)
from asyncckpt.events import (
    BestUpdated,
    Committed,
    Event,
    Failed,
    Rotated,
    Skipped,
    SnapshotTaken,
    Written,
)
from asyncckpt.storage import LocalStorage


def small_state(value: float = 0.0):
    return {"w": torch.full((4, 4), value), "b": torch.full((4,), value), "step": int(value)}


def read_index(folder) -> dict:
    with open(os.path.join(folder, "asyncckpt-index.json")) as f:
        return json.load(f)


# -- invariant 1: the snapshot is immutable once save() returns -----------------------------------
async def test_async_save_then_mutate_commits_old_values(wrapped, ckpt_dir):
    model = torch.nn.Linear(16, 16)
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 16)).sum().backward()
    optim.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_momentum = [optim.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    wrapped.gate = threading.Event()  # hold the writer until the tensors have been mutated
    async with AsyncCheckpointer(wrapped) as ckpt:
        handle = await ckpt.save({"model": model, "optim": optim}, step=1)
        with torch.no_grad():
            for t in list(model.state_dict().values()) + expected_momentum * 0:
                t.mul_(-3).add_(1)
            for p in model.parameters():
                optim.state[p]["momentum_buffer"].fill_(123.0)
        wrapped.gate.set()
        await handle.committed()
    loaded = asyncckpt.load(ckpt_dir)
    for k, v in expected.items():
        assert torch.equal(loaded["model"][k], v)
    momentum = [s["momentum_buffer"] for s in loaded["optim"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, expected_momentum, strict=True))


def test_sync_save_then_mutate_commits_old_values(wrapped, ckpt_dir):
    t = torch.arange(1000.0)
    wrapped.gate = threading.Event()
    with Checkpointer(wrapped) as ckpt:
        handle = ckpt.save({"t": t, "view": t[10:20]}, step=7)
        t.fill_(-1.0)
        del t  # freeing it is allowed too
        wrapped.gate.set()
        info = handle.wait()
    assert info is not None and info.step == 7
    loaded = asyncckpt.load(ckpt_dir)
    assert torch.equal(loaded["t"], torch.arange(1000.0))
    assert torch.equal(loaded["view"], torch.arange(10.0, 20.0))


# -- round trips ----------------------------------------------------------------------------------
def rich_state():
    torch.manual_seed(1)
    base = torch.randn(6, 8)
    return {
        "view": base[1:3],
        "transposed": base.t(),
        "base": base,
        "bf16": torch.randn(3).bfloat16(),
        "int": torch.arange(5, dtype=torch.int32),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.empty(0),
        "numpy": np.arange(12, dtype=np.int16).reshape(3, 4),
        "nested": {"list": [np.ones(2), 3, "x", None], "tuple": (np.zeros(1), 2.5)},
        "step": 11,
    }


@pytest.mark.parametrize("door", ["async", "sync"])
async def test_round_trip_asyncckpt_load_and_plain_torch_load(ckpt_dir, door):
    state = rich_state()
    if door == "async":
        async with AsyncCheckpointer(ckpt_dir) as ckpt:
            info = await (await ckpt.save(state, step=11)).committed()
    else:
        def run():
            with Checkpointer(ckpt_dir) as ckpt:
                return ckpt.save(state, step=11).wait()
        info = await anyio.to_thread.run_sync(run)
    assert info is not None
    # asyncckpt.load: numpy arrays come back as numpy arrays
    assert tensors_equal(asyncckpt.load(ckpt_dir), state)
    # plain torch.load(weights_only=True): numpy arrays come back as tensors
    plain = torch.load(info.uri, weights_only=True)
    assert isinstance(plain["numpy"], torch.Tensor)
    assert np.array_equal(plain["numpy"].numpy(), state["numpy"])
    assert tensors_equal(plain["transposed"], state["transposed"])
    assert plain["view"].untyped_storage().data_ptr() == plain["base"].untyped_storage().data_ptr()


def test_load_selectors(ckpt_dir):
    with Checkpointer(ckpt_dir, best=["acc", "loss"]) as ckpt:
        for step, acc, loss in [(1, 0.5, 3.0), (2, 0.9, 2.0), (3, 0.7, 1.0)]:
            ckpt.save(small_state(step), step=step, metrics={"acc": acc, "loss": loss})
        ckpt.flush()
        assert ckpt.best("acc").step == 2 and ckpt.best("loss").step == 3
        assert ckpt.latest().step == 3
    assert asyncckpt.load(ckpt_dir)["step"] == 3
    assert asyncckpt.load(ckpt_dir, "best:acc")["step"] == 2
    assert asyncckpt.load(ckpt_dir, "best:loss")["step"] == 3
    assert asyncckpt.load(ckpt_dir, 1)["step"] == 1
    assert asyncckpt.load(ckpt_dir, "step_2.pt")["step"] == 2
    assert asyncckpt.load(ckpt_dir / "step_1.pt")["step"] == 1
    assert [c.step for c in asyncckpt.checkpoints(ckpt_dir)] == [1, 2, 3]
    with pytest.raises(asyncckpt.CheckpointNotFoundError, match="step 9"):
        asyncckpt.load(ckpt_dir, 9)
    with pytest.raises(asyncckpt.CheckpointNotFoundError, match="'f1'"):
        asyncckpt.load(ckpt_dir, "best:f1")
    with pytest.raises(asyncckpt.CheckpointNotFoundError):
        asyncckpt.load(ckpt_dir / "nope")
    with pytest.raises(TypeError, match="which must be"):
        asyncckpt.load(ckpt_dir, 2.5)
    with pytest.raises(ValueError, match="single file"):
        asyncckpt.load(ckpt_dir / "step_1.pt", "best:acc")


def test_load_map_location_and_bitflip_detection(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(small_state(1.0), step=1)
    state = asyncckpt.load(ckpt_dir, map_location="cpu")
    assert state["w"].device.type == "cpu"
    path = ckpt_dir / "step_1.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(asyncckpt.IntegrityError, match="checksum"):
        asyncckpt.load(ckpt_dir)
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(asyncckpt.IntegrityError, match="bytes"):
        asyncckpt.load(ckpt_dir)


def test_load_of_a_plain_torch_save_file(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"x": torch.ones(2)}, path)
    with pytest.warns(asyncckpt.UnverifiedCheckpointWarning, match="not listed"):
        assert torch.equal(asyncckpt.load(path)["x"], torch.ones(2))


def test_load_of_an_unlisted_file_without_verify_does_not_warn(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"x": torch.ones(2)}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(asyncckpt.load(path, verify=False)["x"], torch.ones(2))


async def test_load_works_inside_a_running_event_loop(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        ckpt.save(small_state(2.0), step=2)
    assert asyncckpt.load(ckpt_dir)["step"] == 2  # called from a coroutine


# -- index, pointers, names -----------------------------------------------------------------------
def test_index_and_last_checkpoint_are_written(ckpt_dir):
    with Checkpointer(ckpt_dir, best={"acc": "greater"}) as ckpt:
        ckpt.save(small_state(1), step=10, epoch=1, metrics={"acc": 0.25})
        ckpt.save(small_state(2), step=20, epoch=2, metrics={"acc": 0.75})
    index = read_index(ckpt_dir)
    assert index["latest"] == "step_20.pt"
    assert [e["name"] for e in index["entries"]] == ["step_10.pt", "step_20.pt"]
    assert index["entries"][0]["epoch"] == 1 and index["entries"][1]["metrics"] == {"acc": 0.75}
    assert index["best"]["acc"]["name"] == "step_20.pt"
    assert index["entries"][1]["checksum"].startswith("xxh3_128:")
    assert (ckpt_dir / "last_checkpoint").read_text() == str(ckpt_dir / "step_20.pt")
    assert folder_files(ckpt_dir) == {"step_10.pt", "step_20.pt"}


def test_wait_returns_once_index_and_pointer_name_the_checkpoint(ckpt_dir):
    with Checkpointer(ckpt_dir) as ckpt:
        for step in (1, 2, 3):
            info = ckpt.save(small_state(step), step=step).wait()
            assert read_index(ckpt_dir)["latest"] == info.name
            assert (ckpt_dir / "last_checkpoint").read_text() == info.uri


def test_last_checkpoint_can_be_turned_off(ckpt_dir):
    with Checkpointer(ckpt_dir, last_checkpoint=False) as ckpt:
        ckpt.save(small_state(), step=1)
    assert not (ckpt_dir / "last_checkpoint").exists()


def test_saving_the_same_step_twice_replaces_the_entry(ckpt_dir):
    with Checkpointer(ckpt_dir, best=["acc"]) as ckpt:
        ckpt.save(small_state(1.0), step=5, metrics={"acc": 0.9})
        ckpt.save(small_state(2.0), step=5, metrics={"acc": 0.1})
        ckpt.flush()
        listing = ckpt.checkpoints()
        assert [c.name for c in listing] == ["step_5.pt"]
        assert ckpt.best("acc").metrics["acc"] == 0.1  # the old value is gone with its file
    assert asyncckpt.load(ckpt_dir)["w"][0, 0] == 2.0
    assert folder_files(ckpt_dir) == {"step_5.pt"}


def test_template_fields_and_name_override(ckpt_dir):
    with Checkpointer(ckpt_dir, filename="e{epoch:03d}-s{step}.pth") as ckpt:
        ckpt.save(small_state(), step=7, epoch=2)
        ckpt.save(small_state(), step=8, epoch=2, name="custom.pth")
    assert folder_files(ckpt_dir) == {"e002-s7.pth", "custom.pth"}


def test_template_collisions_are_rejected_at_save_time(ckpt_dir):
    with Checkpointer(ckpt_dir, filename="epoch_{epoch}.pt") as ckpt:
        ckpt.save(small_state(), step=10, epoch=1)
        with pytest.raises(ValueError, match="already used by step 10"):
            ckpt.save(small_state(), step=20, epoch=1)
        with pytest.raises(ValueError, match="needs epoch="):
            ckpt.save(small_state(), step=30)
        ckpt.save(small_state(), step=30, epoch=2)
    assert folder_files(ckpt_dir) == {"epoch_1.pt", "epoch_2.pt"}


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"step": -1}, ValueError, "step must be >= 0"),
        ({"step": True}, TypeError, "bool"),
        ({"step": "3"}, TypeError, "step must be an int"),
        ({"step": 1, "epoch": 1.5}, TypeError, "epoch must be an int"),
        ({"step": 1, "metrics": {"acc": "high"}}, TypeError, r"metrics\['acc'\]"),
        ({"step": 1, "metrics": [("acc", 1)]}, TypeError, "mapping"),
        ({"step": 1, "metrics": {"v": torch.ones(3)}}, TypeError, "3 elements"),
        ({"step": 1, "metrics": {"v": 10**400}}, ValueError, r"metrics\['v'\] is too large"),
        ({"step": 1, "name": "../escape.pt"}, ValueError, "path separator"),
        ({"step": 1, "name": "a\x00b"}, ValueError, "control character"),
        ({"step": 1, "name": ".hidden"}, ValueError, "reserved"),
        ({"step": 1, "name": "asyncckpt-index.json"}, ValueError, "bookkeeping"),
    ],
)
def test_bad_save_arguments(ckpt_dir, kwargs, exc, match):
    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(exc, match=match):
            ckpt.save(small_state(), **kwargs)
        ckpt.save(small_state(), step=1)  # the writer is still usable
    assert folder_files(ckpt_dir) == {"step_1.pt"}


def test_unsupported_state_is_a_type_error_and_releases_the_slot(ckpt_dir):
    with Checkpointer(ckpt_dir, queue_size=1) as ckpt:
        for _ in range(3):  # would deadlock if the slot leaked (2 slots in all)
            with pytest.raises(TypeError, match=r"state\['fn'\]"):
                ckpt.save({"fn": print}, step=1)
        ckpt.save(small_state(), step=1)
        assert ckpt.buffer_pool.in_use <= 1


def test_metrics_accept_tensors_and_numpy_scalars(ckpt_dir):
    with Checkpointer(ckpt_dir, best=["loss"]) as ckpt:
        ckpt.save(small_state(), step=1, metrics={"loss": torch.tensor(0.5), "acc": np.float32(1)})
        ckpt.flush()
        assert ckpt.latest().metrics == {"loss": 0.5, "acc": 1.0}


def test_nan_metric_never_becomes_best(ckpt_dir):
    with Checkpointer(ckpt_dir, best={"loss": "less"}) as ckpt:
        ckpt.save(small_state(), step=1, metrics={"loss": float("nan")})
        ckpt.save(small_state(), step=2, metrics={"loss": 4.0})
        ckpt.save(small_state(), step=3, metrics={"loss": float("nan")})
        ckpt.save(small_state(), step=4)  # no metric: pointer unchanged
        ckpt.flush()
        assert ckpt.best("loss").step == 2
    index = read_index(ckpt_dir)  # strict JSON: NaN is spelled as a string
    assert index["entries"][0]["metrics"] == {"loss": "NaN"}
    assert asyncckpt.checkpoints(ckpt_dir)[0].metrics["loss"] != 0  # NaN survives the round trip


# -- invariant 4: errors surface -----------------------------------------------------------------
def test_writer_failure_is_raised_at_the_next_save_and_nothing_partial_remains(wrapped, ckpt_dir):
    failed = threading.Event()
    observer = [lambda e: failed.set() if isinstance(e, Failed) else None]
    with Checkpointer(wrapped, keep_last=5, observers=observer) as ckpt:
        ckpt.save(small_state(1.0), step=1).wait()
        wrapped.fail_after_bytes = (100, OSError(errno.EIO, "injected I/O error"))
        ckpt.save(small_state(2.0), step=2)  # nobody waits on this handle
        assert failed.wait(30)
        wrapped.fail_after_bytes = None
        with pytest.raises(WriterError, match="step 2") as info:
            ckpt.save(small_state(3.0), step=3)  # so the loop hears of it here, once
        assert isinstance(info.value.__cause__, asyncckpt.StorageError)
        assert isinstance(info.value.__cause__.__cause__, OSError)
        assert "injected I/O error" in str(info.value.__cause__)
        ckpt.save(small_state(3.0), step=3).wait()  # and the writer goes on
        assert [c.step for c in ckpt.checkpoints()] == [1, 3]
    assert folder_files(ckpt_dir) == {"step_1.pt", "step_3.pt"}  # no temp file, no step_2
    assert asyncckpt.load(ckpt_dir, 1)["w"][0, 0] == 1.0


def test_a_failure_raised_by_its_handle_is_not_raised_again(wrapped, ckpt_dir):
    with Checkpointer(wrapped) as ckpt:
        wrapped.fail_write = lambda name, attempt: (
            OSError(errno.EIO, "boom") if name == "step_1.pt" else None
        )
        handle = ckpt.save(small_state(1.0), step=1)
        with pytest.raises(WriterError, match="boom") as info:
            handle.wait()
        assert handle.status == "failed" and isinstance(info.value.__cause__, OSError)
        with pytest.raises(WriterError):
            handle.wait()  # the handle keeps reporting its own outcome
        ckpt.flush()  # but the checkpointer does not raise it a second time
        ckpt.save(small_state(2.0), step=2)
    assert [c.step for c in asyncckpt.checkpoints(ckpt_dir)] == [2]


def test_failure_is_raised_by_flush_and_close(wrapped):
    wrapped.fail_write = lambda name, attempt: (
        PermissionError(errno.EACCES, "denied") if name.endswith(".pt") else None
    )
    ckpt = Checkpointer(wrapped)
    ckpt.save(small_state(), step=1)
    with pytest.raises(WriterError, match="denied"):
        ckpt.flush()
    ckpt.save(small_state(), step=2)
    with pytest.raises(WriterError, match="denied"):
        ckpt.close()
    assert ckpt.closed


def test_transient_errors_are_retried(wrapped, ckpt_dir):
    wrapped.fail_write = lambda name, attempt: (
        TransientStorageError("throttled") if attempt <= 2 else None
    )
    with Checkpointer(wrapped, retry_backoff=0.0) as ckpt:
        ckpt.save(small_state(), step=1).wait()
    assert wrapped.attempts["step_1.pt"] == 3
    assert asyncckpt.load(ckpt_dir)["step"] == 0


def test_transient_errors_beyond_the_budget_fail(wrapped):
    wrapped.fail_write = lambda name, attempt: (
        TransientStorageError("still throttled") if name.endswith(".pt") else None
    )
    with pytest.raises(WriterError, match="still throttled"):
        with Checkpointer(wrapped, retry_backoff=0.0, max_retries=2) as ckpt:
            ckpt.save(small_state(), step=1)
    assert wrapped.attempts["step_1.pt"] == 3


def test_failed_resave_keeps_the_previous_checkpoint_listed(wrapped, ckpt_dir):
    with Checkpointer(wrapped) as ckpt:
        ckpt.save(small_state(1.0), step=1).wait()
        wrapped.fail_write = lambda name, attempt: OSError(errno.ENOSPC, "disk full")
        with pytest.raises(WriterError):
            ckpt.save(small_state(2.0), step=1).wait()
        assert [c.step for c in ckpt.checkpoints()] == [1]
        wrapped.fail_write = None
    assert asyncckpt.load(ckpt_dir)["w"][0, 0] == 1.0


def test_failed_resave_of_an_older_name_keeps_its_place(wrapped, ckpt_dir):
    """The relisted file goes back where it was, not at the end: 'latest' stays the newest,
    and rotation does not delete the newest in favour of the older file."""
    with Checkpointer(wrapped, keep_last=2) as ckpt:
        ckpt.save(small_state(1.0), step=1).wait()
        ckpt.save(small_state(2.0), step=2).wait()
        wrapped.fail_write = lambda name, attempt: (
            OSError(errno.ENOSPC, "disk full") if name.endswith(".pt") else None
        )
        with pytest.raises(WriterError):
            ckpt.save(small_state(3.0), step=1).wait()  # step_1.pt again
        wrapped.fail_write = None
        assert [c.step for c in ckpt.checkpoints()] == [1, 2]
        assert ckpt.latest().step == 2
        ckpt.save(small_state(3.0), step=3).wait()
    assert [c.step for c in asyncckpt.checkpoints(ckpt_dir)] == [2, 3]
    assert asyncckpt.load(ckpt_dir, 2)["w"][0, 0] == 2.0


def test_observer_exceptions_surface(ckpt_dir):
    def bad(event: Event) -> None:
        if isinstance(event, Committed):
            raise RuntimeError("observer bug")

    with pytest.raises(WriterError, match="observer bug"):
        with Checkpointer(ckpt_dir, observers=[bad]) as ckpt:
            ckpt.save(small_state(), step=1)


def test_save_after_close_raises(ckpt_dir):
    ckpt = Checkpointer(ckpt_dir)
    ckpt.close()
    ckpt.close()  # idempotent
    with pytest.raises(WriterClosedError):
        ckpt.save(small_state(), step=1)


def test_one_writer_per_folder(ckpt_dir):
    with Checkpointer(ckpt_dir):
        with pytest.raises(CheckpointError, match="already open by another writer"):
            Checkpointer(ckpt_dir)


# -- backpressure -------------------------------------------------------------------------------
def gated_writer(wrapped, **options):
    wrapped.gate = threading.Event()
    return Checkpointer(wrapped, **options)


def test_block_policy_waits_for_a_slot(wrapped):
    ckpt = gated_writer(wrapped, queue_size=1, when_full="block")
    try:
        ckpt.save(small_state(1), step=1)  # taken by the writer, which waits at the gate
        assert wrapped.entered.wait(10)
        ckpt.save(small_state(2), step=2)  # waits in the queue
        third_done = threading.Event()

        def third():
            ckpt.save(small_state(3), step=3)
            third_done.set()

        worker = threading.Thread(target=third)
        worker.start()
        assert not third_done.wait(0.2)  # blocked: 2 snapshots exist, the bound is 2
        assert ckpt.buffer_pool.in_use == 2
        wrapped.gate.set()
        assert third_done.wait(10)
        worker.join()
        ckpt.flush()
        assert [c.step for c in ckpt.checkpoints()] == [1, 2, 3]
        assert ckpt.stats.skipped == 0
    finally:
        wrapped.gate.set()
        ckpt.close()


def test_skip_policy_drops_and_counts(wrapped):
    skipped: list[Skipped] = []
    ckpt = gated_writer(wrapped, queue_size=1, when_full="skip",
                        observers=[lambda e: skipped.append(e) if isinstance(e, Skipped) else None])
    try:
        ckpt.save(small_state(1), step=1)
        assert wrapped.entered.wait(10)
        ckpt.save(small_state(2), step=2)
        handles = [ckpt.save(small_state(s), step=s) for s in (3, 4, 5)]
        assert [h.status for h in handles] == ["skipped"] * 3
        assert handles[0].wait() is None
        assert ckpt.buffer_pool.in_use == 2
        wrapped.gate.set()
        ckpt.flush()
        assert [c.step for c in ckpt.checkpoints()] == [1, 2]
        stats = ckpt.stats
        assert (stats.saves, stats.committed, stats.skipped) == (5, 2, 3)
        assert [e.step for e in skipped] == [3, 4, 5]
        assert all(e.reason == "queue_full" for e in skipped)
    finally:
        wrapped.gate.set()
        ckpt.close()


def test_coalesce_policy_keeps_the_newest(wrapped):
    ckpt = gated_writer(wrapped, queue_size=1, when_full="coalesce")
    try:
        ckpt.save(small_state(1), step=1)
        assert wrapped.entered.wait(10)
        handles = [ckpt.save(small_state(s), step=s) for s in (2, 3, 4)]
        assert [h.status for h in handles] == ["coalesced", "coalesced", "pending"]
        wrapped.gate.set()
        ckpt.flush()
        assert [c.step for c in ckpt.checkpoints()] == [1, 4]
        assert handles[0].wait() is None
        stats = ckpt.stats
        assert (stats.saves, stats.committed, stats.coalesced) == (4, 2, 2)
        assert ckpt.buffer_pool.allocations <= 2  # coalescing reuses the evicted arena
    finally:
        wrapped.gate.set()
        ckpt.close()


def test_memory_stays_bounded_over_many_saves(ckpt_dir):
    state = {"w": torch.randn(64, 1024)}  # 256 KiB
    with Checkpointer(ckpt_dir, queue_size=2, when_full="coalesce", keep_last=2) as ckpt:
        for step in range(60):
            ckpt.save(state, step=step)
            assert ckpt.buffer_pool.in_use <= 3
        ckpt.flush()
        assert ckpt.buffer_pool.allocations <= 3
        stats = ckpt.stats
        assert stats.saves == 60 and stats.committed + stats.coalesced == 60


# -- leaving the block ----------------------------------------------------------------------------
def test_exit_by_exception_drains_by_default(ckpt_dir):
    with pytest.raises(KeyError):
        with Checkpointer(ckpt_dir) as ckpt:
            ckpt.save(small_state(1.0), step=1)
            raise KeyError("training crashed")
    assert asyncckpt.load(ckpt_dir)["step"] == 1


def test_exit_by_exception_can_abandon(wrapped, ckpt_dir):
    ckpt = gated_writer(wrapped, on_exception="abandon", queue_size=2)
    with pytest.raises(KeyError):
        with ckpt:
            ckpt.save(small_state(1.0), step=1)
            assert wrapped.entered.wait(10)
            queued = ckpt.save(small_state(2.0), step=2)
            raise KeyError("stop now")
    assert queued.status == "cancelled"
    assert folder_files(ckpt_dir) == set()  # no temporary file, nothing half-written
    assert asyncckpt.checkpoints(ckpt_dir) == []


async def test_async_cancellation_abandons_cleanly(wrapped, ckpt_dir):
    wrapped.gate = threading.Event()
    with anyio.CancelScope() as scope:
        async with AsyncCheckpointer(wrapped) as ckpt:
            await ckpt.save(small_state(1.0), step=1)
            await anyio.to_thread.run_sync(wrapped.entered.wait)
            scope.cancel()
            wrapped.gate.set()
            await anyio.sleep_forever()
    listed = [c.name for c in asyncckpt.checkpoints(ckpt_dir)]
    assert listed in ([], ["step_1.pt"])  # either the old state or the new one, never half
    assert folder_files(ckpt_dir) <= {"step_1.pt"}  # no temporary leftovers
    if listed:
        assert asyncckpt.load(ckpt_dir)["step"] == 1


# -- events and stats ---------------------------------------------------------------------------
def test_events_arrive_in_order_with_timings(ckpt_dir):
    events: list[Event] = []
    with Checkpointer(ckpt_dir, keep_last=1, best=["acc"], observers=[events.append]) as ckpt:
        for step, acc in [(1, 0.5), (2, 0.4), (3, 0.3), (4, 0.6)]:
            ckpt.save(small_state(), step=step, metrics={"acc": acc}).wait()
        stats = ckpt.stats
    kinds = [type(e).__name__ for e in events]
    assert kinds[:4] == ["SnapshotTaken", "Written", "Committed", "BestUpdated"]
    taken = [e for e in events if isinstance(e, SnapshotTaken)]
    assert [e.step for e in taken] == [1, 2, 3, 4] and all(e.stall > 0 for e in taken)
    assert all(e.nbytes > 0 and e.seconds > 0 for e in events if isinstance(e, Written))
    # step_1 holds the best acc, so keep_last=1 spares it until step_4 beats it
    assert [e.names for e in events if isinstance(e, Rotated)] == [
        ("step_2.pt",), ("step_1.pt", "step_3.pt")
    ]
    best = [e for e in events if isinstance(e, BestUpdated)]
    assert [(e.name, e.previous) for e in best] == [("step_1.pt", None), ("step_4.pt", "step_1.pt")]
    assert not any(isinstance(e, Failed) for e in events)
    assert folder_files(ckpt_dir) == {"step_4.pt"}
    assert stats.saves == stats.committed == 4 and stats.rotated == 3
    assert stats.stall_max >= stats.stall_p95 >= stats.stall_p50 > 0
    assert stats.bytes_committed > 0 and stats.write_throughput > 0


def test_stats_count_every_save_as_soon_as_it_returns(ckpt_dir):
    """A save's last message to the writer is one-way: stats read right after save() must still
    count it (and an observer, on the writer's thread, may read stats without deadlocking)."""
    seen_by_observer: list[int] = []
    counted: list[int] = []
    with Checkpointer(ckpt_dir, keep_last=2) as ckpt:
        ckpt.subscribe(lambda e: seen_by_observer.append(ckpt.stats.saves)
                       if isinstance(e, SnapshotTaken) else None)
        for step in range(1, 21):
            ckpt.save(small_state(step), step=step)
            counted.append(ckpt.stats.saves)
    assert counted == list(range(1, 21))
    assert seen_by_observer == list(range(1, 21))


def test_storage_instance_and_file_uri_are_accepted(ckpt_dir):
    with Checkpointer(f"file://{ckpt_dir}") as ckpt:
        ckpt.save(small_state(), step=1)
    with Checkpointer(LocalStorage(ckpt_dir)) as ckpt:
        assert ckpt.latest().step == 1


def test_keep_and_supersedes(ckpt_dir):
    """mmengine's best_*.pth pattern: a kept copy that the next best supersedes."""
    with Checkpointer(ckpt_dir, keep_last=1) as ckpt:
        ckpt.save(small_state(1), step=1)
        ckpt.save(small_state(1), step=1, name="best_1.pt", keep=True)
        ckpt.save(small_state(2), step=2)
        ckpt.save(small_state(3), step=3)
        ckpt.flush()
        assert {c.name for c in ckpt.checkpoints()} == {"best_1.pt", "step_3.pt"}
        ckpt.save(small_state(3), step=3, name="best_3.pt", keep=True, supersedes=["best_1.pt"])
        ckpt.flush()
        assert [c.name for c in ckpt.checkpoints()] == ["step_3.pt", "best_3.pt"]
        with pytest.raises(TypeError, match="list of checkpoint names"):
            ckpt.save(small_state(), step=4, supersedes="best_3.pt")
    assert folder_files(ckpt_dir) == {"step_3.pt", "best_3.pt"}


def test_a_save_that_supersedes_its_own_name_replaces_another_step(ckpt_dir):
    """``last.pt`` rewritten at every save: listed once, with the newest step and bytes."""
    with Checkpointer(ckpt_dir, best={"loss": "less"}) as ckpt:
        ckpt.save(small_state(1), step=1, name="last.pt", metrics={"loss": 1.0}).wait()
        with pytest.raises(ValueError, match="already used by step 1"):
            ckpt.save(small_state(2), step=2, name="last.pt")
        ckpt.save(small_state(2), step=2, name="last.pt", supersedes=["last.pt"],
                  metrics={"loss": 2.0})
        # queued under the same name with a third step: replaced in turn
        ckpt.save(small_state(3), step=3, name="last.pt", supersedes=["last.pt"],
                  metrics={"loss": 3.0})
        ckpt.flush()
        assert [(c.name, c.step) for c in ckpt.checkpoints()] == [("last.pt", 3)]
        assert ckpt.best("loss").step == 3  # the step-1 record went with its entry
    assert folder_files(ckpt_dir) == {"last.pt"}
    assert asyncckpt.load(ckpt_dir)["step"] == 3


def test_remove_drops_listed_and_queued_checkpoints(ckpt_dir):
    events = []
    with Checkpointer(ckpt_dir, observers=[events.append]) as ckpt:
        ckpt.save(small_state(1), step=1).wait()
        ckpt.save(small_state(2), step=2)  # maybe still queued: removed once committed
        ckpt.save(small_state(3), step=3)
        (ckpt_dir / "stray.pt").write_bytes(b"x")  # unlisted names are deleted too
        ckpt.remove(["step_1.pt", "step_2.pt", "stray.pt"])
        assert [c.name for c in ckpt.checkpoints()] == ["step_3.pt"]
        assert folder_files(ckpt_dir) == {"step_3.pt"}
        assert any(isinstance(e, asyncckpt.events.Rotated)
                   and set(e.names) == {"step_1.pt", "step_2.pt", "stray.pt"} for e in events)
        with pytest.raises(TypeError, match="list of checkpoint names"):
            ckpt.remove("step_3.pt")
        with pytest.raises(ValueError, match="path separator"):
            ckpt.remove(["../step_3.pt"])
    assert [c.name for c in asyncckpt.checkpoints(ckpt_dir)] == ["step_3.pt"]
    with pytest.raises(asyncckpt.WriterClosedError):
        ckpt.remove(["step_3.pt"])


def test_failed_save_does_not_supersede(wrapped, ckpt_dir):
    with Checkpointer(wrapped) as ckpt:
        ckpt.save(small_state(1), step=1, name="best.pt", keep=True).wait()
        wrapped.fail_write = lambda name, attempt: (
            OSError(errno.EIO, "boom") if name == "b2.pt" else None
        )
        with pytest.raises(WriterError):
            ckpt.save(small_state(2), step=2, name="b2.pt", supersedes=["best.pt"]).wait()
        ckpt.flush()
        assert [c.name for c in ckpt.checkpoints()] == ["best.pt"]
    assert folder_files(ckpt_dir) == {"best.pt"}


def test_a_forgotten_checkpointer_is_drained_with_a_warning(ckpt_dir):
    import gc

    ckpt = Checkpointer(ckpt_dir)
    ckpt.save(small_state(5.0), step=5)
    with pytest.warns(ResourceWarning, match="was not closed"):
        del ckpt
        gc.collect()
    assert asyncckpt.load(ckpt_dir)["step"] == 5
    with Checkpointer(ckpt_dir) as again:  # the folder lock was released
        assert again.latest().step == 5


def test_interpreter_exit_drains_an_unclosed_checkpointer(ckpt_dir):
    import subprocess
    import sys

    code = (
        "import torch, asyncckpt, sys\n"
        "ckpt = asyncckpt.Checkpointer(sys.argv[1])\n"
        "ckpt.save({'w': torch.ones(1000, 1000)}, step=3)\n"
    )
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(ckpt_dir)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert [c.step for c in asyncckpt.checkpoints(ckpt_dir)] == [3]


async def test_coalesce_with_a_concurrently_blocked_save(wrapped, ckpt_dir):
    """A slot freed by coalescing may be handed to another save() already waiting for one."""
    copying = threading.Event()

    class SlowStateDict:  # keeps one save "mid-copy" until the test lets it go
        def state_dict(self):
            copying.wait(30)
            return {"w": torch.zeros(4)}

    wrapped.gate = threading.Event()
    async with AsyncCheckpointer(wrapped, queue_size=1, when_full="coalesce") as ckpt:
        await ckpt.save(small_state(1), step=1)  # the writer takes it and is held at the gate
        await anyio.to_thread.run_sync(wrapped.entered.wait)
        handles: dict[int, object] = {}

        async def save(step, state):
            handles[step] = await ckpt.save(state, step=step)

        async with anyio.create_task_group() as tg:
            tg.start_soon(save, 2, {"s": SlowStateDict()})  # holds the second slot, mid-copy
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(save, 3, small_state(3))  # nothing queued to evict: waits for a slot
            await anyio.wait_all_tasks_blocked()
            copying.set()  # step 2 is queued now ...
            while 2 not in handles:
                await anyio.wait_all_tasks_blocked()
            # ... so step 4 evicts it; the freed slot goes to step 3, already waiting for one
            tg.start_soon(save, 4, small_state(4))
            await anyio.wait_all_tasks_blocked()
            wrapped.gate.set()
        await ckpt.flush()
        committed = [c.step for c in ckpt.checkpoints()]
    assert handles[2].status == "coalesced"
    assert committed == [1, 3, 4]


def test_a_storage_that_fails_to_open_leaves_nothing_open(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(asyncckpt.StorageError, match="create the checkpoint folder"):
        Checkpointer(blocker / "ckpt")
    assert not [t for t in threading.enumerate() if t.name.startswith("asyncckpt-writer")]


def test_sync_saves_queue_in_order_without_waiting(ckpt_dir):
    """save() enqueues one-way; whatever the caller asks next runs after the enqueue."""
    stalls = []

    def on_event(event):
        if isinstance(event, asyncckpt.events.SnapshotTaken):
            stalls.append(event.stall)

    with asyncckpt.Checkpointer(ckpt_dir, queue_size=3, observers=[on_event]) as ckpt:
        t0 = time.perf_counter()
        handles = [ckpt.save({"x": torch.full((100,), float(i))}, step=i) for i in range(1, 9)]
        elapsed = time.perf_counter() - t0
        ckpt.flush()  # runs after the last enqueue: every save is resolved by now
        assert [h.status for h in handles] == ["committed"] * 8
        assert [c.step for c in ckpt.checkpoints()] == list(range(1, 9))
    assert len(stalls) == 8 and sum(stalls) <= elapsed  # measured on the caller's thread
    for i in range(1, 9):
        assert torch.load(ckpt_dir / f"step_{i}.pt", weights_only=True)["x"][0] == i
