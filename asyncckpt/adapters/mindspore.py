"""MindSpore-style checkpoint callbacks (``ModelCheckpoint`` + ``CheckpointConfig``) for PyTorch.

MindSpore's ``mindspore.train.callback.ModelCheckpoint`` API, with its file names, triggers and
validation, written asynchronously by asyncckpt::

    from asyncckpt.adapters.mindspore import CheckpointConfig, Model, ModelCheckpoint

    config = CheckpointConfig(save_checkpoint_steps=100, keep_checkpoint_max=5)
    ckpt_cb = ModelCheckpoint(prefix="LeNet5", directory="./checkpoint", config=config)
    Model(net, loss_fn, optimizer).train(10, dataset, callbacks=[ckpt_cb])

How MindSpore's options map onto asyncckpt::

    step_end ─ trigger: every save_checkpoint_steps steps, else every save_checkpoint_seconds
             ─ name {prefix}-{epoch}_{step in epoch}.ckpt ─ Checkpointer.save (snapshot, return)
             ─ async_save=False: wait until committed
    writer   ─ serialize ─ encrypt (enc_key / enc_mode) ─ commit ─ rotate, per prefix:
               keep_checkpoint_max → keep_last, keep_checkpoint_per_n_minutes → keep_every_n_minutes
    end      ─ save the last step, drain the writer

Rotation runs through the folder's index after each commit (never by file mtimes, never before
the new file is durable); every ModelCheckpoint saves into its own series (its prefix), so a
second run in the same folder (prefix ``CKP_1``) never rotates the first run's files away.

What is saved: ``{"network": <state_dict of saved_network or train_network>, "optimizer":
<optimizer state_dict, when the train network is saved and run_context has one>, "epoch_num": ...,
"step_num": ..., <append_info dict entries>}`` — a plain ``torch.save`` file unless encrypted.
Only PyTorch modules are covered; MindSpore ``Cell`` objects are not.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import torch

from .._crypto import Encryption, check_key, check_mode
from .._load import load, run_sync
from .._naming import validate_name
from .._sync import Checkpointer
from ..storage import Storage, storage_for

__all__ = [
    "Callback",
    "CallbackParam",
    "CheckpointConfig",
    "Model",
    "ModelCheckpoint",
    "RunContext",
    "load_checkpoint",
]

logger = logging.getLogger(__name__)

_INFO_NAMES = ("epoch_num", "step_num")
_RESERVED_KEYS = frozenset({"network", "optimizer"})
_MISSING = object()
_C = TypeVar("_C", bound="Callback")


def _non_negative_int(value: object, name: str) -> int | None:
    """MindSpore's ``Validator.check_non_negative_int``, with None let through."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"CheckpointConfig: {name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"CheckpointConfig: {name} must be >= 0, got {value}")
    return value


def _bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"CheckpointConfig: {name} must be a bool, got {type(value).__name__}")
    return value


