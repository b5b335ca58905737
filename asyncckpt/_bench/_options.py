"""Benchmark options: one frozen, validated dataclass built from the command line."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .._core.config import SnapshotMode, WhenFull

__all__ = [
    "LAYOUTS",
    "BenchOptions",
    "Layout",
    "format_size",
    "parse_size",
    "parse_storage_options",
    "snapshot_modes",
]

Layout = Literal["model", "few-big", "many-small", "tiny-many"]
LAYOUTS: tuple[str, ...] = get_args(Layout)

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def snapshot_modes() -> tuple[str, ...]:
    """The snapshot modes the installed asyncckpt supports (read from ``SnapshotMode``)."""
    return tuple(get_args(SnapshotMode))


def parse_size(text: str) -> int:
    """``"256MiB"`` -> 268435456. Units: B, kB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB and
    the shorthands K/M/G/T (powers of 1024).

    Raises:
        ValueError: the text is not a size, or the size is below 1 KiB.
    """
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 256MiB, 1GiB, 4MB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1024:
        raise ValueError(f"size {text!r} is below the 1 KiB minimum")
    return value


def format_size(n: float) -> str:
    """Binary units, as people write state sizes: ``1 GiB``, ``256 MiB``, ``3.5 MiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.3g} {unit}"
    return f"{n:.0f} B"


def parse_storage_options(items: Iterable[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict; values are read as JSON when they parse (``true``, ``4``,
    ``"x"``), else kept as strings (``endpoint_url=http://127.0.0.1:5555``).

    Raises:
        ValueError: an item has no ``=`` or an empty key, or a key is given twice.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--storage-option {item!r}: write key=value")
        if key in out:
            raise ValueError(f"--storage-option {key!r} is given twice")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _choices(values: Sequence[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    if not values:
        raise ValueError(f"{what}: give at least one of {', '.join(allowed)}")
    for value in values:
        if value not in allowed:
            raise ValueError(f"{what}: {value!r} is not one of {', '.join(allowed)}")
    return tuple(dict.fromkeys(values))


@dataclass(frozen=True)
class BenchOptions:
    """What one ``asyncckpt bench`` run measures (see ``asyncckpt bench --help``).

    Args:
        sizes: state sizes in bytes.
        layouts: state layouts (``model``: an MLP + Adam state; ``few-big``: 64 MiB tensors;
            ``many-small``: 256 KiB tensors; ``tiny-many``: 64-byte tensors).
        dest: where checkpoints go: a local folder or a URI (``s3://bucket/prefix``); None: a
            folder inside ``out`` that is removed at the end.
        storage_options: backend options, passed to asyncckpt and to fsspec.
        saves: saves per contender, per size and layout (the first ``warmup`` are not counted
            in the steady state; the first is also reported on its own).
        warmup: saves discarded from the steady-state figures.
        queue_size, when_full: asyncckpt's queue settings.
        modes: asyncckpt snapshot modes to measure.
        direct_io: also measure asyncckpt with ``LocalStorage(direct_io=True)`` (local only).
        device: where the state lives (``cpu`` or ``cuda``).
        contenders: contender ids to run (None: every available one).
        training: run the training-loop scenario.
        train_size: state size of the training-loop model (params + Adam state).
        train_rounds: training rounds; each contender runs ``save_every`` steps per round and
            saves once in it (the first round is a warm-up).
        save_every: steps between saves in the training loop.
        train_batch: batch size of the training loop.
        out: output folder for results.json, results.md and the plots.
        progress: show a progress bar.
        seed: RNG seed for the states.
    """

    sizes: tuple[int, ...] = (2**30,)
    layouts: tuple[str, ...] = ("model",)
    dest: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    saves: int = 8
    warmup: int = 2
    queue_size: int = 1
    when_full: str = "block"
    modes: tuple[str, ...] = field(default_factory=snapshot_modes)
    direct_io: bool = True
    device: str = "cpu"
    contenders: tuple[str, ...] | None = None
    training: bool = True
    train_size: int = 256 * 2**20
    train_rounds: int = 4
    save_every: int = 10
    train_batch: int = 64
    out: str = "bench-out"
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sizes or any(s < 1024 for s in self.sizes):
            raise ValueError(f"sizes must be >= 1 KiB, got {self.sizes}")
        object.__setattr__(self, "layouts", _choices(self.layouts, LAYOUTS, "--layout"))
        object.__setattr__(self, "modes", _choices(self.modes, snapshot_modes(), "--mode"))
        if self.when_full not in get_args(WhenFull):
            raise ValueError(
                f"--when-full must be one of {', '.join(get_args(WhenFull))}, "
                f"got {self.when_full!r}"
            )
        for name, low in (("saves", 1), ("queue_size", 1), ("train_rounds", 1),
                          ("save_every", 1), ("train_batch", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= {low}, "
                                 f"got {value!r}")
        if not isinstance(self.warmup, int) or not 0 <= self.warmup < self.saves:
            raise ValueError(
                f"--warmup must be >= 0 and below --saves ({self.saves}), got {self.warmup!r}"
            )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.train_size < 1024:
            raise ValueError(f"--train-size must be >= 1 KiB, got {self.train_size}")
