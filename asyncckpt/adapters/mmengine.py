"""mmengine adapter: :class:`AsyncCheckpointHook`, a drop-in for mmengine's ``CheckpointHook``.

Importing this module registers the hook in mmengine's ``HOOKS`` registry, so a config only needs::

    custom_imports = dict(imports=['asyncckpt.adapters.mmengine'], allow_failed_imports=False)
    default_hooks = dict(checkpoint=dict(type='AsyncCheckpointHook', interval=1))

Checkpoints are mmengine's (same names, same dict layout: ``meta``, ``state_dict``, ``optimizer``,
``param_schedulers``, ``message_hub``), written asynchronously and committed atomically.
:func:`register_safe_globals` (called by the hook) lets ``torch.load(weights_only=True)``, and so
``Runner(resume=True)`` under torch >= 2.6, read them.

Needs the ``mmengine`` extra: ``pip install 'asyncckpt[mmengine]'``.
"""

from __future__ import annotations

try:
    from mmengine.registry import HOOKS
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "asyncckpt.adapters.mmengine needs mmengine: pip install 'asyncckpt[mmengine]'"
    ) from exc

from ._mmengine_compat import HookTypeError, HookValueError, RuleError, register_safe_globals
from ._mmengine_hook import AsyncCheckpointHook

__all__ = [
    "AsyncCheckpointHook",
    "HookTypeError",
    "HookValueError",
    "RuleError",
    "register_safe_globals",
]

if "AsyncCheckpointHook" not in HOOKS.module_dict:
    HOOKS.register_module(module=AsyncCheckpointHook)
