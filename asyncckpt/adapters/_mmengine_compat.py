"""What the mmengine hook shares with mmengine's own ``CheckpointHook`` semantics.

* Exceptions: mmengine validates several arguments with ``assert`` (``AssertionError``) and an
  unknown ``rule`` with ``KeyError``. We raise real ``TypeError`` / ``ValueError`` that are *also*
  instances of the type mmengine raised, so code written against ``CheckpointHook`` still catches
  them, and the checks survive ``python -O``.
* The message hub's ``HistoryBuffer`` pickles its class-level statistics functions through
  ``builtins.getattr``, which a ``weights_only`` loader must never allowlist. The hook writes
  HistoryBuffers without them (``__setstate__`` restores the defaults), so that loading needs only
  ``HistoryBuffer`` and numpy's array globals: :func:`register_safe_globals` allowlists exactly
  those.
* Argument parsing for ``CheckpointHook``'s constructor.
* ``file_client`` / ``file_backend``: mmengine's own file objects for the output location, which
  other hooks and user code read from a ``CheckpointHook``.
"""

from __future__ import annotations

import copyreg
import logging
import os
import string
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from mmengine.fileio import FileClient, get_file_backend
from mmengine.logging import HistoryBuffer, print_log

from asyncckpt import infer_mode

from .._format.best import RuleInferenceError
from .._format.naming import validate_name

Mode = Literal["greater", "less"]
Reducer = Callable[[Any], tuple[Any, ...]]

__all__ = [
    "EXTRA_TYPES",
    "HookTypeError",
    "HookValueError",
    "RuleError",
    "check_backend_args",
    "check_filename_tmpl",
    "infer_rule",
    "mmengine_file_backend",
    "mmengine_file_client",
    "join_path",
    "parse_published_keys",
    "parse_rules",
    "parse_save_best",
    "parse_str_keys",
    "register_safe_globals",
    "storage_options_from",
]


class HookTypeError(TypeError, AssertionError):
    """An argument has the wrong type (mmengine's ``CheckpointHook`` asserts it)."""


class HookValueError(ValueError, AssertionError):
    """An argument has an invalid value (mmengine's ``CheckpointHook`` asserts it)."""


class RuleError(ValueError, KeyError):
    """``rule`` is not ``'greater'``, ``'less'`` or None (mmengine raises ``KeyError``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _reduce_history_buffer(buffer: HistoryBuffer) -> tuple[Any, ...]:
    # HistoryBuffer.__getstate__ adds the class-wide ``statistics_methods`` (functions, pickled as
    # getattr(HistoryBuffer, 'mean'), ...). Leave them out: __setstate__ re-registers the
    # defaults, and custom methods are registered by the code that defines them.
    state = {k: v for k, v in vars(buffer).items() if k != "statistics_methods"}
    # copyreg.__newobj__ makes pickle emit NEWOBJ (cls.__new__(cls)), which weights_only allows
    return (copyreg.__newobj__, (type(buffer),), state)  # type: ignore[attr-defined]


# dtype codes of the numeric numpy dtypes: bool, signed/unsigned ints, floats, complex.
_NUMERIC_DTYPES = "?bBhHiIlLqQefdgFDG"
_NUMERIC_SCALARS = tuple(dict.fromkeys(np.dtype(code).type for code in _NUMERIC_DTYPES))

#: Passed to the core as ``extra_types``: the message hub's buffers, and numpy arrays and numpy
#: scalars kept as they are (mmengine's ``torch.save`` keeps them; the core would store arrays as
#: tensors and scalars as Python numbers).
EXTRA_TYPES: dict[type, Reducer | None] = {
    HistoryBuffer: _reduce_history_buffer,
    np.ndarray: None,
    **{scalar: None for scalar in _NUMERIC_SCALARS},
}


def register_safe_globals() -> None:
    """Allowlist what the hook's checkpoints need for ``torch.load(weights_only=True)``.

    Exactly mmengine's ``HistoryBuffer`` and the globals numpy arrays and scalars of numeric
    dtypes pickle to (``numpy.ndarray``, ``numpy.dtype``, the numeric dtype classes,
    ``_reconstruct`` and ``scalar`` under their numpy 1 and numpy 2 module names). Nothing that
    calls arbitrary code (``getattr``) is added, so checkpoints written by mmengine's own
    ``CheckpointHook`` still need ``weights_only=False``. Idempotent; ``AsyncCheckpointHook``
    calls it when it is created.
    """
    multiarray = (getattr(np, "_core", None) or np.core).multiarray
    dtype_classes = {type(np.dtype(code)) for code in _NUMERIC_DTYPES}
    module_names = ("numpy.core.multiarray", "numpy._core.multiarray")
    torch.serialization.add_safe_globals(
        [
            HistoryBuffer,
            np.ndarray,
            np.dtype,
            *sorted(dtype_classes, key=lambda cls: cls.__name__),
            *[(multiarray._reconstruct, f"{m}._reconstruct") for m in module_names],
            *[(multiarray.scalar, f"{m}.scalar") for m in module_names],
        ]
    )


# -- constructor arguments -------------------------------------------------------------------------
def _is_str_sequence(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _distinct_names(value: object, what: str, type_error: type[TypeError]) -> list[str] | None:
    """None, or a str / list / tuple of distinct str as a list."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not _is_str_sequence(value):
        raise type_error(
            f'"{what}" should be a str or a sequence of str or None, but got {type(value)}'
        )
    names = list(value)  # type: ignore[call-overload]
    if len(set(names)) != len(names):
        raise HookValueError(f'Find duplicate element in "{what}": {names}')
    return names


