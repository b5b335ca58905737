"""Run the differential scenarios through real MindSpore; write the outcomes as JSON.

Runs in MindSpore's virtual environment (see ``run.sh``)::

    python ms_driver.py OUT.json WORKDIR

Time is replayed: a fake clock replaces ``time`` in MindSpore's checkpoint module, and every
checkpoint's mtime is set to the fake time it was saved at, since MindSpore's rotation orders and
windows files by mtime.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mindspore as ms  # noqa: E402
import mindspore.dataset as ds  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import nn  # noqa: E402
from mindspore.train import Callback, CheckpointConfig, Model, ModelCheckpoint  # noqa: E402
from mindspore.train.callback import _checkpoint  # noqa: E402
from scenarios import CLOCK_START, SCENARIOS, VALIDATION  # noqa: E402

ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")


class FakeClock:
    """Stands in for the ``time`` module inside MindSpore's checkpoint module."""

    def __init__(self) -> None:
        self.now = CLOCK_START

    def time(self) -> float:
        return self.now


CLOCK = FakeClock()
_checkpoint.time = CLOCK  # type: ignore[assignment]
_original_save = _checkpoint.save_checkpoint


def _save_with_fake_mtime(save_obj: Any, ckpt_file_name: str, *args: Any, **kwargs: Any) -> Any:
    result = _original_save(save_obj, ckpt_file_name, *args, **kwargs)
    _checkpoint._wait_async_save_ckpt(kwargs.get("async_save", args[1] if len(args) > 1 else False))
    os.utime(ckpt_file_name, (CLOCK.now, CLOCK.now))
    return result


_checkpoint.save_checkpoint = _save_with_fake_mtime


class Boom(Exception):
    """What the raising callback raises."""


class Driver(Callback):
    """Advances the fake clock before each step and raises where the scenario says."""

    def __init__(self, spec: dict[str, Any], batch_num: int) -> None:
        super().__init__()
        self.spec = spec
        self.batch_num = batch_num

    def _maybe_raise(self, hook: str, params: Any, in_epoch: int) -> None:
        at = self.spec["raise_at"]
        if at and at["hook"] == hook:
            epoch = params.get("cur_epoch_num", 0)
            if (at["epoch"], at["step"]) == (epoch, in_epoch):
                raise Boom(f"{hook} {epoch} {in_epoch}")

    def _in_epoch(self, params: Any) -> int:
        return (params.cur_step_num - 1) % self.batch_num + 1

    def begin(self, run_context: Any) -> None:
        self._maybe_raise("begin", {}, 0)

    def epoch_begin(self, run_context: Any) -> None:
        self._maybe_raise("epoch_begin", run_context.original_args(), 0)

    def step_begin(self, run_context: Any) -> None:
        CLOCK.now += self.spec["dt"]
        params = run_context.original_args()
        self._maybe_raise("step_begin", params, self._in_epoch(params))

    def step_end(self, run_context: Any) -> None:
        params = run_context.original_args()
        self._maybe_raise("step_end", params, self._in_epoch(params))


def _dataset(batch_num: int) -> Any:
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((batch_num * 2, 3)).astype(np.float32),
            "y": rng.standard_normal((batch_num * 2, 1)).astype(np.float32)}
    return ds.NumpySlicesDataset(data, shuffle=False).batch(2)


def _append_keys(config: dict[str, Any]) -> list[str]:
    keys: list[str] = []
    for item in config.get("append_info") or []:
        keys.extend([item] if isinstance(item, str) else list(item))
    return sorted(set(keys))


def _describe(path: str, keys: list[str]) -> dict[str, Any]:
    """What a checkpoint holds: its append_info values and whether optimizer state is in it."""
    params = ms.load_checkpoint(path)
    values: dict[str, Any] = {}
    for key in keys:
        if key in params:
            value = params[key]
            values[key] = value if isinstance(value, str) else value.asnumpy().item()
    return {"append": values, "optimizer": "moments.weight" in params}


def ckpt_names(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith((".ckpt", ".safetensors")))


def run_scenario(runs: list[dict[str, Any]], folder: str) -> list[dict[str, Any]]:
    os.makedirs(folder)
    CLOCK.now = CLOCK_START
    out = []
    for spec in runs:
        for name in spec["pre_files"]:
            open(os.path.join(folder, name), "wb").close()
        before = set(ckpt_names(folder))
        net = nn.Dense(3, 1)
        optimizer = nn.Momentum(net.trainable_params(), 0.01, 0.9)
        callbacks = []
        keys: dict[str, list[str]] = {}
        for item in spec["callbacks"]:
            config = dict(item["config"])
            if config.get("saved_network") == "net":
                config["saved_network"] = net
            mc = ModelCheckpoint(prefix=item["prefix"], directory=folder,
                                 config=CheckpointConfig(**config))
            callbacks.append(mc)
        driver = Driver(spec, spec["batch_num"])
        callbacks = [driver, *callbacks] if spec["raiser"] == "first" else [*callbacks, driver]
        keys_all = sorted({k for item in spec["callbacks"] for k in _append_keys(item["config"])})
        model = Model(net, nn.MSELoss(), optimizer)
        error = None
        try:
            model.train(spec["epochs"], _dataset(spec["batch_num"]), callbacks=callbacks,
                        dataset_sink_mode=False, initial_epoch=spec["initial_epoch"])
        except Boom:
            error = "Boom"
        after = ckpt_names(folder)
        new = [n for n in after if n not in before]
        out.append({
            "files": after,
            "prefixes": [mc._prefix for mc in callbacks if isinstance(mc, ModelCheckpoint)],
            "latest": [os.path.basename(mc.latest_ckpt_file_name) for mc in callbacks
                       if isinstance(mc, ModelCheckpoint)],
            "error": error,
            "content": {n: _describe(os.path.join(folder, n), keys_all) for n in new},
        })
        del keys
    return out


def validate(kind: str, kwargs: dict[str, Any], folder: str) -> str:
    try:
        if kind == "config":
            CheckpointConfig(**kwargs)
        else:
            os.makedirs(folder)
            args = {"directory": folder, **kwargs}
            if args.get("config") is None:
                args.pop("config", None)
            ModelCheckpoint(**args)
    except Exception as exc:  # the outcome is the exception's type
        return type(exc).__name__
    return "ok"


def main() -> None:
    out_path, workdir = sys.argv[1], sys.argv[2]
    results: dict[str, Any] = {"version": ms.__version__, "scenarios": {}, "validation": {}}
    for name, runs in SCENARIOS.items():
        try:
            results["scenarios"][name] = run_scenario(runs, os.path.join(workdir, name))
        except Exception:
            results["scenarios"][name] = {"driver_error": traceback.format_exc()}
    for name, (kind, kwargs) in VALIDATION.items():
        results["validation"][name] = validate(kind, kwargs, os.path.join(workdir, "v-" + name))
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
