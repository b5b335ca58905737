"""What save() reports as its stall is what the caller waited: from entry to return."""

from __future__ import annotations

import time

import torch

from asyncckpt import AsyncCheckpointer, Checkpointer
from asyncckpt.events import SnapshotTaken


class _Timed:
    """Records when save() started (the time it passes on with its request) and when the last
    thing it does before handing the job off (installing the guards of a pipelined copy)
    finished."""

    def __init__(self, engine) -> None:
        self._install = engine.snapshots.guards.install
        self._request = engine.request
        self.started: list[float] = []
        self.finished: list[float] = []
        engine.snapshots.guards.install = self._installed
        engine.request = self._requested

    def _requested(self, step, epoch, metrics, name, t0, **kwargs):
        self.started.append(t0)
        return self._request(step, epoch, metrics, name, t0, **kwargs)

    def _installed(self, copy) -> None:
        self._install(copy)
        self.finished.append(time.perf_counter())

    def check(self, taken: list[SnapshotTaken], spans: list[tuple[float, float]]) -> None:
        assert len(taken) == len(spans) == len(self.started) == len(self.finished) == 3
        for event, (t0, t1), entry, installed in zip(taken, spans, self.started,
                                                     self.finished, strict=True):
            assert t0 <= entry and installed - entry <= event.stall <= t1 - t0


def _state() -> dict[str, object]:
    model = torch.nn.Linear(64, 64)
    optim = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optim.step()
    return {"model": model, "optim": optim}


def test_sync_stall_spans_the_whole_call(tmp_path):
    state = _state()
    taken: list[SnapshotTaken] = []
    with Checkpointer(tmp_path, snapshot="pipelined",
                      observers=[lambda e: isinstance(e, SnapshotTaken) and taken.append(e)]
                      ) as ckpt:
        timed = _Timed(ckpt._engine)
        spans = []
        for step in range(3):
            t0 = time.perf_counter()
            ckpt.save(state, step=step)
            t1 = time.perf_counter()
            spans.append((t0, t1))
            ckpt.flush()
        stats = ckpt.stats
    timed.check(taken, spans)
    assert stats.stall_max == max(e.stall for e in taken)


async def test_async_stall_spans_the_whole_call(tmp_path):
    state = _state()
    taken: list[SnapshotTaken] = []
    async with AsyncCheckpointer(
        tmp_path, snapshot="pipelined",
        observers=[lambda e: isinstance(e, SnapshotTaken) and taken.append(e)],
    ) as ckpt:
        timed = _Timed(ckpt._engine)
        spans = []
        for step in range(3):
            t0 = time.perf_counter()
            await ckpt.save(state, step=step)
            t1 = time.perf_counter()
            spans.append((t0, t1))
            await ckpt.flush()
    timed.check(taken, spans)
