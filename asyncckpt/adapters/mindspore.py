"""MindSpore-style checkpoint callbacks (``ModelCheckpoint`` + ``CheckpointConfig``) for PyTorch.

MindSpore 2.10's ``mindspore.train.ModelCheckpoint`` API, with its file names, triggers,
rotation and validation, written asynchronously by asyncckpt::

    from asyncckpt.adapters.mindspore import CheckpointConfig, Model, ModelCheckpoint

    config = CheckpointConfig(save_checkpoint_steps=100, keep_checkpoint_max=5)
    ckpt_cb = ModelCheckpoint(prefix="LeNet5", directory="./checkpoint", config=config)
    Model(net, loss_fn, optimizer).train(10, dataset, callbacks=[ckpt_cb])

How MindSpore's options map onto asyncckpt::

    step_end ─ trigger: every save_checkpoint_steps steps, else every save_checkpoint_seconds
             ─ name {prefix}-{epoch}_{step in epoch}.ckpt ─ save (snapshot, return)
             ─ async_save=False: wait until committed
    writer   ─ serialize ─ encrypt (enc_key / enc_mode) ─ commit ─ rotate, per prefix:
               keep_checkpoint_max → keep_last, keep_checkpoint_per_n_minutes → keep_every_n_minutes
    end      ─ save the last step, drain the writer
    raise    ─ exception_save: {prefix}-{epoch}_{step in epoch}_breakpoint.ckpt, outside rotation

Rotation runs through the folder's index after each commit (never by file mtimes, never before
the new file is durable); every prefix is its own series with its own rotation, and the
callbacks of one process that save into one folder share its writer (see ``_mindspore_folder``).

What is saved: ``{"network": <state_dict of saved_network or train_network>, "optimizer":
<optimizer state_dict, when the train network is saved and run_context has one>, <append_info
entries>}`` — a plain ``torch.save`` file unless encrypted. Breakpoints always hold the train
network and its optimizer, as in MindSpore. Only PyTorch modules are covered, not MindSpore
``Cell`` objects.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

from .._core.load import load
from .._format.naming import validate_name
from ..storage import Storage, storage_for
from ._mindspore_config import AppendValue, CheckpointConfig
from ._mindspore_folder import FOLDERS, SeriesSettings, next_free_prefix, series_name
from ._mindspore_loop import Callback, CallbackParam, Model, RunContext

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

_MISSING = object()


def _next_free_prefix(names: Iterable[str], prefix: str) -> str:
    """MindSpore's renaming of a prefix the folder's checkpoints already use."""
    return next_free_prefix(names, prefix)


def _arg(params: Any, name: str, default: Any = _MISSING) -> Any:
    """Read a field of ``run_context.original_args()`` (attribute or mapping key)."""
    if isinstance(params, Mapping):
        value = params.get(name, default)
    else:
        value = getattr(params, name, default)
    if value is _MISSING:
        raise TypeError(f"run_context.original_args() has no {name!r}")
    return value


def _count(params: Any, name: str, minimum: int, default: Any = _MISSING) -> int:
    value = _arg(params, name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"run_context.original_args().{name} must be an int >= {minimum}, "
                         f"got {value!r}")
    return value


class ModelCheckpoint(Callback):
    """Save checkpoints during training, as MindSpore's ``ModelCheckpoint`` does, asynchronously.

    Files are named ``{prefix}-{epoch}_{step in epoch}.ckpt``; a prefix the directory's
    checkpoints already use becomes ``{prefix}_1``, ``{prefix}_2``, ... ``end()`` saves the last
    step (unless it was just saved) and waits for every queued save. Writer errors are raised at
    the next ``step_end`` / ``end``. Callbacks of one process may share a directory (each prefix
    rotates its own files).

    Args:
        prefix: file name prefix (no ``/``; may be empty).
        directory: folder to save into (created if missing; None: the current directory), or an
            asyncckpt :class:`~asyncckpt.storage.Storage`.
        config: a :class:`CheckpointConfig` (None: its defaults).
        clock: seconds since the epoch, for ``save_checkpoint_seconds`` and the minute windows of
            ``keep_checkpoint_per_n_minutes`` (tests replay time with it).

    Raises:
        ValueError: the prefix is not a str, contains ``/``, or makes invalid file names.
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
                f"ModelCheckpoint: prefix {prefix!r} for checkpoint file names is invalid: it "
                "must be a str without '/'"
            )
        validate_name(f"{prefix}-1_1.ckpt", where=f"ModelCheckpoint(prefix={prefix!r:.60})")
        if config is None:
            config = CheckpointConfig()
        if not isinstance(config, CheckpointConfig):
            raise TypeError(f"config should be CheckpointConfig type, got {type(config).__name__}")
        if not callable(clock):
            raise TypeError("clock must be a callable returning seconds")
        if directory is None:
            directory = os.getcwd()
        if isinstance(directory, Storage):
            storage = directory
        elif isinstance(directory, (str, os.PathLike)):
            os.makedirs(directory, exist_ok=True)
            storage = storage_for(os.path.abspath(directory))
        else:
            raise TypeError(
                "directory must be a folder path or an asyncckpt Storage, "
                f"got {type(directory).__name__}"
            )
        self._folder = FOLDERS.folder(storage)
        self._storage = storage
        self._config = config
        self._clock = clock
        self._exception_prefix = prefix
        self._prefix = next_free_prefix(self._folder.names(), prefix)
        self._settings = SeriesSettings(
            series=series_name(self._prefix),
            keep_last=config.keep_checkpoint_max or None,
            keep_every_n_minutes=config.keep_checkpoint_per_n_minutes or None,
            encryption=config.encryption,
            torch_crc32=config.crc_check,
            clock=clock,
        )
        append = config.append_dict or {}
        self._append: dict[str, AppendValue] = append
        # offsets added to the counters (MindSpore adds whatever the dict holds)
        self._append_epoch_num: Any = append.get("epoch_num", 0)
        self._append_step_num: Any = append.get("step_num", 0)
        self._last_time = clock()
        self._last_triggered_step = 0
        self._latest_ckpt_file_name = ""

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
        """With ``exception_save``: save ``{prefix}-{epoch}_{step}_breakpoint.ckpt`` and wait.

        As in MindSpore, the last ``ModelCheckpoint`` of the run's ``list_callback`` decides
        (its ``exception_save``, its folder and append_info); the name uses the prefix given at
        construction, renamed only if breakpoint files already use it; ``{step}`` counts within
        the epoch (0 when no step of it ran). A failure to save is logged and noted on ``exc``,
        which propagates either way.
        """
        params = run_context.original_args()
        callbacks = _arg(params, "list_callback", None)
        if callbacks is not None:
            mine = [cb for cb in callbacks if isinstance(cb, ModelCheckpoint)]
            if mine and mine[-1] is not self:
                return
        if not self._config.exception_save:
            return
        try:
            step = _count(params, "cur_step_num", 0)
            epoch = _count(params, "cur_epoch_num", 0, 0)
            default_in_epoch = self._step_in_epoch(params, step) if step else 0
            in_epoch = _count(params, "cur_step_in_epoch", 0, default_in_epoch)
            prefix = next_free_prefix(self._folder.names(), self._exception_prefix,
                                      breakpoints=True)
            name = f"{prefix}-{epoch}_{in_epoch}_breakpoint.ckpt"
            state = self._state(params, epoch, in_epoch, network=None)
            self._folder.save(self._settings, state, step=step, epoch=epoch, name=name,
                              keep=True).wait()
        except Exception as err:
            logger.error("ModelCheckpoint: the breakpoint checkpoint was not saved: %r", err)
            if hasattr(exc, "add_note"):
                exc.add_note(f"asyncckpt: the breakpoint checkpoint was not saved: {err!r}")

    def close(self) -> None:
        """Wait for queued saves and release the folder's writer (``end()`` does this).

        Raises:
            WriterError: a save failed.
        """
        self._folder.release(self._settings)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- saving ----------------------------------------------------------------------------------
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

    def _state(self, params: Any, epoch: int, step: int,
               network: Any = _MISSING) -> dict[str, Any]:
        """The file's content; ``network=None``: the train network and its optimizer."""
        saved = self._config.saved_network if network is _MISSING else network
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
        self._folder.save(self._settings, self._state(params, epoch, step), step=step,
                          epoch=epoch, name=name)
        self._latest_ckpt_file_name = self._storage.uri_of(name)
        if self._config.async_save is False:
            self._folder.flush(self._settings)  # until committed; a failure is raised here, once


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
