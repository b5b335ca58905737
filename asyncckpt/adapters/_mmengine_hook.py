"""``AsyncCheckpointHook``: mmengine's ``CheckpointHook`` with the writing done by asyncckpt.

The hook decides *what* to save exactly as ``CheckpointHook`` does (intervals, ``save_begin``,
``save_last``, best metrics, rotation through the message hub's ``keep_ckpt_ids``) and builds
the same checkpoint dict as ``Runner.save_checkpoint`` (:mod:`._mm_checkpoint`). The save itself
is a :class:`~asyncckpt.Checkpointer` save (:mod:`._mm_writer`): the state is copied before the
hook returns, the file is written and committed in the background. Where ``CheckpointHook``
deletes a file before the new one is written (rotation, the previous best), the hook passes the
victim as ``supersedes=`` to the save that replaces it, so it is deleted only once the
replacement is committed. The ``last_checkpoint`` pointer in the work dir follows the commits.

Per checkpoint::

    hook call ─ bookkeeping in the message hub (keep_ckpt_ids, last_ckpt, best_*) as mmengine
              ─ build the dict like Runner.save_checkpoint, call before_save_checkpoint hooks
              ─ Checkpointer.save(dict, name=..., keep=best, supersedes=victims)   (copy, return)
    writer    ─ serialize ─ write tmp + fsync + rename ─ index ─ delete the superseded files
    pointer   ─ on the commit of a regular checkpoint: last_checkpoint := it (worker thread)
"""

from __future__ import annotations

import os
import os.path as osp
from collections import deque
from math import inf
from pathlib import Path
from typing import Any

from mmengine.hooks import Hook

from asyncckpt import Checkpointer, CheckpointerConfig

from .._format.best import DEFAULT_GREATER_KEYS, DEFAULT_LESS_KEYS
from ._mm_checkpoint import RunMeta
from ._mm_saving import CheckpointSaving
from ._mm_writer import HookWriter
from ._mmengine_compat import (
    EXTRA_TYPES,
    Mode,
    check_backend_args,
    check_filename_tmpl,
    join_path,
    mmengine_file_backend,
    mmengine_file_client,
    parse_published_keys,
    parse_rules,
    parse_save_best,
    parse_str_keys,
    register_safe_globals,
    storage_options_from,
)

__all__ = ["AsyncCheckpointHook"]

DATA_BATCH = dict | tuple | list | None


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'"{name}" should be an int, but got {type(value)}')
    return value