def _append_dict(append_info: object) -> dict[str, int | float | bool] | None:
    """MindSpore's ``append_info`` rules: ``"epoch_num"``, ``"step_num"`` and one str-keyed dict.

    Raises:
        TypeError: as MindSpore raises it for every malformed ``append_info``.
        ValueError: a dict key would overwrite ``"network"`` / ``"optimizer"`` in the file.
    """
    if append_info is None or append_info == []:
        return None
    if not isinstance(append_info, list):
        raise TypeError(
            f"CheckpointConfig: append_info must be a list, got {type(append_info).__name__}"
        )
    out: dict[str, int | float | bool] = {n: 0 for n in _INFO_NAMES if n in append_info}
    dicts = 0
    for element in append_info:
        if isinstance(element, str):
            if element not in _INFO_NAMES:
                raise TypeError(
                    f"CheckpointConfig: append_info strings must be one of {list(_INFO_NAMES)}, "
                    f"got {element!r}"
                )
        elif isinstance(element, dict):
            dicts += 1
            if dicts > 1:
                raise TypeError("CheckpointConfig: append_info may hold only one dict")
            for key, value in element.items():
                if not isinstance(key, str) or not isinstance(value, (int, float, bool)):
                    raise TypeError(
                        "CheckpointConfig: the dict in append_info must map str to int, float "
                        f"or bool, got {key!r}: {type(value).__name__}"
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


@dataclass(frozen=True)
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
        integrated_save: accepted for compatibility; one process holds the whole model here.
        async_save: True: ``step_end`` returns once the state is copied; False: it returns once
            the checkpoint is committed. Either way asyncckpt's writer does the writing.
        saved_network: a ``torch.nn.Module`` to save instead of the train network.
        append_info: ``"epoch_num"``, ``"step_num"`` and at most one dict of str to
            int/float/bool, stored at the top level of every checkpoint.
        enc_key: 16, 24 or 32 bytes: encrypt checkpoints with it (None: no encryption).
        enc_mode: ``"AES-GCM"`` or ``"AES-CBC"`` (with an HMAC); used only with ``enc_key``.
        exception_save: when training raises, save ``{prefix}-{epoch}_{step}_breakpoint.ckpt``
            (kept outside rotation) before the exception propagates.

    Raises:
        TypeError: an argument has the wrong type (as in MindSpore).
        ValueError: a count is negative, all four save/keep options are 0 or None, or the key
            length / mode is invalid.
    """

    save_checkpoint_steps: int | None = 1
    save_checkpoint_seconds: int | None = 0
    keep_checkpoint_max: int | None = 5
    keep_checkpoint_per_n_minutes: int | None = 0
    integrated_save: bool = True
    async_save: bool = False
    saved_network: torch.nn.Module | None = field(default=None, repr=False, compare=False)
    append_info: list[str | dict[str, int | float | bool]] | None = None
    enc_key: bytes | None = field(default=None, repr=False)
    enc_mode: str = "AES-GCM"
    exception_save: bool = False
    _append: dict[str, int | float | bool] | None = field(
        init=False, default=None, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        steps = _non_negative_int(self.save_checkpoint_steps, "save_checkpoint_steps")
        seconds = _non_negative_int(self.save_checkpoint_seconds, "save_checkpoint_seconds")
        keep_max = _non_negative_int(self.keep_checkpoint_max, "keep_checkpoint_max")
        per_n = _non_negative_int(
            self.keep_checkpoint_per_n_minutes, "keep_checkpoint_per_n_minutes"
        )
        if self.saved_network is not None and not isinstance(self.saved_network, torch.nn.Module):
            raise TypeError(
                "CheckpointConfig: saved_network must be None or a torch.nn.Module, "
                f"got {type(self.saved_network).__name__}"
            )
        if not steps and not seconds and not keep_max and not per_n:
            raise ValueError(
                "CheckpointConfig: save_checkpoint_steps, save_checkpoint_seconds, "
                "keep_checkpoint_max and keep_checkpoint_per_n_minutes can't all be None or 0"
            )
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
        for name, value in (
            ("save_checkpoint_seconds", seconds),
            ("keep_checkpoint_max", keep_max),
            ("keep_checkpoint_per_n_minutes", per_n),
        ):
            object.__setattr__(self, name, value)
        for name in ("integrated_save", "async_save", "exception_save"):
            _bool(getattr(self, name), name)
        object.__setattr__(self, "_append", _append_dict(self.append_info))
        if self.enc_key is not None and not isinstance(self.enc_key, bytes):
            kind = type(self.enc_key).__name__
            raise TypeError(f"CheckpointConfig: enc_key must be None or bytes, got {kind}")
        if not isinstance(self.enc_mode, str):
            raise TypeError(
                f"CheckpointConfig: enc_mode must be a str, got {type(self.enc_mode).__name__}"
            )
        if self.enc_key is not None:  # wrong key lengths and modes fail here, not mid-training
            check_key(self.enc_key, "CheckpointConfig: enc_key")
            check_mode(self.enc_mode, "CheckpointConfig: enc_mode")

    @property
    def append_dict(self) -> dict[str, int | float | bool] | None:
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


class CallbackParam(dict[str, Any]):
    """The training state callbacks read: a dict whose keys are also attributes (MindSpore's
    ``_InternalCallbackParam``): ``train_network``, ``optimizer``, ``epoch_num``, ``batch_num``,
    ``cur_epoch_num``, ``cur_step_num``, ``net_outputs``, ..."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


class RunContext:
    """What a callback is handed: the training state and a way to ask the loop to stop."""

    def __init__(self, original_args: Any) -> None:
        self._original_args = original_args
        self._stop_requested = False

    def original_args(self) -> Any:
        """The training state (a :class:`CallbackParam` in :class:`Model`)."""
        return self._original_args

    def request_stop(self) -> None:
        """Ask the training loop to stop after the current step."""
        self._stop_requested = True

    def get_stop_requested(self) -> bool:
        """Whether a callback asked the loop to stop."""
        return self._stop_requested


class Callback:
    """Base class of training callbacks; every hook does nothing unless overridden.

    :class:`Model` enters each callback as a context manager for the whole run (so it can release
    what it holds, even when training fails), then calls ``begin``, ``epoch_begin``,
    ``step_begin``, ``step_end``, ``epoch_end`` and ``end``, and ``on_train_exception`` when
    training raises.
    """

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def begin(self, run_context: RunContext) -> None:
        """Called once before training."""

    def epoch_begin(self, run_context: RunContext) -> None:
        """Called at the start of every epoch."""

    def epoch_end(self, run_context: RunContext) -> None:
        """Called at the end of every epoch."""

    def step_begin(self, run_context: RunContext) -> None:
        """Called before every step."""

    def step_end(self, run_context: RunContext) -> None:
        """Called after every step."""

    def end(self, run_context: RunContext) -> None:
        """Called once after training."""

    def on_train_exception(self, run_context: RunContext, exc: BaseException) -> None:
        """Called when training raises ``exc``, before it propagates (not a MindSpore hook:
        MindSpore's ``Model`` special-cases ``ModelCheckpoint`` for ``exception_save``)."""


def _arg(params: Any, name: str, default: Any = _MISSING) -> Any:
    """Read a field of ``run_context.original_args()`` (attribute or mapping key)."""
    if isinstance(params, Mapping):
        value = params.get(name, default)
    else:
        value = getattr(params, name, default)
    if value is _MISSING:
        raise TypeError(f"run_context.original_args() has no {name!r}")
    return value


def _count(params: Any, name: str, minimum: int) -> int:
    value = _arg(params, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"run_context.original_args().{name} must be an int >= {minimum}, "
                         f"got {value!r}")
    return value


def _next_free_prefix(names: Iterable[str], prefix: str) -> str:
    """MindSpore's rule for a prefix already used by ``.ckpt`` files among ``names``.

    ``CKP-1_1.ckpt`` makes ``CKP`` become ``CKP_1``; ``CKP_3-1_1.ckpt`` makes it ``CKP_4`` (the
    largest suffix plus one). Names whose character after the prefix is a letter (``CKPX-...``)
    belong to another prefix.
    """
    suffix = 0
    n = len(prefix)
    for name in names:
        if not name.endswith(".ckpt") or not name.startswith(prefix) or len(name) <= n:
            continue
        rest = name[n:]
        if rest[0].isalpha():
            continue
        dash = rest.find("-")
        if dash == 0:
            suffix = max(suffix, 1)
        elif dash > 0 and rest[1:dash].isdigit():
            suffix = max(suffix, int(rest[1:dash]) + 1)
    return prefix if suffix == 0 else f"{prefix}_{suffix}"


class ModelCheckpoint(Callback):
    """Save checkpoints during training, as MindSpore's ``ModelCheckpoint`` does, asynchronously.

    Files are named ``{prefix}-{epoch}_{step in epoch}.ckpt``; a prefix the directory already
    uses becomes ``{prefix}_1``, ``{prefix}_2``, ... ``end()`` saves the last step (unless it was
    just saved) and waits for every queued save. Writer errors are raised at the next
    ``step_end`` / ``end``. One ModelCheckpoint writes to a directory at a time (asyncckpt's
    folder lock); a later one in the same directory continues its index under a new prefix.

    Args:
        prefix: file name prefix (no ``/``).
        directory: folder to save into (created if missing; None: the current directory), or an
            asyncckpt :class:`~asyncckpt.storage.Storage`.
        config: a :class:`CheckpointConfig` (None: its defaults).
        clock: seconds since the epoch, for ``save_checkpoint_seconds`` and the minute windows of
            ``keep_checkpoint_per_n_minutes`` (tests replay time with it).

    Raises:
        ValueError: the prefix is invalid.
        TypeError: ``config`` is not a :class:`CheckpointConfig`, or ``directory`` has the wrong
            type.
    """

    def __init__(
        self,
        prefix: str = "CKP",
        directory: str | os.PathLike[str] | Storage | None = None,
        config: CheckpointConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(prefix, str) or "/" in prefix:
            raise ValueError(
                f"Prefix {prefix!r} for checkpoint file name invalid, please check and correct "
                "it and then continue."
            )
        validate_name(f"{prefix}-1_1.ckpt", where=f"ModelCheckpoint(prefix={prefix!r})")
        if config is None:
            config = CheckpointConfig()
        if not isinstance(config, CheckpointConfig):
            raise TypeError(f"config should be CheckpointConfig type, got {type(config).__name__}")
        if not callable(clock):
            raise TypeError("clock must be a callable returning seconds")
        if directory is None:
            directory = os.getcwd()
        if isinstance(directory, Storage):
            self._storage = directory
        elif isinstance(directory, (str, os.PathLike)):
            os.makedirs(directory, exist_ok=True)
            self._storage = storage_for(os.path.abspath(directory))
        else:
            raise TypeError(
                "directory must be a folder path or an asyncckpt Storage, "
                f"got {type(directory).__name__}"
            )
        self._config = config
        self._clock = clock
        self._prefix = _next_free_prefix(run_sync(self._storage.list), prefix)
        append = config.append_dict or {}
        self._append = append
        self._append_epoch_num = append.get("epoch_num", 0)
        self._append_step_num = append.get("step_num", 0)
        self._last_time = clock()
        self._last_triggered_step = 0
        self._latest_ckpt_file_name = ""
        self._writer: Checkpointer | None = None

    @property
    def latest_ckpt_file_name(self) -> str:
        """The path of the newest checkpoint saved (queued) by this callback; ``""`` before."""
        return self._latest_ckpt_file_name

    @property
    def prefix(self) -> str:
        """The prefix in use (the one given, or ``{prefix}_N`` if that was taken)."""
        return self._prefix

    @property
    def directory(self) -> str:
        """The folder checkpoints go to."""
        return self._storage.uri

    # -- callback hooks --------------------------------------------------------------------------
    def step_end(self, run_context: RunContext) -> None:
        """Save if the steps / seconds trigger says so."""
        self._save_ckpt(run_context.original_args())

    def end(self, run_context: RunContext) -> None:
        """Save the last step (unless just saved) and wait until everything is committed.

        Raises:
            WriterError: a save failed.
        """
        self._save_ckpt(run_context.original_args(), force=True)
        self.close()

    def on_train_exception(self, run_context: RunContext, exc: BaseException) -> None:
        """With ``exception_save``: save ``{prefix}-{epoch}_{step}_breakpoint.ckpt`` and wait for
        it. A failure to do so is logged and noted on ``exc``, which propagates either way."""
        if not self._config.exception_save:
            return
        try:
            params = run_context.original_args()
            step = _count(params, "cur_step_num", 0)
            epoch = _count(params, "cur_epoch_num", 0)
            in_epoch = self._step_in_epoch(params, step)
            name = f"{self._prefix}-{epoch}_{in_epoch}_breakpoint.ckpt"
            self._open().save(
                self._state(params, epoch, step), step=step, epoch=epoch, name=name, keep=True
            ).wait()
        except Exception as err:
            logger.error("ModelCheckpoint: the breakpoint checkpoint was not saved: %r", err)
            if hasattr(exc, "add_note"):
                exc.add_note(f"asyncckpt: the breakpoint checkpoint was not saved: {err!r}")

    def close(self) -> None:
        """Wait for queued saves and release the writer (``end()`` does this).

        Raises:
            WriterError: a save failed.
        """
        self.__exit__(None, None, None)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.__exit__(exc_type, exc, tb)

    # -- saving ----------------------------------------------------------------------------------
    def _open(self) -> Checkpointer:
        if self._writer is None:
            config = self._config
            self._writer = Checkpointer(
                self._storage,
                keep_last=config.keep_checkpoint_max or None,
                keep_every_n_minutes=config.keep_checkpoint_per_n_minutes or None,
                series=self._prefix,
                encryption=config.encryption,
                last_checkpoint=False,
                clock=self._clock,
            )
        return self._writer

    def _should_save(self, step: int, force: bool) -> bool:
        """MindSpore's trigger: steps first, then seconds; ``force`` only within the one set."""
        steps = self._config.save_checkpoint_steps
        seconds = self._config.save_checkpoint_seconds
        if steps:
            return force or step >= self._last_triggered_step + steps
        if seconds:
            now = self._clock()
            if force or now - self._last_time > seconds:
                self._last_time = now
                return True
        return False

    @staticmethod
    def _step_in_epoch(params: Any, step: int) -> int:
        batch_num = _count(params, "batch_num", 1)
        return (step - 1) % batch_num + 1

    def _state(self, params: Any, epoch: int, step: int) -> dict[str, Any]:
        saved = self._config.saved_network
        state: dict[str, Any] = {
            "network": saved if saved is not None else _arg(params, "train_network")
        }
        if saved is None:
            optimizer = _arg(params, "optimizer", None)
            if optimizer is not None:
                state["optimizer"] = optimizer
        if "epoch_num" in self._append:
            self._append["epoch_num"] = self._append_epoch_num + epoch
        if "step_num" in self._append:
            self._append["step_num"] = self._append_step_num + step
        state.update(self._append)
        return state

    def _save_ckpt(self, params: Any, force: bool = False) -> None:
        step = _count(params, "cur_step_num", 0)
        if step == self._last_triggered_step or not self._should_save(step, force):
            return
        epoch = _count(params, "cur_epoch_num", 0)
        name = f"{self._prefix}-{epoch}_{self._step_in_epoch(params, step)}.ckpt"
        self._last_triggered_step = step
        writer = self._open()
        writer.save(self._state(params, epoch, step), step=step, epoch=epoch, name=name)
        self._latest_ckpt_file_name = self._storage.uri_of(name)
        if not self._config.async_save:
            writer.flush()  # until committed; a failure is raised here, once


def load_checkpoint(
    ckpt_file_name: str | os.PathLike[str],
    *,
    dec_key: bytes | None = None,
    dec_mode: str = "AES-GCM",
    map_location: Any = None,
) -> Any:
    """Load a checkpoint a :class:`ModelCheckpoint` saved (MindSpore's ``load_checkpoint``).

    Verified against the folder's index when the file is listed in it, decrypted with
    ``dec_key`` / ``dec_mode`` when encrypted (see :func:`asyncckpt.load`).

    Returns:
        The saved dict: ``"network"``, ``"optimizer"`` (when saved) and the ``append_info``
        values.
    """
    return load(
        ckpt_file_name, map_location=map_location, dec_key=dec_key,
        dec_mode=None if dec_key is None else dec_mode,
    )


def _as_callbacks(callbacks: Callback | Sequence[Callback] | None) -> list[Callback]:
    if callbacks is None:
        return []
    items = [callbacks] if isinstance(callbacks, Callback) else list(callbacks)
    for item in items:
        if not isinstance(item, Callback):
            raise TypeError(f"callbacks must be Callback objects, got {type(item).__name__}")
    return items


def _dataset_size(dataset: Any) -> int:
    if hasattr(dataset, "get_dataset_size"):
        size = dataset.get_dataset_size()
    elif hasattr(dataset, "__len__"):
        size = len(dataset)
    else:
        raise TypeError("train_dataset must have get_dataset_size() or __len__")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"train_dataset must hold at least one batch, got size {size!r}")
    return size


class Model:
    """A minimal MindSpore-style ``Model.train`` loop for PyTorch, driving :class:`Callback` s.

    Each step unpacks a batch as ``(*inputs, label)`` and minimises
    ``loss_fn(network(*inputs), label)``; without ``loss_fn`` the network is called with the whole
    batch and returns the loss (MindSpore's ``WithLossCell``).

    Args:
        network: the module to train.
        loss_fn: ``loss_fn(output, label) -> scalar tensor``, or None.
        optimizer: a ``torch.optim.Optimizer``, or None (forward/backward only).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if not isinstance(network, torch.nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
        self.network = network
        self.loss_fn = loss_fn
        self.optimizer = optimizer

    def _step(self, batch: Any) -> torch.Tensor:
        items = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        if self.loss_fn is None:
            loss = self.network(*items)
        else:
            *inputs, label = items
            loss = self.loss_fn(self.network(*inputs), label)
        if self.optimizer is not None:
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return loss

    def train(
        self,
        epoch: int,
        train_dataset: Iterable[Any],
        callbacks: Callback | Sequence[Callback] | None = None,
        initial_epoch: int = 0,
    ) -> None:
        """Train for epochs ``initial_epoch + 1 .. epoch``, calling the callbacks' hooks.

        ``cur_epoch_num`` counts from 1 and ``cur_step_num`` over the whole run (from
        ``initial_epoch * batch_num``), as in MindSpore, so resumed runs name and trigger their
        checkpoints like an uninterrupted one.

        Raises:
            TypeError, ValueError: an argument is invalid.
        """
        for name, value, low in (("epoch", epoch, 1), ("initial_epoch", initial_epoch, 0)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if epoch <= initial_epoch:
            raise ValueError(
                f"epoch ({epoch}) must be greater than initial_epoch ({initial_epoch})"
            )
        cbs = _as_callbacks(callbacks)
        batch_num = _dataset_size(train_dataset)
        params = CallbackParam(
            train_network=self.network, optimizer=self.optimizer, loss_fn=self.loss_fn,
            train_dataset=train_dataset, epoch_num=epoch, batch_num=batch_num,
            cur_epoch_num=initial_epoch, cur_step_num=initial_epoch * batch_num,
            net_outputs=None, mode="train",
        )
        run_context = RunContext(params)
        self.network.train()
        with ExitStack() as stack:
            for cb in cbs:
                stack.enter_context(cb)
            try:
                self._run(cbs, run_context, params, initial_epoch, epoch)
            except BaseException as exc:
                for cb in cbs:
                    cb.on_train_exception(run_context, exc)
                raise

    def _run(self, cbs: list[Callback], run_context: RunContext, params: CallbackParam,
             initial_epoch: int, epoch: int) -> None:
        for cb in cbs:
            cb.begin(run_context)
        for index in range(initial_epoch, epoch):
            params.cur_epoch_num = index + 1
            for cb in cbs:
                cb.epoch_begin(run_context)
            for batch in params.train_dataset:
                params.cur_step_num += 1
                for cb in cbs:
                    cb.step_begin(run_context)
                params.net_outputs = self._step(batch)
                for cb in cbs:
                    cb.step_end(run_context)
                if run_context.get_stop_requested():
                    break
            for cb in cbs:
                cb.epoch_end(run_context)
            if run_context.get_stop_requested():
                break
        for cb in cbs:
            cb.end(run_context)

