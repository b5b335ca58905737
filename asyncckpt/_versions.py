"""The torch releases asyncckpt runs on, checked once when ``asyncckpt`` is imported.

torch 2.7 is the floor. From 2.7 on, asyncckpt's files are byte for byte what that torch's own
``torch.save`` writes (2.7 added the ``.format_version`` record and writes storages in the order
they are met; 2.6 sorts them by key); its ``torch.load(weights_only=True)`` reads everything a
checkpoint may hold (``bytes`` values from 2.5, ``uint16`` / ``uint32`` / ``uint64`` tensors,
which 2.6 is also the first to save, and globals allowlisted under a second module name, which
the mmengine adapter needs for numpy 1 and 2 files, from 2.6); and multi-rank checkpoints use
DCP's ``load(no_dist=...)``, new in 2.7. ``pyproject.toml`` requires the same release, so pip
never installs an older one; the check here, run when this module is imported (``asyncckpt``
imports it first), catches a torch that pip did not choose (conda, ``--no-deps``, a vendored
build).
"""

from __future__ import annotations

import re

import torch

__all__ = ["MIN_TORCH", "check_torch", "torch_release"]

#: The oldest supported torch release (``pyproject.toml`` says ``torch>=2.7``).
MIN_TORCH = (2, 7)


def torch_release(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a torch version string, or None if it has no such prefix.

    Pre-releases and local builds count as their release (``2.7.0a0+git1234`` is 2.7).
    """
    match = re.match(r"(\d+)\.(\d+)", version)
    return None if match is None else (int(match[1]), int(match[2]))


def check_torch(version: str | None = None) -> None:
    """Refuse a torch older than :data:`MIN_TORCH`.

    Args:
        version: the version to check (default: the installed ``torch.__version__``). A string
            without a ``major.minor`` prefix is let through: there is nothing to judge.

    Raises:
        ImportError: the torch release is older than the floor; the message names both.
    """
    found = str(torch.__version__ if version is None else version)
    release = torch_release(found)
    if release is not None and release < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise ImportError(
            f"asyncckpt needs torch >= {need}, but torch {found} is installed: older releases "
            "write a different torch.save layout, cannot save uint16/uint32/uint64 tensors, and "
            "their torch.load(weights_only=True) cannot read every value a checkpoint may hold. "
            f"Install a newer torch (pip install 'torch>={need}')."
        )


check_torch()
