"""``CheckpointConfig``: MindSpore 2.10's checkpoint configuration, validated as MindSpore does.

Every argument of MindSpore's ``CheckpointConfig`` is accepted. Those that change what asyncckpt
does: the four save/keep counts, ``async_save``, ``saved_network``, ``append_info``, ``enc_key`` /
``enc_mode``, ``exception_save`` and ``crc_check`` (torch's own per-record CRC32, on top of the
checksum asyncckpt always records). Those without a meaning in a single PyTorch process
(``integrated_save=False``, ``remove_redundancy=True``, ``async_save="process"``, extra keyword
arguments such as ``incremental``) are accepted with a warning that names them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .._format.crypto import Encryption, check_key, check_mode

__all__ = ["AppendValue", "CheckpointConfig"]

logger = logging.getLogger("asyncckpt.adapters.mindspore")

#: A value ``append_info``'s dict may hold (MindSpore: int, float, bool, str, Tensor).
AppendValue = int | float | bool | str | torch.Tensor

_INFO_NAMES = ("epoch_num", "step_num")
_RESERVED_KEYS = frozenset({"network", "optimizer"})
_FORMATS = ("ckpt",)


def _non_negative_int(value: object, name: str) -> int | None:
    """MindSpore's ``check_non_negative_int``, with None let through."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"CheckpointConfig: {name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"CheckpointConfig: {name} must be >= 0, got {value}")
    return value


def _bool(value: object, name: str, error: type[Exception] = TypeError) -> bool:
    """A bool, or ``error`` (MindSpore raises TypeError or ValueError depending on the option)."""
    if not isinstance(value, bool):
        raise error(f"CheckpointConfig: {name} must be a bool, got {type(value).__name__}")
    return value


def _async_mode(value: object) -> bool | str:
    """MindSpore's ``async_save``: a bool, ``"thread"`` or ``"process"``."""
    if isinstance(value, str):
        if value not in ("thread", "process"):
            raise ValueError(
                f"CheckpointConfig: async_save must be a bool, 'thread' or 'process', got {value!r}"
            )
        return value
    if not isinstance(value, bool):
        raise TypeError(
            f"CheckpointConfig: async_save must be a bool or str, got {type(value).__name__}"
        )
    return value


def _append_dict(append_info: object) -> dict[str, AppendValue] | None:
    """MindSpore's ``append_info`` rules: ``"epoch_num"``, ``"step_num"`` and one str-keyed dict.

    Raises:
        TypeError: not a list, an element neither str nor dict, two dicts, or a dict entry of
            the wrong type (as MindSpore).
        ValueError: an unknown string (as MindSpore), or a dict key that would overwrite the
            file's own ``"network"`` / ``"optimizer"``.
    """
    if append_info is None or append_info == []:
        return None
    if not isinstance(append_info, list):
        raise TypeError(
            f"CheckpointConfig: append_info must be a list, got {type(append_info).__name__}"
        )
    out: dict[str, AppendValue] = {n: 0 for n in _INFO_NAMES if n in append_info}
    dicts = 0
    for element in append_info:
        if isinstance(element, str):
            if element not in _INFO_NAMES:
                raise ValueError(
                    f"CheckpointConfig: append_info strings must be one of {list(_INFO_NAMES)}, "
                    f"got {element!r}"
                )
        elif isinstance(element, dict):
            dicts += 1
            if dicts > 1:
                raise TypeError("CheckpointConfig: append_info may hold only one dict")
            for key, value in element.items():
                if not isinstance(key, str) or not isinstance(
                    value, (int, float, bool, str, torch.Tensor)
                ):
                    raise TypeError(
                        "CheckpointConfig: the dict in append_info must map str to int, float, "
                        f"bool, str or Tensor, got {key!r}: {type(value).__name__}"
                    )
                if key in _RESERVED_KEYS:
                    raise ValueError(
                        f"CheckpointConfig: append_info key {key!r} is reserved for the "
                        "checkpoint's own content"
                    )
                out[key] = value
        else:
            raise TypeError(
                "CheckpointConfig: append_info elements must be str or dict, "
                f"got {type(element).__name__}"
            )
    return out


def _ignored(name: str, value: object, why: str) -> None:
    logger.warning("CheckpointConfig: %s=%r is accepted and ignored: %s", name, value, why)