def parse_save_best(save_best: object) -> list[str] | None:
    """``save_best``: None, a metric name, ``'auto'`` or a list of distinct names."""
    names = _distinct_names(save_best, "save_best", HookTypeError)
    if names is not None and "auto" in names and len(names) > 1:
        raise HookValueError(f'Only support one "auto" in "save_best" list, got {names}')
    return names


def infer_rule(key: str, greater_keys: Sequence[str], less_keys: Sequence[str]) -> Mode:
    """Infer the rule like mmengine (exact, then substring; case-insensitive), except that a key
    matching both sides (``heatmap_loss`` contains ``map`` and ``loss``) is an error instead of
    silently 'greater'.

    Raises:
        ValueError: no rule or no unambiguous rule can be inferred.
    """
    try:
        return infer_mode(key, greater_keys, less_keys)
    except RuleInferenceError as exc:
        raise ValueError(
            f"Cannot infer the rule for key {key}, thus a specific rule must be specified: "
            f"{exc.reason}; pass rule='greater' or rule='less'"
        ) from None


def parse_rules(
    rule: object,
    save_best: list[str] | None,
    greater_keys: Sequence[str],
    less_keys: Sequence[str],
) -> list[Mode | None]:
    """One rule per ``save_best`` key (None only for ``'auto'``, inferred at the first evaluation).

    Raises:
        HookTypeError: ``rule`` is not a str, a list of str or None.
        HookValueError: the list's length is neither 1 nor ``len(save_best)``.
        RuleError: a rule is not 'greater', 'less' or None.
        ValueError: a rule cannot be inferred from its key.
    """
    if rule is not None and not isinstance(rule, str) and not _is_str_sequence(rule):
        raise HookTypeError(f'"rule" should be a str or list of str or None, but got {type(rule)}')
    rules: list[object] = list(rule) if isinstance(rule, (list, tuple)) else [rule]
    if save_best is None:
        if len(rules) > 1:
            raise HookValueError('"rule" is a list but "save_best" is None')
        return []
    if len(rules) not in (1, len(save_best)):
        raise HookValueError(
            f'Number of "rule" must be 1 or the same as number of "save_best", but got '
            f"{len(rules)}."
        )
    if len(rules) == 1:
        rules = rules * len(save_best)
    out: list[Mode | None] = []
    for key, item in zip(save_best, rules, strict=True):
        if item is not None and item not in ("greater", "less"):
            raise RuleError(f"rule must be greater, less or None, but got {item}.")
        if item is None and key != "auto":
            item = infer_rule(key, greater_keys, less_keys)
        out.append(item)
    return out


def parse_str_keys(keys: object, default: list[str], what: str) -> Sequence[str]:
    """``greater_keys`` / ``less_keys``: None (mmengine's defaults), a str or a sequence of str.

    As in mmengine, a single str becomes a 1-tuple and a list or tuple is kept as given.
    """
    if keys is None:
        return default
    if isinstance(keys, str):
        return (keys,)
    if not _is_str_sequence(keys):
        raise HookTypeError(f'"{what}" should be a str or a sequence of str, but got {keys!r}')
    return keys  # type: ignore[return-value]


def parse_published_keys(keys: object) -> list[str] | None:
    """``published_keys``: None, a str or a sequence of distinct str (mmengine raises a plain
    TypeError for the wrong type)."""
    return _distinct_names(keys, "published_keys", TypeError)


def check_backend_args(file_client_args: object, backend_args: object) -> None:
    """Both are dicts or None, not both given; ``file_client_args`` warns that it is deprecated
    (as a log line and a ``DeprecationWarning``, like mmengine).

    Raises:
        TypeError: one is not a dict.
        ValueError: both are given.
    """
    if file_client_args is not None:
        message = (
            '"file_client_args" will be deprecated in future. Please use "backend_args" instead'
        )
        print_log(message, logger="current", level=logging.WARNING)
        warnings.warn(message, DeprecationWarning, stacklevel=3)
        if backend_args is not None:
            raise ValueError(
                '"file_client_args" and "backend_args" cannot be set at the same time.'
            )
    for what, args in (("file_client_args", file_client_args), ("backend_args", backend_args)):
        if args is not None and not isinstance(args, dict):
            raise TypeError(f'"{what}" should be a dict or None, but got {type(args)}')


