"""Paths of values inside a state tree (a leaf: imports nothing of asyncckpt)."""

from __future__ import annotations

__all__ = ["PathKey"]

#: The keys / indices from a state's root to one value, e.g. ``("optim", "state", 0, "exp_avg")``.
PathKey = tuple[str | int, ...]
