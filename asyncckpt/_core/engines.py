"""Which engine a front door gets: the single-process one, or the multi-rank one when
``torch.distributed`` runs several ranks (see ``CheckpointerConfig.distributed``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from ..storage import Storage
from .config import CheckpointerConfig
from .engine import Engine
from .reporting import Observer

__all__ = ["make_engine"]


def make_engine(
    storage: Storage,
    config: CheckpointerConfig,
    *,
    observers: Iterable[Observer] = (),
    clock: Callable[[], float] = time.time,
) -> Engine:
    """The engine for ``config`` (multi-rank under torch.distributed, unless turned off).

    Raises:
        ValueError: multi-rank checkpoints were asked for but cannot run (torch.distributed
            not initialized, an option they do not support, a store not every rank sees).
    """
    if config.multi_rank:
        from .dist_engine import DistEngine

        return DistEngine(storage, config, observers=observers, clock=clock)
    return Engine(storage, config, observers=observers, clock=clock)
