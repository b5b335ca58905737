"""Pipelined snapshots: consistency behind the guards, what the guards wait for, their hooks,
unguarded mutation and its detection, errors, coalescing and closing with a copy in flight.

"Early" is made deterministic with the copy probe (``snapshots.probe``, a test seam):
``HeldCopy`` blocks the copy thread before its first chunk until a guard starts waiting (or the
copy is cancelled), so every guard in these tests that runs while the copy is held must wait,
and a missing guard lets the training steps overwrite tensors that were not copied yet.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from support.helpers import tensors_equal

import asyncckpt
from asyncckpt import (
    AsyncCheckpointer,
    Checkpointer,
    CheckpointerConfig,
    SnapshotMutatedError,
    WriterError,
)

K = 3  # the step that is saved
DEADLOCK = 60.0  # seconds a held copy waits before failing the test instead of hanging it


class HeldCopy:
    """Copy probe: hold the copy thread before its first chunk until a guard waits.

    Chunks of the storages in ``hold_later`` after that first one also wait for ``later``.
    """

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.later = threading.Event()
        self.events: list[tuple[str, int]] = []
        self.hold_later: set[int] = set()
        self.fail: BaseException | None = None
        self._first = True

    def __call__(self, event: str, index: int) -> None:
        self.events.append((event, index))
        if event == "chunk":
            if self.fail is not None:
                raise self.fail
            self._wait(self.gate)
            first, self._first = self._first, False
            if not first and index in self.hold_later:
                self._wait(self.later)
        else:  # "wait" (a guard blocks) or "cancel"
            self.gate.set()

    @staticmethod
    def _wait(gate: threading.Event) -> None:
        if not gate.wait(DEADLOCK):  # a safety net against a hung test, not a synchronisation
            raise AssertionError("the held copy was never released: no guard waited for it")

    def release(self) -> None:
        self.gate.set()
        self.later.set()


@pytest.fixture
def held():
    probe = HeldCopy()
    yield probe
    probe.release()  # never leave a copy thread waiting on a test's gate


class Training:
    """A small training setup; ``kind`` picks the optimizer and what else is in the state."""

    def __init__(self, kind: str) -> None:
        torch.manual_seed(0)
        self.kind = kind
        self.gen = torch.Generator().manual_seed(1)
        if kind == "batchnorm":
            self.model = torch.nn.Sequential(
                torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)
            )
        else:
            self.model = torch.nn.Sequential(
                torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
            )
        self.model.train()
        if kind in ("adam", "gradscaler"):
            self.optim: torch.optim.Optimizer = torch.optim.Adam(self.model.parameters(), lr=0.01)
        else:
            self.optim = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.extra: dict[str, object] = {}
        if kind == "scheduler":
            self.extra["sched"] = torch.optim.lr_scheduler.StepLR(self.optim, 1, gamma=0.5)
        if kind == "gradscaler":
            self.extra["scaler"] = torch.amp.GradScaler("cpu", growth_interval=1)
        for _ in range(K):
            self.step()

    def objects(self) -> dict[str, object]:
        return {"model": self.model, "optim": self.optim, **self.extra}

    def expected(self) -> dict[str, object]:
        return copy.deepcopy({k: v.state_dict() for k, v in self.objects().items()})

    def step(self) -> None:
        x = torch.randn(6, 8, generator=self.gen)
        self.optim.zero_grad()
        if self.kind == "gradscaler":
            scaler = self.extra["scaler"]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = self.model(x).float().pow(2).mean()
            scaler.scale(loss).backward()
            scaler.step(self.optim)
            scaler.update()
        else:
            self.model(x).pow(2).mean().backward()
            self.optim.step()
        if "sched" in self.extra:
            self.extra["sched"].step()


def assert_saved_state(ckpt_dir, expected: dict[str, object], training: Training) -> None:
    loaded = asyncckpt.load(ckpt_dir)
    assert loaded.keys() == expected.keys()
    for key in expected:
        assert tensors_equal(loaded[key], expected[key]), key
    # not vacuous: the live state moved on after the save
    assert not tensors_equal(training.model.state_dict(), expected["model"])


CASES = ["sgd", "adam", "scheduler", "batchnorm", "gradscaler"]


# -- consistency: save at step k, run k+1, k+2 at once; the file holds step k --------------------
@pytest.mark.parametrize("kind", CASES)
def test_sync_pipelined_checkpoint_equals_the_state_at_save(ckpt_dir, held, kind):
    training = Training(kind)
    with Checkpointer(ckpt_dir, snapshot="pipelined") as ckpt:
        ckpt._engine.snapshots.probe = held
        expected = training.expected()
        handle = ckpt.save(training.objects(), step=K)
        training.step()  # forward/backward run while the copy is held; the step's guard waits
        training.step()
        held.release()
        assert handle.wait() is not None
        stats = ckpt.stats
    assert_saved_state(ckpt_dir, expected, training)
    assert stats.guard_waits == 1  # the first step found the copy held, the second did not
    # the second step counts only if the copy had not stopped yet when it ran
    assert 1 <= stats.guard_calls <= 2


@pytest.mark.parametrize("kind", CASES)
async def test_async_pipelined_checkpoint_equals_the_state_at_save(ckpt_dir, held, kind):
    training = Training(kind)
    async with AsyncCheckpointer(ckpt_dir, snapshot="pipelined") as ckpt:
        ckpt._engine.snapshots.probe = held
        expected = training.expected()
        handle = await ckpt.save(training.objects(), step=K)
        training.step()  # blocks this loop in the guard; the copy thread does not need it
        training.step()
        held.release()
        assert await handle.committed() is not None
        stats = ckpt.stats
    assert_saved_state(ckpt_dir, expected, training)
    assert stats.guard_waits == 1


def test_per_call_snapshot_overrides_the_config(ckpt_dir, held):
    training = Training("adam")
    with Checkpointer(ckpt_dir) as ckpt:  # eager by default
        assert ckpt.config.snapshot == "eager"
        ckpt._engine.snapshots.probe = held
        expected = training.expected()
        ckpt.save(training.objects(), step=K, snapshot="pipelined")
        training.step()
        ckpt.flush()
        assert ckpt.stats.guard_waits == 1
        ckpt.save(training.objects(), step=K + 1, snapshot="eager")
        assert ckpt._engine.snapshots.guards.copies == []  # nothing left to guard
    assert tensors_equal(asyncckpt.load(ckpt_dir, which=K)["model"], expected["model"])


# -- what the guard waits for ---------------------------------------------------------------------
def test_guard_after_the_copy_finished_does_not_wait(ckpt_dir):
    training = Training("adam")
    with Checkpointer(ckpt_dir, snapshot="pipelined") as ckpt:
        handle = ckpt.save(training.objects(), step=K)
        handle.wait()  # committed, so the copy completed
        assert len(training.optim._optimizer_step_pre_hooks) == 1  # removed at a safe point
        training.step()
        training.step()
        stats = ckpt.stats
    # the hook still ran, but with nothing pending it is not a guard (stats.guard_calls counts
    # only guards that ran while a background copy was pending)
    assert (stats.guard_calls, stats.guard_waits, stats.guard_wait_seconds) == (0, 0, 0.0)


def test_guard_calls_count_only_steps_while_a_copy_is_pending(ckpt_dir, held):
    training = Training("sgd")
    with Checkpointer(ckpt_dir, snapshot="pipelined") as ckpt:
        ckpt._engine.snapshots.probe = held
        handle = ckpt.save(training.objects(), step=K)
        training.step()  # the copy is held: this guard ran while it was pending
        handle.wait()  # the copy completed; its hook stays installed until the next save()
        assert len(training.optim._optimizer_step_pre_hooks) == 1
        for _ in range(3):
            training.step()
        stats = ckpt.stats
    assert (stats.guard_calls, stats.guard_waits) == (1, 1)


def test_guard_arriving_early_waits(ckpt_dir, held):
    training = Training("sgd")
    with Checkpointer(ckpt_dir, snapshot="pipelined") as ckpt:
        ckpt._engine.snapshots.probe = held
        ckpt.save(training.objects(), step=K)
        pending = ckpt._engine.snapshots.guards.copies[0]
        assert not any(pending.copied(i) for i in range(len(pending.items)))
        training.step()
        # the step ran only after every tensor it updates was copied
        assert all(pending.copied(i) for i in pending.groups[0].cpu_items)
        stats = ckpt.stats
    assert (stats.guard_calls, stats.guard_waits) == (1, 1)
    assert stats.guard_wait_seconds > 0
    assert ("wait", len(pending.items)) in held.events


def test_guard_waits_only_for_its_optimizers_tensors(ckpt_dir, held):
    torch.manual_seed(0)
    gen, disc = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    state = {"gen": gen, "disc": disc, "opt_g": opt_g, "opt_d": opt_d}
    expected = copy.deepcopy({k: v.state_dict() for k, v in state.items()})
    with Checkpointer(ckpt_dir, snapshot="pipelined") as ckpt:
        ckpt._engine.snapshots.probe = held
        ckpt.save(state, step=1)
        pending = ckpt._engine.snapshots.guards.copies[0]
        g_items, d_items = (set(group.cpu_items) for group in pending.groups)
        held.hold_later = g_items  # the generator's tensors (copied first by default) stay held
        disc(torch.randn(2, 4)).sum().backward()
        opt_d.step()  # its guard moves the discriminator's tensors to the front and waits
        assert all(pending.copied(i) for i in d_items)
        assert not all(pending.copied(i) for i in g_items)  # not waited for
        held.later.set()
        gen(torch.randn(2, 4)).sum().backward()
        opt_g.step()
        ckpt.flush()
    loaded = asyncckpt.load(ckpt_dir)
    for key in ("gen", "disc"):
        assert tensors_equal(loaded[key], expected[key])


def test_large_tensors_are_copied_in_chunks(ckpt_dir, monkeypatch):
    monkeypatch.setattr("asyncckpt._snapshot.pending.CHUNK_BYTES", 4096)
    model = torch.nn.Linear(64, 64)  # 16 KiB of weight: 4 chunks
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    chunks: list[int] = []
    with Checkpointer(ckpt_dir, snapshot="pipelined") as ckpt:
        ckpt._engine.snapshots.probe = (
            lambda event, index: chunks.append(index) if event == "chunk" else None
        )
        expected = copy.deepcopy(model.state_dict())
        ckpt.save({"model": model, "optim": optim}, step=1).wait()
    assert len(chunks) == 4 + 1  # the weight in 4 chunks, the bias in one
    assert tensors_equal(asyncckpt.load(ckpt_dir)["model"], expected)


# -- hooks: installed per save, removed at the next safe point -----------------------------------
def test_hooks_do_not_accumulate_and_memory_stays_bounded(ckpt_dir):
    training = Training("adam")
    hooks = training.optim._optimizer_step_pre_hooks
    with Checkpointer(ckpt_dir, snapshot="pipelined", keep_last=2) as ckpt:
        for step in range(K + 1, K + 9):
            ckpt.save(training.objects(), step=step)
            assert len(hooks) == 1
            training.step()
        ckpt.wait_snapshot()
        assert len(hooks) == 0
        ckpt.save(training.objects(), step=100)
        assert len(hooks) == 1
        assert ckpt.buffer_pool.allocations <= ckpt.config.queue_size + 1
    assert len(hooks) == 0
    assert ckpt.buffer_pool.in_use == 0


def test_state_without_an_optimizer_is_copied_before_save_returns(ckpt_dir):
    model = torch.nn.Linear(4, 4)
    loose = torch.arange(10.0)
    expected = copy.deepcopy({"model": model.state_dict(), "loose": loose})
    with Checkpointer(ckpt_dir, snapshot="pipelined") as ckpt:
        ckpt.save({"model": model, "loose": loose}, step=1)
        # nothing is guarded, so nothing was deferred
        assert ckpt._engine.snapshots.guards.copies == []
        with torch.no_grad():
            model.weight.fill_(5.0)
            loose.fill_(-1.0)
    loaded = asyncckpt.load(ckpt_dir)
    assert tensors_equal(loaded, expected)


# -- wait_snapshot() and unguarded mutation -------------------------------------------------------
def test_wait_snapshot_makes_manual_mutation_safe(ckpt_dir, held):
    training = Training("sgd")
    with Checkpointer(ckpt_dir, snapshot="pipelined") as ckpt:
        ckpt._engine.snapshots.probe = held
        expected = training.expected()
        ckpt.save(training.objects(), step=K)
        ckpt.wait_snapshot()  # waits (the copy is held until it asks), then unhooks
        assert len(training.optim._optimizer_step_pre_hooks) == 0
        with torch.no_grad():
            for p in training.model.parameters():
                p.mul_(0.5)  # e.g. weight decay by hand, outside the optimizer
        stats = ckpt.stats
    assert stats.guard_waits == 1
    assert tensors_equal(asyncckpt.load(ckpt_dir)["model"], expected["model"])


async def test_async_wait_snapshot(ckpt_dir, held):
    training = Training("adam")
    async with AsyncCheckpointer(ckpt_dir, snapshot="pipelined") as ckpt:
        ckpt._engine.snapshots.probe = held
        expected = training.expected()
        await ckpt.save(training.objects(), step=K)
        await ckpt.wait_snapshot()
        assert ckpt._engine.snapshots.guards.copies == []
        training.model.load_state_dict(Training("sgd").model.state_dict())
    assert tensors_equal(asyncckpt.load(ckpt_dir)["optim"], expected["optim"])
    assert tensors_equal(asyncckpt.load(ckpt_dir)["model"], expected["model"])


def test_unguarded_mutation_reaches_the_checkpoint(ckpt_dir, held):
    """Documented limitation: an in-place change that bypasses the guards before the copy got
    to the tensor ends up in the checkpoint (a state that never existed at save())."""
    training = Training("sgd")
    weight = training.model[0].weight
    with Checkpointer(ckpt_dir, snapshot="pipelined") as ckpt:
        ckpt._engine.snapshots.probe = held
        ckpt.save(training.objects(), step=K)
        with torch.no_grad():
            weight.fill_(7.0)  # not through optimizer.step(), no wait_snapshot()
        held.release()
        ckpt.flush()
    assert torch.equal(asyncckpt.load(ckpt_dir)["model"]["0.weight"], torch.full_like(weight, 7.0))


def test_check_snapshot_detects_unguarded_mutation(ckpt_dir, held):
    training = Training("sgd")
    with Checkpointer(ckpt_dir, snapshot="pipelined", check_snapshot=True) as ckpt:
        ckpt._engine.snapshots.probe = held
        handle = ckpt.save(training.objects(), step=K)
        with torch.no_grad():
            training.model[0].weight.fill_(7.0)
        held.release()
        with pytest.raises(WriterError) as raised:
            ckpt.flush()
        assert handle.status == "failed"
        cause = raised.value.__cause__
        assert isinstance(cause, SnapshotMutatedError)
        assert cause.path == "state['model'].state_dict()['0.weight']"
        assert ckpt.checkpoints() == []
        # a guarded run with the check on passes
        ckpt.save(training.objects(), step=K + 1)
        training.step()
        ckpt.flush()
        assert [c.step for c in ckpt.checkpoints()] == [K + 1]


# -- errors, coalescing, closing ------------------------------------------------------------------
def test_copy_error_fails_the_save_not_the_training_step(ckpt_dir, held):
    training = Training("adam")
    with Checkpointer(ckpt_dir, snapshot="pipelined") as ckpt:
        held.fail = RuntimeError("copy exploded")
        ckpt._engine.snapshots.probe = held
        handle = ckpt.save(training.objects(), step=K)
        training.step()  # the guard returns once the copy stopped; it does not raise
        with pytest.raises(WriterError, match="copy exploded") as raised:
            ckpt.flush()
        assert isinstance(raised.value.__cause__, RuntimeError)
        assert handle.status == "failed"
        ckpt._engine.snapshots.probe = None
        ckpt.save(training.objects(), step=K + 1).wait()  # the writer goes on
        stats = ckpt.stats
    assert (stats.failed, stats.committed) == (1, 1)
    assert ckpt.buffer_pool.in_use == 0


def test_a_failed_copy_waits_for_its_device_copies_before_it_counts_as_stopped():
    """A CPU chunk fails while device copies are queued: once the copy reports stopped (and
    the writer reuses the arena), those copies must have completed."""
    from asyncckpt._snapshot.pending import CopyMonitor, DeferredStorage, PendingCopy

    class _Event:  # stands for the torch.cuda.Event recorded after the queued device copies
        synchronized = False

        def synchronize(self) -> None:
            self.synchronized = True

    def probe(event: str, index: int) -> None:
        if event == "chunk":
            raise RuntimeError("the CPU chunk failed")

    item = DeferredStorage(torch.zeros(64, dtype=torch.uint8),
                           torch.empty(64, dtype=torch.uint8), "state['x']", 0)
    device_copies = _Event()
    pending = PendingCopy([item], [], [device_copies], CopyMonitor(probe=probe))  # type: ignore[list-item]
    pending.run()
    assert pending.state == "failed" and pending.stopped
    assert device_copies.synchronized


def test_coalescing_a_snapshot_whose_copy_is_running(wrapped, ckpt_dir, held):
    training = Training("adam")
    wrapped.gate = threading.Event()  # hold the writer inside the first checkpoint's write
    with Checkpointer(wrapped, snapshot="pipelined", when_full="coalesce") as ckpt:
        first = ckpt.save(training.objects(), step=K)
        wrapped.entered.wait()  # the writer is writing it, so its copy completed
        training.step()
        ckpt._engine.snapshots.probe = held
        second = ckpt.save(training.objects(), step=K + 1)  # its copy is held
        assert not ckpt._engine.snapshots.guards.copies[-1].stopped
        expected = training.expected()  # nothing stepped since the second save
        third = ckpt.save(training.objects(), step=K + 2)  # evicts the second mid-copy
        assert second.status == "coalesced"
        assert ("cancel", 0) in held.events
        training.step()
        wrapped.gate.set()
        ckpt.flush()
        assert [first.status, third.status] == ["committed", "committed"]
        assert ckpt.buffer_pool.allocations <= 2
    assert ckpt.buffer_pool.in_use == 0
    assert tensors_equal(asyncckpt.load(ckpt_dir, which=K + 2)["optim"], expected["optim"])
    assert ckpt.stats.coalesced == 1


def test_abandoning_with_a_copy_in_flight(ckpt_dir, held):
    training = Training("sgd")
    with pytest.raises(KeyboardInterrupt):
        with Checkpointer(ckpt_dir, snapshot="pipelined", on_exception="abandon") as ckpt:
            ckpt._engine.snapshots.probe = held
            handle = ckpt.save(training.objects(), step=K)
            raise KeyboardInterrupt
    assert handle.status == "cancelled"
    assert ("cancel", 0) in held.events
    assert len(training.optim._optimizer_step_pre_hooks) == 0
    assert ckpt.buffer_pool.in_use == 0
    training.step()  # no guard left behind


# -- configuration --------------------------------------------------------------------------------
def test_snapshot_options_are_validated(ckpt_dir):
    assert CheckpointerConfig().snapshot == "eager"
    assert CheckpointerConfig(snapshot="pipelined").snapshot == "pipelined"
    with pytest.raises(ValueError, match="snapshot must be one of 'eager', 'pipelined'"):
        CheckpointerConfig(snapshot="lazy")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="check_snapshot must be a bool"):
        CheckpointerConfig(check_snapshot="yes")  # type: ignore[arg-type]
    with Checkpointer(ckpt_dir) as ckpt:
        with pytest.raises(ValueError, match=r"save\(snapshot=...\) must be one of"):
            ckpt.save({"x": torch.ones(1)}, step=1, snapshot="later")  # type: ignore[arg-type]
        assert ckpt.buffer_pool.in_use == 0


# -- CUDA (untested without a GPU) ----------------------------------------------------------------
def to_cpu(tree):
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


@pytest.mark.cuda
@pytest.mark.parametrize("door", ["sync", "async"])
async def test_cuda_pipelined_checkpoint_equals_the_state_at_save(ckpt_dir, monkeypatch, door):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 8)
    ).cuda()
    optim = torch.optim.Adam(model.parameters(), lr=0.01)

    def step():
        optim.zero_grad()
        model(torch.randn(32, 64, device="cuda")).pow(2).mean().backward()
        optim.step()

    step()
    expected = copy.deepcopy({"model": model.state_dict(), "optim": optim.state_dict()})
    state = {"model": model, "optim": optim}

    def forbidden():
        raise AssertionError("a guard must not synchronize the device")

    if door == "sync":
        with Checkpointer(ckpt_dir, snapshot="pipelined") as ckpt:
            torch.cuda._sleep(50_000_000)  # keep the copy behind queued work
            ckpt.save(state, step=1)
            with monkeypatch.context() as m:
                m.setattr(torch.cuda, "synchronize", forbidden)
                step()
                step()
            ckpt.flush()
            stats, pool = ckpt.stats, ckpt.buffer_pool
    else:
        async with AsyncCheckpointer(ckpt_dir, snapshot="pipelined") as ackpt:
            torch.cuda._sleep(50_000_000)
            await ackpt.save(state, step=1)
            with monkeypatch.context() as m:
                m.setattr(torch.cuda, "synchronize", forbidden)
                step()
                step()
            await ackpt.flush()
            stats, pool = ackpt.stats, ackpt.buffer_pool
    loaded = asyncckpt.load(ckpt_dir, map_location="cpu")
    assert tensors_equal(loaded["model"], to_cpu(expected["model"]))
    assert tensors_equal(loaded["optim"], to_cpu(expected["optim"]))
    assert stats.guard_calls >= 1
    assert pool.pin_memory


@pytest.mark.cuda
def test_cuda_pinned_buffers_are_reused_and_freed(ckpt_dir):
    model = torch.nn.Linear(256, 256).cuda()
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with Checkpointer(ckpt_dir, snapshot="pipelined", keep_last=1) as ckpt:
        for step in range(1, 6):
            model(torch.randn(4, 256, device="cuda")).sum().backward()
            optim.step()
            ckpt.save({"model": model, "optim": optim}, step=step).wait()
        pool = ckpt.buffer_pool
        assert pool.allocations == 1
        assert all(a.pinned for a in pool._free)
    assert pool.reserved_bytes == 0
    assert len(optim._optimizer_step_pre_hooks) == 0