def check_filename_tmpl(tmpl: object) -> str:
    """``filename_tmpl``: exactly one ``{}`` field (a format spec such as ``{:04d}`` is allowed)
    that renders a plain file name.

    Raises:
        TypeError: it is not a str.
        ValueError: it has no field or several, a named field, or renders an unsafe name.
    """
    if not isinstance(tmpl, str):
        raise TypeError(f'"filename_tmpl" should be a str, but got {type(tmpl)}')
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(tmpl) if f is not None]
    except ValueError as exc:
        raise ValueError(f'"filename_tmpl" {tmpl!r} is malformed: {exc}') from None
    if len(fields) != 1 or fields[0] not in ("", "0"):
        raise ValueError(
            f'"filename_tmpl" must contain exactly one "{{}}" (the epoch or iteration), '
            f"got {tmpl!r}"
        )
    try:
        rendered = tmpl.format(1)
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise ValueError(f'"filename_tmpl" {tmpl!r} cannot format a step: {exc}') from None
    validate_name(rendered, where=f'"filename_tmpl" {tmpl!r}')
    return tmpl


def is_uri(location: str) -> bool:
    head, sep, _ = location.partition("://")
    return bool(sep) and head.isidentifier()


def join_path(base: str, name: str) -> str:
    """``base`` joined with ``name`` as mmengine's file backends join them."""
    if is_uri(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


_LOCAL_BACKENDS = frozenset({"local", "disk"})


def storage_options_from(
    backend_args: dict[str, Any] | None,
    file_client_args: dict[str, Any] | None,
    location: str,
) -> dict[str, Any]:
    """Translate mmengine's ``backend_args`` (or the deprecated ``file_client_args``) into the
    core's ``storage_options``: every key but ``backend`` is passed to the storage backend.

    Raises:
        TypeError: the arguments are not dicts.
        ValueError: ``backend`` names an mmengine backend for a local folder that asyncckpt does
            not provide (petrel, memcached, lmdb, http); use a URI ``out_dir`` instead.
    """
    args = backend_args if backend_args is not None else file_client_args
    if args is None:
        return {}
    what = "backend_args" if backend_args is not None else "file_client_args"
    if not isinstance(args, dict):
        raise TypeError(f'"{what}" should be a dict or None, but got {type(args)}')
    options = dict(args)
    backend: Literal[None] | str = options.pop("backend", None)
    if backend is not None and backend not in _LOCAL_BACKENDS and not is_uri(location):
        raise ValueError(
            f'"{what}" selects the mmengine backend {backend!r}, which asyncckpt does not '
            f"provide; checkpoints go to {location!r} (a local folder). Use a URI out_dir "
            "(e.g. 's3://bucket/prefix') whose backend asyncckpt supports."
        )
    return options


# -- mmengine's file objects ---------------------------------------------------------------------
def _no_file_object(what: str, location: str, exc: Exception) -> AttributeError:
    return AttributeError(
        f"AsyncCheckpointHook.{what}: mmengine has no file backend for {location!r} here "
        f"({type(exc).__name__}: {exc}). The hook writes its checkpoints through asyncckpt and "
        "does not need one; read them with asyncckpt.load()."
    )


def mmengine_file_client(file_client_args: dict[str, Any] | None, location: str) -> Any:
    """The ``FileClient`` mmengine's ``CheckpointHook`` makes for ``location`` (its ``out_dir``
    before the work dir's name is appended).

    Raises:
        AttributeError: mmengine cannot make one for this location (e.g. ``s3://`` without
            petrel_client); the message says why.
    """
    try:
        return FileClient.infer_client(file_client_args, location)
    except Exception as exc:
        raise _no_file_object("file_client", location, exc) from exc


def mmengine_file_backend(backend_args: dict[str, Any] | None, location: str) -> Any:
    """The storage backend mmengine's ``CheckpointHook`` makes for ``location`` with
    ``backend_args`` (``LocalBackend`` for a folder). Only the ``backend`` key is mmengine's:
    the other keys are asyncckpt storage options, and ``'disk'`` is mmengine's old name for
    ``'local'``.

    Raises:
        AttributeError: mmengine cannot make one for this location; the message says why.
    """
    args = None
    if backend_args is not None and backend_args.get("backend") in _LOCAL_BACKENDS:
        args = {"backend": "local"}
    try:
        return get_file_backend(location, backend_args=args)
    except Exception as exc:
        raise _no_file_object("file_backend", location, exc) from exc
