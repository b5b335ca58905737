"""Rotation and best pointers: unit cases, and a property test against a tiny reference model."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.helpers import folder_files

import asyncckpt
from asyncckpt import Checkpointer
from asyncckpt._format.retention import KeepEveryNMinutes, KeepLast, KeepPeriod, Retention


@dataclass
class E:
    name: str
    step: int
    time: float


def entries(*spec: tuple[int, float]) -> list[E]:
    return [E(f"s{step}", step, t) for step, t in spec]


def test_keep_last():
    es = entries((1, 0), (2, 1), (3, 2), (4, 3))
    assert KeepLast(2).preserve(es, None) == {"s3", "s4"}
    assert Retention(keep_last=2).victims(es) == ["s1", "s2"]


def test_keep_period_needs_a_limiting_rule_to_matter():
    es = entries((10, 0), (15, 1), (20, 2), (25, 3))
    assert KeepPeriod(10).preserve(es, None) == {"s10", "s20"}
    assert Retention(keep_last=1, keep_period=10).victims(es) == ["s15"]
    assert Retention().victims(es) == []


def test_keep_every_n_minutes_keeps_the_first_of_each_window():
    es = entries((1, 0), (2, 30), (3, 61), (4, 100), (5, 125))
    assert KeepEveryNMinutes(1).preserve(es, 0.0) == {"s1", "s3", "s5"}
    # the newest is always kept
    assert Retention(keep_every_n_minutes=1).victims(es, window_origin=0.0) == ["s2", "s4"]


def test_protected_and_newest_are_never_victims():
    es = entries((1, 0), (2, 1), (3, 2))
    assert Retention(keep_last=1).victims(es, protected={"s1"}) == ["s2"]


# -- property test ------------------------------------------------------------------------------
@dataclass
class Model:
    """The documented retention/best semantics, restated independently of the implementation."""

    keep_last: int | None
    minutes: float | None
    period: int | None
    mode: str | None  # best "score": "greater" / "less" / None (no best pointer)
    entries: list[dict] = field(default_factory=list)
    best: tuple[float, str] | None = None
    origin: float | None = None

    def better(self, value: float, than: float) -> bool:
        return value > than if self.mode == "greater" else value < than

    def recompute_best(self) -> None:
        self.best = None
        for e in self.entries:
            v = e["score"]
            if v is not None and not math.isnan(v) and (
                self.best is None or self.better(v, self.best[0])
            ):
                self.best = (v, e["name"])

    def save(self, step: int, score: float | None, t: float) -> None:
        name = f"step_{step}.pt"
        if any(e["name"] == name for e in self.entries):
            self.entries = [e for e in self.entries if e["name"] != name]
            if self.best is not None and self.best[1] == name:
                self.recompute_best()
        self.entries.append({"name": name, "step": step, "time": t, "score": score})
        if self.origin is None:
            self.origin = t
        if (self.mode and score is not None and not math.isnan(score)
                and (self.best is None or self.better(score, self.best[0]))):
            self.best = (score, name)
        if self.keep_last is None and self.minutes is None:
            return
        keep = {self.entries[-1]["name"]}
        if self.best is not None:
            keep.add(self.best[1])
        if self.keep_last is not None:
            keep |= {e["name"] for e in self.entries[-self.keep_last:]}
        if self.period is not None:
            keep |= {e["name"] for e in self.entries if e["step"] % self.period == 0}
        if self.minutes is not None:
            seen = set()
            for e in self.entries:
                w = math.floor((e["time"] - self.origin) / (self.minutes * 60))
                if w not in seen:
                    seen.add(w)
                    keep.add(e["name"])
        self.entries = [e for e in self.entries if e["name"] in keep]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


scores = st.one_of(st.none(), st.floats(-10, 10), st.just(float("nan")))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("save"), st.integers(0, 30), scores, st.floats(0, 150)),
        st.tuples(st.just("restart")),
    ),
    min_size=1,
    max_size=14,
)
policies = st.tuples(
    st.one_of(st.none(), st.integers(1, 4)),
    st.one_of(st.none(), st.sampled_from([1, 2.5])),
    st.one_of(st.none(), st.integers(2, 5)),
    st.sampled_from([None, "greater", "less"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies, script=ops)
def test_rotation_and_best_match_the_reference_model(policy, script):
    keep_last, minutes, period, mode = policy
    if period is not None and keep_last is None and minutes is None:
        period = None  # rejected by config (tested elsewhere)
    model = Model(keep_last, minutes, period, mode)
    clock = FakeClock()
    options = dict(
        keep_last=keep_last,
        keep_every_n_minutes=minutes,
        keep_period=period,
        best={"score": mode} if mode else None,
        clock=clock,
        storage_options={"fsync": False},  # the property is about bookkeeping, not durability
    )
    with tempfile.TemporaryDirectory() as folder:
        ckpt = Checkpointer(folder, **options)
        try:
            for op in script:
                if op[0] == "restart":
                    ckpt.close()
                    ckpt = Checkpointer(folder, **options)
                else:
                    _, step, score, advance = op
                    clock.now += advance
                    metrics = {} if score is None else {"score": score}
                    ckpt.save({"step": torch.tensor(step)}, step=step, metrics=metrics)
                    ckpt.flush()  # committed, pointers written and rotated files deleted
                    model.save(step, score, clock.now)
                names = [c.name for c in ckpt.checkpoints()]
                assert names == [e["name"] for e in model.entries]
                if mode:
                    best = ckpt.best("score")
                    assert (best.name if best else None) == (model.best[1] if model.best else None)
                assert folder_files(folder) == set(names)  # the disk holds exactly the index
        finally:
            ckpt.close()
        # what a fresh reader sees is the same
        assert [c.name for c in asyncckpt.checkpoints(folder)] == [e["name"] for e in model.entries]


@pytest.mark.parametrize("restart_every", [1, 3])
def test_rotation_counts_across_restarts(tmp_path, restart_every):
    steps = list(range(10, 110, 10))
    ckpt = Checkpointer(tmp_path, keep_last=3, keep_period=50)
    try:
        for i, step in enumerate(steps):
            if i and i % restart_every == 0:
                ckpt.close()
                ckpt = Checkpointer(tmp_path, keep_last=3, keep_period=50)
            ckpt.save({"s": step}, step=step).wait()
    finally:
        ckpt.close()
    assert [c.step for c in asyncckpt.checkpoints(tmp_path)] == [50, 80, 90, 100]
    assert folder_files(tmp_path) == {"step_50.pt", "step_80.pt", "step_90.pt", "step_100.pt"}