class AsyncCheckpointHook(CheckpointSaving, Hook):
    """Save checkpoints periodically, asynchronously; a drop-in for mmengine's ``CheckpointHook``.

    In a config, replace ``type='CheckpointHook'`` with ``type='AsyncCheckpointHook'`` and import
    the adapter so that it registers::

        custom_imports = dict(imports=['asyncckpt.adapters.mmengine'], allow_failed_imports=False)
        default_hooks = dict(checkpoint=dict(type='AsyncCheckpointHook', interval=1,
                                             max_keep_ckpts=3, save_best='auto'))

    The arguments are ``CheckpointHook``'s and mean the same; the files, the ``last_checkpoint``
    pointer, the message hub entries and the log lines are the same; ``file_client`` and
    ``file_backend`` are mmengine's own objects for the output location. What differs (and why)
    is listed in ``docs/mmengine.md``.

    Args:
        interval: the saving period in epochs (``by_epoch=True``) or iterations; -1: never
            (only ``save_last``).
        by_epoch: save by epoch or by iteration.
        save_optimizer: include the optimizer state (needed to resume).
        save_param_scheduler: include the parameter schedulers' state.
        out_dir: root folder or URI for checkpoints; the basename of ``runner.work_dir`` is
            appended unless it is the work dir itself. Default: ``runner.work_dir``.
        max_keep_ckpts: keep at most this many regular checkpoints (<= 0: all). Best checkpoints
            are kept separately, one per metric.
        save_last: always save after the last epoch / iteration.
        save_best: metric name(s) whose best checkpoint is kept as ``best_<key>_<name>``;
            ``'auto'``: the first metric of the first evaluation.
        rule: ``'greater'`` or ``'less'`` (or a list, one per ``save_best`` key); None: inferred
            from the key as mmengine does, but a key that matches both kinds (``heatmap_loss``)
            is an error rather than 'greater'.
        greater_keys: keys inferred as 'greater' (default: mmengine's list).
        less_keys: keys inferred as 'less' (default: ``['loss']``).
        file_client_args: deprecated alias of ``backend_args``.
        filename_tmpl: name template with exactly one ``{}`` (the epoch or iteration); default
            ``'epoch_{}.pth'`` / ``'iter_{}.pth'``.
        backend_args: storage options; ``backend`` (``'local'``/``'disk'``) is checked, every
            other key is passed to the asyncckpt storage backend of ``out_dir``.
        published_keys: after training, publish the last and best checkpoints with only these
            keys as ``<name>-<sha256[:8]>.pth``.
        save_begin: the epoch / iteration from which ``interval`` counts.
        queue_size: asyncckpt: snapshots that may wait while one is written; a save waits
            for a free slot when they are all taken (the hook never skips a checkpoint: the
            message hub already names it).

    Raises:
        TypeError, ValueError: an argument is invalid. Where ``CheckpointHook`` raises
            ``AssertionError`` (or ``KeyError`` for ``rule``), the exception is also an instance
            of that type.
    """

    priority = "VERY_LOW"

    init_value_map: dict[str, float] = {"greater": -inf, "less": inf}
    _default_greater_keys = list(DEFAULT_GREATER_KEYS)
    _default_less_keys = list(DEFAULT_LESS_KEYS)

    def __init__(
        self,
        interval: int = -1,
        by_epoch: bool = True,
        save_optimizer: bool = True,
        save_param_scheduler: bool = True,
        out_dir: str | Path | None = None,
        max_keep_ckpts: int = -1,
        save_last: bool = True,
        save_best: str | list[str] | None = None,
        rule: str | list[str] | None = None,
        greater_keys: str | list[str] | tuple[str, ...] | None = None,
        less_keys: str | list[str] | tuple[str, ...] | None = None,
        file_client_args: dict[str, Any] | None = None,
        filename_tmpl: str | None = None,
        backend_args: dict[str, Any] | None = None,
        published_keys: str | list[str] | None = None,
        save_begin: int = 0,
        *,
        queue_size: int = 1,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise TypeError(
                f"AsyncCheckpointHook got unexpected argument(s) {', '.join(sorted(kwargs))}. "
                "(CheckpointHook forwards extra arguments to Runner.save_checkpoint(), which "
                "accepts none beyond the hook's own, so they would fail at the first save.)"
            )
        self.interval = _check_int(interval, "interval")
        self.by_epoch = by_epoch
        self.save_optimizer = save_optimizer
        self.save_param_scheduler = save_param_scheduler
        if out_dir is not None and not isinstance(out_dir, (str, os.PathLike)):
            raise TypeError(f'"out_dir" should be a str, a Path or None, but got {type(out_dir)}')
        self._out_dir_arg = None if out_dir is None else os.fspath(out_dir)
        self.out_dir: str | None = self._out_dir_arg
        self.max_keep_ckpts = _check_int(max_keep_ckpts, "max_keep_ckpts")
        self.save_last = save_last

        check_backend_args(file_client_args, backend_args)
        self.file_client_args = file_client_args
        self.backend_args = backend_args

        if filename_tmpl is None:
            filename_tmpl = "epoch_{}.pth" if by_epoch else "iter_{}.pth"
        self.filename_tmpl = check_filename_tmpl(filename_tmpl)

        self.greater_keys = parse_str_keys(greater_keys, self._default_greater_keys, "greater_keys")
        self.less_keys = parse_str_keys(less_keys, self._default_less_keys, "less_keys")
        self.save_best = parse_save_best(save_best)
        self.rules: list[Mode | None] = parse_rules(
            rule, self.save_best, self.greater_keys, self.less_keys
        )
        self.key_indicators: list[str] = list(self.save_best or [])
        if self.save_best is not None:
            if len(self.key_indicators) == 1:
                self.best_ckpt_path: str | None = None
            else:
                self.best_ckpt_path_dict: dict[str, str | None] = {}

        self.published_keys = parse_published_keys(published_keys)
        self.save_begin = _check_int(save_begin, "save_begin")
        if save_begin < 0:
            raise ValueError(f"save_begin should not be less than 0, but got {save_begin}")
        self.last_ckpt: str | None = None

        self._writer = HookWriter(CheckpointerConfig(
            queue_size=queue_size,
            when_full="block",
            last_checkpoint=False,  # mmengine's pointer lives in the work dir; we write it
            extra_types=tuple(EXTRA_TYPES.items()),
            cpu_locations=True,  # as Runner.save_checkpoint's weights_to_cpu()
        ))
        self._root: str | None = None  # out_dir (or the work dir) before the basename is added
        self._file_objects: dict[str, Any] = {}
        self._pending_removals: list[str] = []  # rotation victims left from a resumed run
        self._run_meta = RunMeta()
        register_safe_globals()  # so that Runner(resume=True) can read our checkpoints

    # -- the hook's stages -----------------------------------------------------------------------
    def before_train(self, runner: Any) -> None:
        """Resolve the checkpoint folder and restore best/rotation state from the message hub."""
        root = runner.work_dir if self._out_dir_arg is None else self._out_dir_arg
        location = root
        if location != runner.work_dir:
            location = join_path(location, osp.basename(runner.work_dir.rstrip(osp.sep)))
        options = storage_options_from(self.backend_args, self.file_client_args, location)
        self._writer.configure(location, options, runner.work_dir)
        self.out_dir = location
        if root != self._root:
            self._root, self._file_objects = root, {}
        self._run_meta.reset()
        runner.logger.info(f"Checkpoints will be saved to {self.out_dir}.")

        info = runner.message_hub.runtime_info
        if self.save_best is not None:
            if len(self.key_indicators) == 1:
                self.best_ckpt_path = info.get("best_ckpt")
            else:
                for key in self.key_indicators:
                    self.best_ckpt_path_dict[key] = info.get(f"best_ckpt_{key}")

        if self.max_keep_ckpts > 0:
            keep_ids = list(info.get("keep_ckpt_ids", []))
            while len(keep_ids) > self.max_keep_ckpts:
                # Resumed with a smaller max_keep_ckpts: mmengine deletes these now; they go
                # with the next save's commit instead.
                self._pending_removals.append(self.filename_tmpl.format(keep_ids.pop(0)))
            self.keep_ckpt_ids: deque[int] = deque(keep_ids, self.max_keep_ckpts)

    def after_train_iter(
        self,
        runner: Any,
        batch_idx: int,
        data_batch: DATA_BATCH = None,
        outputs: dict[str, Any] | None = None,
    ) -> None:
        """Save every ``interval`` iterations from ``save_begin``, and after the last one."""
        if self.by_epoch:
            return
        if self.every_n_train_iters(runner, self.interval, self.save_begin) or (
            self.save_last and self.is_last_train_iter(runner)
        ):
            runner.logger.info(f"Saving checkpoint at {runner.iter + 1} iterations")
            self._save_checkpoint(runner)

    def after_train_epoch(self, runner: Any) -> None:
        """Save every ``interval`` epochs from ``save_begin``, and after the last one."""
        if not self.by_epoch:
            return
        if self.every_n_epochs(runner, self.interval, self.save_begin) or (
            self.save_last and self.is_last_train_epoch(runner)
        ):
            runner.logger.info(f"Saving checkpoint at {runner.epoch + 1} epochs")
            self._save_checkpoint(runner)

    def after_val_epoch(self, runner: Any, metrics: dict[str, Any]) -> None:
        """Save the best checkpoint(s) of the evaluation's metrics."""
        if len(metrics) == 0:
            runner.logger.warning(
                "Since `metrics` is an empty dict, the behavior to save the best checkpoint "
                "will be skipped in this evaluation."
            )
            return
        self._save_best_checkpoint(runner, metrics)

    def after_train(self, runner: Any) -> None:
        """Wait until every checkpoint is written, then publish (``published_keys``).

        Raises:
            WriterError: a checkpoint could not be written (the run fails).
        """
        try:
            self.flush()
            if self.published_keys is not None:
                if self.save_last and self.last_ckpt is not None:
                    self._publish_model(runner, self.last_ckpt)
                best = [getattr(self, "best_ckpt_path", None)]
                best += list(getattr(self, "best_ckpt_path_dict", {}).values())
                for path in best:
                    if path is not None:  # mmengine would crash on a metric never improved
                        self._publish_model(runner, str(path))
                self.flush()
        except BaseException:
            self._writer.close(quiet=True)
            raise

    def after_run(self, runner: Any) -> None:
        """Close the writer (waits for anything still queued)."""
        self.close()

    # -- public helpers --------------------------------------------------------------------------
    def flush(self) -> None:
        """Block until every queued checkpoint is written and ``last_checkpoint`` names the
        newest one.

        Raises:
            WriterError: a checkpoint (or ``last_checkpoint``) could not be written.
        """
        self._writer.flush()

    def close(self) -> None:
        """Drain the queue and release the checkpoint folder; raise writer failures."""
        self._writer.close()

    @property
    def checkpointer(self) -> Checkpointer | None:
        """The asyncckpt writer, once the first checkpoint was saved."""
        return self._writer.checkpointer

    @property
    def file_client(self) -> Any:
        """mmengine's ``FileClient`` for the output location, as ``CheckpointHook`` has it
        (made at the first access after ``before_train``)."""
        return self._file_object("file_client")

    @file_client.setter
    def file_client(self, value: Any) -> None:
        self._file_objects["file_client"] = value

    @property
    def file_backend(self) -> Any:
        """mmengine's storage backend for the output location (``LocalBackend`` for a folder;
        the ``file_client`` when ``file_client_args`` is given), as ``CheckpointHook`` has it."""
        return self._file_object("file_backend")

    @file_backend.setter
    def file_backend(self, value: Any) -> None:
        self._file_objects["file_backend"] = value

    def _file_object(self, what: str) -> Any:
        if what not in self._file_objects:
            if self._root is None:
                raise AttributeError(f"AsyncCheckpointHook.{what} is set by before_train()")
            if what == "file_client":
                made = mmengine_file_client(self.file_client_args, self._root)
            elif self.file_client_args is not None:
                made = self.file_client
            else:
                made = mmengine_file_backend(self.backend_args, self._root)
            self._file_objects[what] = made
        return self._file_objects[what]
