"""Validation of ``save()``'s arguments (every front door and adapter goes through it)."""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Iterable, Mapping
from typing import get_args

from .._format.best import check_metric_key
from .._format.naming import FilenameTemplate, validate_name
from .config import SnapshotMode
from .handle import SaveHandle
from .queue import Request

__all__ = ["MAX_COUNT", "as_count", "as_metrics", "snapshot_mode"]

#: Steps and epochs fit a signed 64-bit integer (the index refuses larger ones when it reads).
MAX_COUNT = 2**63 - 1


def as_count(value: object, what: str) -> int:
    """An int from 0 to :data:`MAX_COUNT` (Python, numpy or 0-dim tensor integers are accepted;
    bools are not)."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got a bool")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        kind = type(value).__name__
        raise TypeError(f"{what} must be an int, got {kind} {value!r:.40}") from None
    if number < 0:
        raise ValueError(f"{what} must be >= 0, got {number}")
    if number > MAX_COUNT:
        raise ValueError(f"{what} must be at most 2**63 - 1, got a {number.bit_length()}-bit int")
    return number


def as_metrics(metrics: object) -> dict[str, float]:
    """``save(metrics=...)``: a mapping of names to real numbers (0-dim tensors and numpy
    scalars too), as floats. Names are non-empty str without control characters,
    bidirectional overrides or lone surrogates."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        kind = type(metrics).__name__
        raise TypeError(f"metrics must be a mapping of name to number, got {kind}")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metrics keys must be non-empty str, got {key!r}")
        check_metric_key(key, "save(metrics=...)")
        raw = value
        if hasattr(value, "item") and callable(value.item):  # 0-dim tensors, numpy scalars
            try:
                value = value.item()
            except (RuntimeError, ValueError):
                raise TypeError(
                    f"metrics[{key!r}] must be a number; got a tensor/array with "
                    f"{getattr(raw, 'numel', lambda: '?')()} elements"
                ) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"metrics[{key!r}] must be a real number, got {type(raw).__name__}")
        try:
            out[key] = float(value)
        except OverflowError:  # an int beyond float range
            raise ValueError(f"metrics[{key!r}] is too large for a float") from None
    return out


def snapshot_mode(snapshot: object, default: SnapshotMode) -> SnapshotMode:
    """``save(snapshot=...)``: None (the configured ``default``), ``"eager"`` or ``"pipelined"``."""
    if snapshot is None:
        return default
    if not isinstance(snapshot, str) or snapshot not in get_args(SnapshotMode):
        choices = ", ".join(repr(m) for m in get_args(SnapshotMode))
        raise ValueError(f"save(snapshot=...) must be one of {choices}, got {snapshot!r}")
    return snapshot  # type: ignore[return-value]


def build_request(
    step: object,
    epoch: object,
    metrics: object,
    name: object,
    t0: float | None,
    keep: object,
    supersedes: object,
    *,
    template: FilenameTemplate,
    step_of: Callable[[str], int | None],
    wall: float,
    on_raised: Callable[[BaseException], None],
) -> Request:
    """Check ``save()``'s arguments and make its request (no queue slot yet).

    Args:
        template: renders the name when ``name`` is None.
        step_of: the step of the checkpoint (committed or in flight) already called a name.
        wall: the wall-clock time to record.
        on_raised: told when the handle raises a failure to its caller.

    Raises:
        TypeError, ValueError: an argument is invalid, or the name is another step's (unless
            the save names itself in ``supersedes``: an explicit replacement).
    """
    step_ = as_count(step, "step")
    epoch_ = None if epoch is None else as_count(epoch, "epoch")
    metrics_ = as_metrics(metrics)
    if name is None:
        name_ = template.render(step_, epoch_)
    else:
        name_ = validate_name(name, where="save(name=...)")
    if not isinstance(keep, bool):
        raise TypeError(f"keep must be a bool, got {keep!r}")
    if isinstance(supersedes, str) or not isinstance(supersedes, Iterable):
        raise TypeError("supersedes must be a list of checkpoint names")
    superseded = tuple(validate_name(n, where="save(supersedes=...)") for n in supersedes)
    if name_ in superseded:  # an explicit replacement: the other step is intended
        superseded = tuple(n for n in superseded if n != name_)
    else:
        other = step_of(name_)
        if other is not None and other != step_:
            raise ValueError(
                f"checkpoint name {name_!r} for step {step_} is already used by step {other}; "
                f"the filename template {template.template!r} must tell them apart "
                "(include {step}), or pass a distinct name="
            )
    handle = SaveHandle(step_, name_, epoch_, on_raised=on_raised)
    started = time.perf_counter() if t0 is None else t0
    return Request(handle, metrics_, wall, started, keep, superseded)
