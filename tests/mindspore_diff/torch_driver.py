"""Run the differential scenarios through asyncckpt's MindSpore adapter; outcomes as
``ms_driver.py`` reports them."""

from __future__ import annotations

import os
from typing import Any

import torch

from asyncckpt.adapters.mindspore import (
    Callback,
    CheckpointConfig,
    Model,
    ModelCheckpoint,
    RunContext,
    load_checkpoint,
)

from .scenarios import CLOCK_START, SCENARIOS, VALIDATION


class FakeClock:
    """Seconds since the epoch, moved by the driver."""

    def __init__(self) -> None:
        self.now = CLOCK_START

    def __call__(self) -> float:
        return self.now


class Boom(Exception):
    """What the raising callback raises."""


class Driver(Callback):
    """Advances the fake clock before each step and raises where the scenario says."""

    def __init__(self, spec: dict[str, Any], clock: FakeClock) -> None:
        self.spec = spec
        self.clock = clock

    def _maybe_raise(self, hook: str, run_context: RunContext) -> None:
        at = self.spec["raise_at"]
        if at and at["hook"] == hook:
            params = run_context.original_args()
            where = (params.cur_epoch_num, params.cur_step_in_epoch) if hook != "begin" else (0, 0)
            if (at["epoch"], at["step"]) == where:
                raise Boom(f"{hook} {where}")

    def begin(self, run_context: RunContext) -> None:
        self._maybe_raise("begin", run_context)

    def epoch_begin(self, run_context: RunContext) -> None:
        self._maybe_raise("epoch_begin", run_context)

    def step_begin(self, run_context: RunContext) -> None:
        self.clock.now += self.spec["dt"]
        self._maybe_raise("step_begin", run_context)

    def step_end(self, run_context: RunContext) -> None:
        self._maybe_raise("step_end", run_context)


def _dataset(batch_num: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, generator=g), torch.randn(2, 1, generator=g))
            for _ in range(batch_num)]


def _append_keys(config: dict[str, Any]) -> list[str]:
    keys: list[str] = []
    for item in config.get("append_info") or []:
        keys.extend([item] if isinstance(item, str) else list(item))
    return sorted(set(keys))


def _describe(path: str, keys: list[str]) -> dict[str, Any]:
    state = load_checkpoint(path)
    values = {k: (v.item() if isinstance(v, torch.Tensor) else v)
              for k, v in state.items() if k in keys}
    return {"append": values, "optimizer": "optimizer" in state}


def ckpt_names(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith((".ckpt", ".safetensors")))


def run_scenario(runs: list[dict[str, Any]], folder: str) -> list[dict[str, Any]]:
    os.makedirs(folder)
    clock = FakeClock()
    out = []
    for spec in runs:
        for name in spec["pre_files"]:
            open(os.path.join(folder, name), "wb").close()
        before = set(ckpt_names(folder))
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        checkpoints = []
        for item in spec["callbacks"]:
            config = dict(item["config"])
            if config.get("saved_network") == "net":
                config["saved_network"] = net
            checkpoints.append(ModelCheckpoint(prefix=item["prefix"], directory=folder,
                                               config=CheckpointConfig(**config), clock=clock))
        driver = Driver(spec, clock)
        callbacks = ([driver, *checkpoints] if spec["raiser"] == "first"
                     else [*checkpoints, driver])
        keys = sorted({k for item in spec["callbacks"] for k in _append_keys(item["config"])})
        error = None
        try:
            Model(net, torch.nn.functional.mse_loss, optimizer).train(
                spec["epochs"], _dataset(spec["batch_num"]), callbacks=callbacks,
                initial_epoch=spec["initial_epoch"])
        except Boom:
            error = "Boom"
        after = ckpt_names(folder)
        out.append({
            "files": after,
            "prefixes": [mc.prefix for mc in checkpoints],
            "latest": [os.path.basename(mc.latest_ckpt_file_name) for mc in checkpoints],
            "error": error,
            "content": {n: _describe(os.path.join(folder, n), keys)
                        for n in after if n not in before},
        })
    return out


def validate(kind: str, kwargs: dict[str, Any], folder: str) -> str:
    try:
        if kind == "config":
            CheckpointConfig(**kwargs)
        else:
            os.makedirs(folder)
            ModelCheckpoint(**{"directory": folder, **kwargs}).close()
    except Exception as exc:  # the outcome is the exception's type
        return type(exc).__name__
    return "ok"


def run_all(workdir: str) -> dict[str, Any]:
    """Every scenario and validation case, as ``ms_driver.main`` writes them."""
    return {
        "scenarios": {name: run_scenario(runs, os.path.join(workdir, name))
                      for name, runs in SCENARIOS.items()},
        "validation": {name: validate(kind, kwargs, os.path.join(workdir, "v-" + name))
                       for name, (kind, kwargs) in VALIDATION.items()},
    }
