"""Best-metric rules: which direction of a metric is better, inferred as mmengine does."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from .naming import unsafe_character

__all__ = [
    "DEFAULT_GREATER_KEYS",
    "DEFAULT_LESS_KEYS",
    "BestMetric",
    "Mode",
    "RuleInferenceError",
    "check_metric_key",
    "check_metric_name",
    "infer_mode",
    "normalize_best",
]

Mode = Literal["greater", "less"]

#: mmengine's defaults (``CheckpointHook._default_greater_keys`` / ``_default_less_keys``).
DEFAULT_GREATER_KEYS: tuple[str, ...] = (
    "acc", "top", "AR@", "auc", "precision", "mAP", "mDice", "mIoU", "mAcc", "aAcc",
)
DEFAULT_LESS_KEYS: tuple[str, ...] = ("loss",)


def check_metric_key(name: object, where: str) -> str:
    """A metric key as ``save(metrics=...)`` and the index store it: a non-empty str without
    control characters, bidirectional overrides or lone surrogates (see
    :func:`~asyncckpt._format.naming.unsafe_character`).

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: it is empty or holds a character that cannot be stored or printed safely.
    """
    if not isinstance(name, str):
        raise TypeError(f"{where}: metric names must be str, got {type(name).__name__}")
    if not name:
        raise ValueError(f"{where}: a metric name is empty")
    problem = unsafe_character(name)
    if problem is not None:
        raise ValueError(f"{where}: metric name {name!r}: {problem}")
    return name


def check_metric_name(name: object, where: str) -> str:
    """A metric with a best pointer: :func:`check_metric_key`, no surrounding whitespace, at
    most 200 characters."""
    key = check_metric_key(name, where)
    if key != key.strip():
        raise ValueError(f"{where}: metric name {key!r} is empty or has surrounding whitespace")
    if len(key) > 200:
        raise ValueError(f"{where}: metric name {key[:40]!r}... is longer than 200 characters")
    return key


class RuleInferenceError(ValueError):
    """Whether a greater or a smaller value of a metric is better cannot be inferred.

    Attributes:
        metric: the metric name.
        reason: why, in a few words (e.g. "it matches none of the known metric keys").
    """

    def __init__(self, metric: str, reason: str) -> None:
        super().__init__(
            f"cannot infer whether a greater or a smaller {metric!r} is better: {reason}; "
            f"pass the rule explicitly, e.g. best={{{metric!r}: 'greater'}}"
        )
        self.metric = metric
        self.reason = reason


def infer_mode(
    name: str,
    greater_keys: Iterable[str] = DEFAULT_GREATER_KEYS,
    less_keys: Iterable[str] = DEFAULT_LESS_KEYS,
) -> Mode:
    """Infer whether a larger or a smaller value of metric ``name`` is better.

    Case-insensitive exact match against the greater keys, then the less keys; then substring
    match. Unlike mmengine, a name whose substrings match both sides (``heatmap_loss`` contains both
    ``map`` and ``loss``) or neither is an error rather than a guess.

    Raises:
        RuleInferenceError: (a ValueError) the rule cannot be inferred unambiguously; pass it
            explicitly.
    """
    lc = name.lower()
    greater = {k.lower() for k in greater_keys}
    less = {k.lower() for k in less_keys}
    if lc in greater and lc not in less:
        return "greater"
    if lc in less and lc not in greater:
        return "less"
    g = sorted(k for k in greater if k in lc)
    s = sorted(k for k in less if k in lc)
    if g and not s:
        return "greater"
    if s and not g:
        return "less"
    if g and s:
        reason = f"it contains both {g[0]!r} (greater is better) and {s[0]!r} (less is better)"
    else:
        reason = "it matches none of the known metric keys"
    raise RuleInferenceError(name, reason)


@dataclass(frozen=True)
class BestMetric:
    """A metric with a best pointer: ``mode`` says which direction is better."""

    name: str
    mode: Mode

    def __post_init__(self) -> None:
        check_metric_name(self.name, "best")
        if self.mode not in get_args(Mode):
            raise ValueError(
                f"best[{self.name!r}]: mode must be 'greater' or 'less', got {self.mode!r}"
            )

    def is_better(self, value: float, than: float | None) -> bool:
        """Whether ``value`` strictly improves on ``than`` (None: no best yet). NaN never does."""
        if math.isnan(value):
            return False
        if than is None:
            return True
        return value > than if self.mode == "greater" else value < than


def normalize_best(best: object) -> tuple[BestMetric, ...]:
    """Turn the user's ``best=`` argument into ``BestMetric`` objects.

    Accepts ``None``; a metric name; a mapping of name to ``'greater'``/``'less'``/``None``
    (None: infer); or an iterable of names / ``BestMetric``. Names without a rule are inferred
    with :func:`infer_mode`.

    Raises:
        TypeError: the argument has the wrong shape.
        ValueError: a rule is invalid or cannot be inferred, or a metric is named twice.
    """
    if best is None:
        return ()
    items: list[tuple[object, object]]
    if isinstance(best, str):
        items = [(best, None)]
    elif isinstance(best, Mapping):
        items = list(best.items())
    elif isinstance(best, Iterable):
        items = []
        for item in best:
            if isinstance(item, BestMetric):
                items.append((item.name, item.mode))
            else:
                items.append((item, None))
    else:
        raise TypeError(
            "best must be a metric name, a mapping {name: 'greater'|'less'} or a list of names, "
            f"got {type(best).__name__}"
        )
    out: list[BestMetric] = []
    seen: set[str] = set()
    for name, mode in items:
        name = check_metric_name(name, "best")
        if name in seen:
            raise ValueError(f"best: metric {name!r} is given twice")
        seen.add(name)
        if mode is None:
            mode = infer_mode(name)
        if mode not in get_args(Mode):
            raise ValueError(f"best[{name!r}]: rule must be 'greater' or 'less', got {mode!r}")
        out.append(BestMetric(name, mode))  # type: ignore[arg-type]
    return tuple(out)