@dataclass(frozen=True, init=False)
class CheckpointConfig:
    """When to save and what to keep: MindSpore's ``CheckpointConfig``, same arguments and rules.

    Where MindSpore lets one option silently win, it still wins here, with a logged warning:
    ``save_checkpoint_steps`` > 0 disables ``save_checkpoint_seconds``; ``keep_checkpoint_max``
    > 0 disables ``keep_checkpoint_per_n_minutes``; and when neither keep option is set,
    ``keep_checkpoint_max`` becomes 1.

    Args:
        save_checkpoint_steps: save every N steps (0/None: not by steps).
        save_checkpoint_seconds: save when more than N seconds passed since the last save
            (0/None: not by time).
        keep_checkpoint_max: keep the newest N checkpoints of this prefix.
        keep_checkpoint_per_n_minutes: keep one checkpoint per N-minute window (the first of
            each window, counted from the prefix's first checkpoint) plus the newest.
        integrated_save: accepted; one process holds the whole model here (False: a warning).
        async_save: False: ``step_end`` returns once the checkpoint is committed; True,
            ``"thread"`` or ``"process"``: once the state is copied (asyncckpt's writer does the
            writing; ``"process"`` starts no process, with a warning).
        saved_network: a ``torch.nn.Module`` to save instead of the train network.
        append_info: ``"epoch_num"``, ``"step_num"`` and at most one dict of str to
            int/float/bool/str/tensor, stored at the top level of every checkpoint.
        enc_key: 16, 24 or 32 bytes: encrypt checkpoints with it (None: no encryption).
        enc_mode: ``"AES-GCM"`` or ``"AES-CBC"`` (with an HMAC); used only with ``enc_key``.
        exception_save: when training raises, save ``{prefix}-{epoch}_{step}_breakpoint.ckpt``
            (kept outside rotation) before the exception propagates.
        crc_check: also record torch's per-record CRC32 in every file (checked by
            ``torch.load``); asyncckpt's own whole-file checksum is recorded either way.
        remove_redundancy: accepted; there is no data-parallel redundancy to remove in one
            process (True: a warning).
        format: ``"ckpt"`` (files are ``torch.save`` files).
        **kwargs: MindSpore's extra options (``incremental``, ``enable_redundance``, ...):
            accepted with a warning, since none has a meaning here.

    Raises:
        TypeError: a count, bool option or ``append_info`` has the wrong type (as in MindSpore).
        ValueError: a count is negative, all four save/keep options are 0 or None,
            ``async_save`` is an unknown string, ``enc_key`` / ``enc_mode`` / ``crc_check`` /
            ``format`` / ``remove_redundancy`` has the wrong type (as in MindSpore), or the key
            length, mode or format is one asyncckpt cannot write.
    """

    save_checkpoint_steps: int | None
    save_checkpoint_seconds: int | None
    keep_checkpoint_max: int | None
    keep_checkpoint_per_n_minutes: int | None
    integrated_save: bool
    async_save: bool | str
    saved_network: torch.nn.Module | None = field(repr=False, compare=False)
    append_info: list[str | dict[str, AppendValue]] | None
    enc_key: bytes | None = field(repr=False)
    enc_mode: str
    exception_save: bool
    crc_check: bool
    remove_redundancy: bool
    format: str
    extra_options: dict[str, Any] = field(repr=False, compare=False)
    _append: dict[str, AppendValue] | None = field(repr=False, compare=False)

    def __init__(
        self,
        save_checkpoint_steps: int | None = 1,
        save_checkpoint_seconds: int | None = 0,
        keep_checkpoint_max: int | None = 5,
        keep_checkpoint_per_n_minutes: int | None = 0,
        integrated_save: bool = True,
        async_save: bool | str = False,
        saved_network: torch.nn.Module | None = None,
        append_info: list[str | dict[str, AppendValue]] | None = None,
        enc_key: bytes | None = None,
        enc_mode: str = "AES-GCM",
        exception_save: bool = False,
        crc_check: bool = False,
        remove_redundancy: bool = False,
        format: str = "ckpt",  # noqa: A002 - MindSpore's name
        **kwargs: Any,
    ) -> None:
        steps = _non_negative_int(save_checkpoint_steps, "save_checkpoint_steps")
        seconds = _non_negative_int(save_checkpoint_seconds, "save_checkpoint_seconds")
        keep_max = _non_negative_int(keep_checkpoint_max, "keep_checkpoint_max")
        per_n = _non_negative_int(keep_checkpoint_per_n_minutes, "keep_checkpoint_per_n_minutes")
        if saved_network is not None and not isinstance(saved_network, torch.nn.Module):
            raise TypeError(
                "CheckpointConfig: saved_network must be None or a torch.nn.Module, "
                f"got {type(saved_network).__name__}"
            )
        if not steps and not seconds and not keep_max and not per_n:
            raise ValueError(
                "CheckpointConfig: save_checkpoint_steps, save_checkpoint_seconds, "
                "keep_checkpoint_max and keep_checkpoint_per_n_minutes can't all be None or 0"
            )
        _bool(exception_save, "exception_save")
        if steps and seconds:
            logger.warning(
                "CheckpointConfig: save_checkpoint_steps=%d takes precedence; "
                "save_checkpoint_seconds=%d is ignored", steps, seconds,
            )
        if steps:
            seconds = None
        if keep_max:
            if per_n:
                logger.warning(
                    "CheckpointConfig: keep_checkpoint_max=%d takes precedence; "
                    "keep_checkpoint_per_n_minutes=%d is ignored", keep_max, per_n,
                )
            per_n = None
        elif not per_n:
            logger.warning(
                "CheckpointConfig: neither keep_checkpoint_max nor keep_checkpoint_per_n_minutes "
                "is set, so only the newest checkpoint is kept (keep_checkpoint_max=1)"
            )
            keep_max = 1
        _bool(integrated_save, "integrated_save")
        async_mode = _async_mode(async_save)
        append = _append_dict(append_info)
        if enc_key is not None and not isinstance(enc_key, bytes):
            kind = type(enc_key).__name__
            raise ValueError(f"CheckpointConfig: enc_key must be None or bytes, got {kind}")
        if not isinstance(enc_mode, str):
            raise ValueError(
                f"CheckpointConfig: enc_mode must be a str, got {type(enc_mode).__name__}"
            )
        _bool(crc_check, "crc_check", ValueError)
        if not isinstance(format, str):
            raise ValueError(f"CheckpointConfig: format must be a str, got {type(format).__name__}")
        _bool(remove_redundancy, "remove_redundancy", ValueError)
        if format not in _FORMATS:
            raise ValueError(
                f"CheckpointConfig: format={format!r} is not available: asyncckpt writes "
                "torch.save files ('ckpt')"
            )
        if enc_key is not None:  # wrong key lengths and modes fail here, not mid-training
            check_key(enc_key, "CheckpointConfig: enc_key")
            check_mode(enc_mode, "CheckpointConfig: enc_mode")
        if not integrated_save:
            _ignored("integrated_save", False, "one process holds the whole model")
        if remove_redundancy:
            _ignored("remove_redundancy", True, "there is no data-parallel redundancy to remove")
        if async_mode == "process":
            _ignored("async_save", "process",
                     "asyncckpt's background writer saves asynchronously (as async_save=True)")
        for name in sorted(kwargs):
            _ignored(name, kwargs[name], "it has no counterpart in asyncckpt")
        values = {
            "save_checkpoint_steps": steps, "save_checkpoint_seconds": seconds,
            "keep_checkpoint_max": keep_max, "keep_checkpoint_per_n_minutes": per_n,
            "integrated_save": integrated_save, "async_save": async_mode,
            "saved_network": saved_network, "append_info": append_info, "enc_key": enc_key,
            "enc_mode": enc_mode, "exception_save": exception_save, "crc_check": crc_check,
            "remove_redundancy": remove_redundancy, "format": format,
            "extra_options": dict(kwargs), "_append": append,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @property
    def append_dict(self) -> dict[str, AppendValue] | None:
        """The values ``append_info`` adds to every checkpoint (a copy), or None."""
        return None if self._append is None else dict(self._append)

    @property
    def encryption(self) -> Encryption | None:
        """The asyncckpt encryption settings ``enc_key`` / ``enc_mode`` amount to."""
        if self.enc_key is None:
            return None
        return Encryption(self.enc_key, check_mode(self.enc_mode, "enc_mode"))

    def get_checkpoint_policy(self) -> dict[str, Any]:
        """The save / keep policy, as MindSpore reports it."""
        return {
            "save_checkpoint_steps": self.save_checkpoint_steps,
            "save_checkpoint_seconds": self.save_checkpoint_seconds,
            "keep_checkpoint_max": self.keep_checkpoint_max,
            "keep_checkpoint_per_n_minutes": self.keep_checkpoint_per_n_minutes,
            "saved_network": self.saved_network,
        }
