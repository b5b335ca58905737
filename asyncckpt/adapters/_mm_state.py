"""State dicts without data-parallel wrappers, as mmcv's ``get_state_dict`` writes them.

``nn.DataParallel`` and ``DistributedDataParallel`` keep the wrapped module as their child
``module``, so ``model.state_dict()`` names a weight of a wrapped child ``a`` as
``a.module.weight``. mmcv unwraps every wrapper it meets, at the top and inside the model, and
saves ``a.weight``; loading maps the names back onto whatever wrappers the model has then.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["state_dict_without_wrappers", "unwrap", "weights_for"]

_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)
_MODULE = "module."


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside any number of data-parallel wrappers."""
    while isinstance(model, _WRAPPERS):
        model = model.module
    return model


def _wrapper_prefixes(model: nn.Module) -> list[str]:
    """The key prefixes (``"a."``, ``""`` for the model itself) of the wrappers inside
    ``model``, deepest first, so that nested wrappers unwind from the inside out."""
    prefixes = [f"{name}." if name else "" for name, module in model.named_modules()
                if isinstance(module, _WRAPPERS)]
    return sorted(prefixes, key=len, reverse=True)


def _strip(key: str, prefixes: list[str]) -> str:
    for prefix in prefixes:
        if key.startswith(prefix + _MODULE):
            key = prefix + key[len(prefix) + len(_MODULE):]
    return key


def state_dict_without_wrappers(model: nn.Module) -> dict[str, Any]:
    """``model``'s state dict (wrappers at the top removed) with the ``module.`` level of every
    wrapped child left out of the keys, like mmcv's ``get_state_dict``.

    Raises:
        ValueError: two keys become one (a module holding both a wrapper and a child that
            would take the unwrapped names).
    """
    model = unwrap(model)
    state = model.state_dict()
    prefixes = _wrapper_prefixes(model)
    if not prefixes:
        return state
    out: OrderedDict[str, Any] = OrderedDict()
    for key, value in state.items():
        new = _strip(key, prefixes)
        if new in out:
            raise ValueError(
                f"state dict key {key!r} becomes {new!r} without its wrapper, which another "
                "entry already has"
            )
        out[new] = value
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:  # per-module versions, keyed by module name without the dot
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            (_strip(f"{name}.", prefixes)[:-1] if name else name, value)
            for name, value in metadata.items()
        )
    return out


def weights_for(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` (saved by mmcv, by us, or from a wrapped model) with its keys renamed to
    those ``unwrap(model).load_state_dict`` expects: a leading ``module.`` is removed (mmcv's
    default ``revise_keys``), and names of weights inside wrapped children get their
    ``module.`` level back. Keys that match nothing are passed on unchanged."""
    model = unwrap(model)
    prefixes = _wrapper_prefixes(model)
    own = {_strip(key, prefixes): key for key in model.state_dict()}
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key.startswith(_MODULE):
            key = key[len(_MODULE):]
        out[own.get(key, key)] = value
    return out
