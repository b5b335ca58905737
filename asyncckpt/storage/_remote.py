"""Helpers shared by the remote backends (S3, generic fsspec): optional imports, error chains."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["caused_by", "require"]


def require(module: str, scheme: str) -> Any:
    """Import an optional dependency of the ``scheme://`` backends, or say which extra has it.

    Raises:
        ImportError: the module is missing; the message names ``pip install 'asyncckpt[s3]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{scheme}:// checkpoint locations need the optional dependency {module!r}: "
            "pip install 'asyncckpt[s3]'"
        ) from exc


def caused_by(exc: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    """Whether ``exc`` or an exception in its ``__cause__`` chain is one of ``types``.

    s3fs and fsspec translate backend errors into ``OSError`` subclasses and chain the
    original, so the original is where the truth is.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, types):
            return True
        seen = seen.__cause__
    return False
