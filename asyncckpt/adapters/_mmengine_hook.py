"""``AsyncCheckpointHook``: mmengine's ``CheckpointHook`` with the writing done by asyncckpt.

The hook decides *what* to save exactly as ``CheckpointHook`` does (intervals, ``save_begin``,
``save_last``, best metrics, rotation through the message hub's ``keep_ckpt_ids``) and builds
the same checkpoint dict as ``Runner.save_checkpoint``. The save itself is a
:class:`~asyncckpt.Checkpointer` save: the state is copied before the hook returns, the file is
written and committed in the background. Where ``CheckpointHook`` deletes a file before the new
one is written (rotation, the previous best), the hook passes the victim as ``supersedes=`` to the
save that replaces it, so it is deleted only once the replacement is committed. The
``last_checkpoint`` pointer in the work dir is updated by the training thread once the checkpoint
it names is committed.

Per checkpoint::

    hook call ─ bookkeeping in the message hub (keep_ckpt_ids, last_ckpt, best_*) as mmengine
              ─ build the dict like Runner.save_checkpoint, call before_save_checkpoint hooks
              ─ Checkpointer.save(dict, name=..., keep=best, supersedes=victims)   (copy, return)
    writer    ─ serialize ─ write tmp + fsync + rename ─ index ─ delete the superseded files
    next hook call / after_train ─ last_checkpoint := newest committed regular checkpoint
"""

from __future__ import annotations

import hashlib
import logging
import os
import os.path as osp
import pickle
import threading
import time
import warnings
import weakref
from collections import deque
from math import inf
from pathlib import Path
from typing import Any, cast

import mmengine
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper
from mmengine.utils import get_git_hash

from .._config import DEFAULT_GREATER_KEYS, DEFAULT_LESS_KEYS, CheckpointerConfig, Mode
from .._events import Committed, Event
from .._load import load
from .._naming import LAST_CHECKPOINT_NAME
from .._sync import Checkpointer, SyncSaveHandle
from ..storage import Storage, storage_for
from ._mmengine_compat import (
    EXTRA_TYPES,
    check_filename_tmpl,
    infer_rule,
    is_uri,
    join_path,
    parse_published_keys,
    parse_rules,
    parse_save_best,
    parse_str_keys,
    register_safe_globals,
    storage_options_from,
)
from ._pointers import CommitTracker, write_text_atomic

__all__ = ["AsyncCheckpointHook"]

DATA_BATCH = dict | tuple | list | None


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'"{name}" should be an int, but got {type(value)}')
    return value


class AsyncCheckpointHook(Hook):
    """Save checkpoints periodically, asynchronously; a drop-in for mmengine's ``CheckpointHook``.

    In a config, replace ``type='CheckpointHook'`` with ``type='AsyncCheckpointHook'`` and import
    the adapter so that it registers::

        custom_imports = dict(imports=['asyncckpt.adapters.mmengine'], allow_failed_imports=False)
        default_hooks = dict(checkpoint=dict(type='AsyncCheckpointHook', interval=1,
                                             max_keep_ckpts=3, save_best='auto'))

    The arguments are ``CheckpointHook``'s and mean the same; the files, the ``last_checkpoint``
    pointer, the message hub entries and the log lines are the same. Differences: see the
    README's "mmengine" section.

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

        if file_client_args is not None:
            message = (
                '"file_client_args" will be deprecated in future. Please use "backend_args" '
                "instead"
            )
            print_log(message, logger="current", level=logging.WARNING)
            warnings.warn(message, DeprecationWarning, stacklevel=2)
            if backend_args is not None:
                raise ValueError(
                    '"file_client_args" and "backend_args" cannot be set at the same time.'
                )
        for what, args in (("file_client_args", file_client_args),
                           ("backend_args", backend_args)):
            if args is not None and not isinstance(args, dict):
                raise TypeError(f'"{what}" should be a dict or None, but got {type(args)}')
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

        self._config = CheckpointerConfig(
            queue_size=queue_size,
            when_full="block",
            last_checkpoint=False,  # mmengine's pointer lives in the work dir; we write it
            extra_types=tuple(EXTRA_TYPES.items()),
            cpu_locations=True,  # as Runner.save_checkpoint's weights_to_cpu()
        )
        self._ckpt: Checkpointer | None = None
        self._storage: Storage | None = None
        self._storage_options: dict[str, Any] = {}
        self._work_dir: str | None = None
        self._committed = CommitTracker[str]()
        self._pointer: str | None = None  # what last_checkpoint names now
        self._pointer_lock = threading.Lock()  # the writer's thread updates it too
        self._pending_removals: list[str] = []  # rotation victims left from a resumed run
        self._meta_cache: dict[str, Any] | None = None
        register_safe_globals()  # so that Runner(resume=True) can read our checkpoints

    # -- the hook's stages -----------------------------------------------------------------------
    def before_train(self, runner: Any) -> None:
        """Resolve the checkpoint folder and restore best/rotation state from the message hub."""
        location = runner.work_dir if self._out_dir_arg is None else self._out_dir_arg
        if location != runner.work_dir:
            location = join_path(location, osp.basename(runner.work_dir.rstrip(osp.sep)))
        options = storage_options_from(self.backend_args, self.file_client_args, location)
        moved = location != self.out_dir or options != self._storage_options
        if self._ckpt is not None and moved:
            self._close()
        if self._ckpt is None:
            # Validates the location now; the folder is created at the first save.
            self._storage = storage_for(location, storage_options=options)
        self.out_dir = location
        self._storage_options = options
        self._work_dir = runner.work_dir
        self._meta_cache = None
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
        self._update_pointer()
        if self.by_epoch:
            return
        if self.every_n_train_iters(runner, self.interval, self.save_begin) or (
            self.save_last and self.is_last_train_iter(runner)
        ):
            runner.logger.info(f"Saving checkpoint at {runner.iter + 1} iterations")
            self._save_checkpoint(runner)

    def after_train_epoch(self, runner: Any) -> None:
        """Save every ``interval`` epochs from ``save_begin``, and after the last one."""
        self._update_pointer()
        if not self.by_epoch:
            return
        if self.every_n_epochs(runner, self.interval, self.save_begin) or (
            self.save_last and self.is_last_train_epoch(runner)
        ):
            runner.logger.info(f"Saving checkpoint at {runner.epoch + 1} epochs")
            self._save_checkpoint(runner)

    def after_val_epoch(self, runner: Any, metrics: dict[str, Any]) -> None:
        """Save the best checkpoint(s) of the evaluation's metrics."""
        self._update_pointer()
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
            self._close(quiet=True)
            raise

    def after_run(self, runner: Any) -> None:
        """Close the writer (waits for anything still queued)."""
        self.close()

    # -- public helpers --------------------------------------------------------------------------
    def flush(self) -> None:
        """Block until every queued checkpoint is written and ``last_checkpoint`` names the
        newest one.

        Raises:
            WriterError: a checkpoint could not be written.
        """
        if self._ckpt is not None:
            self._ckpt.flush()
        self._update_pointer()

    def close(self) -> None:
        """Drain the queue and release the checkpoint folder; raise writer failures."""
        self._close()

    @property
    def checkpointer(self) -> Checkpointer | None:
        """The asyncckpt writer, once the first checkpoint was saved."""
        return self._ckpt

    # -- saving ----------------------------------------------------------------------------------
    def _save_checkpoint(self, runner: Any) -> None:
        if self.by_epoch:
            step = runner.epoch + 1
            meta = dict(epoch=step, iter=runner.iter)
        else:
            step = runner.iter + 1
            meta = dict(epoch=runner.epoch, iter=step)
        self._save_checkpoint_with_step(runner, step, meta)

    def _save_checkpoint_with_step(self, runner: Any, step: int, meta: dict[str, Any]) -> None:
        victims: list[str] = []
        if self.max_keep_ckpts > 0:
            # A second save of the same step (after a new best) does not rotate.
            if not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
                if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                    victims.append(self.filename_tmpl.format(self.keep_ckpt_ids.popleft()))
                self.keep_ckpt_ids.append(step)
                runner.message_hub.update_info("keep_ckpt_ids", list(self.keep_ckpt_ids))

        filename = self.filename_tmpl.format(step)
        self.last_ckpt = join_path(self._folder(), filename)
        runner.message_hub.update_info("last_ckpt", self.last_ckpt)
        handle = self._save(
            runner,
            filename,
            step,
            meta,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            by_epoch=self.by_epoch,
            supersedes=victims,
        )
        if handle is not None:
            self._committed.add(handle, self.last_ckpt)

    def _save_best_checkpoint(self, runner: Any, metrics: dict[str, Any]) -> None:
        if not self.save_best:
            return
        if self._work_dir is None:
            return  # evaluation outside training (runner.val()): before_train() never ran
        if self.by_epoch:
            cur_type, cur_time = "epoch", runner.epoch
        else:
            cur_type, cur_time = "iter", runner.iter
        ckpt_filename = self.filename_tmpl.format(cur_time)
        meta = dict(epoch=runner.epoch, iter=runner.iter)

        if "auto" in self.key_indicators:
            key = next(iter(metrics))
            self.key_indicators = [key]
            if self.rules[0] is None:
                self.rules = [infer_rule(key, self.greater_keys, self.less_keys)]

        hub = runner.message_hub
        single = len(self.key_indicators) == 1
        best_updated = False
        # Every rule is known now: given, inferred in __init__, or inferred for 'auto' above.
        rules = cast(list[Mode], self.rules)
        for key, rule in zip(self.key_indicators, rules, strict=True):
            score = metrics[key]
            if single:
                score_key, ckpt_key, previous = "best_score", "best_ckpt", self.best_ckpt_path
            else:
                score_key, ckpt_key = f"best_score_{key}", f"best_ckpt_{key}"
                previous = self.best_ckpt_path_dict.get(key)
            best_score = hub.get_info(score_key, self.init_value_map[rule])
            if score is None or not self._is_better(rule, score, best_score):
                continue
            best_updated = True
            hub.update_info(score_key, score)

            name = f"best_{key}_{ckpt_filename}".replace("/", "_")
            path = join_path(self._folder(), name)
            supersedes = []
            if previous and is_main_process():
                # Only a file in our folder is removed (once the new best is committed); a best
                # checkpoint elsewhere (a run resumed from another work dir) is left alone.
                previous_name = self._name_in_folder(str(previous))
                if previous_name is not None:
                    if previous_name != name:  # the same name is simply replaced
                        supersedes.append(previous_name)
                    runner.logger.info(f"The previous best checkpoint {previous} is removed")
            if single:
                self.best_ckpt_path = path
            else:
                self.best_ckpt_path_dict[key] = path
            hub.update_info(ckpt_key, path)
            self._save(
                runner,
                name,
                cur_time,
                dict(meta),
                save_optimizer=False,
                save_param_scheduler=False,
                by_epoch=False,
                keep=True,
                supersedes=supersedes,
                metrics={key: score},
            )
            runner.logger.info(
                f"The best checkpoint with {score:0.4f} {key} at {cur_time} {cur_type} is "
                f"saved to {name}."
            )

        # Save the regular checkpoint again so that the message hub it holds names the new best
        # (a resumed run then knows which best file to replace).
        if best_updated and self.last_ckpt is not None:
            self._save_checkpoint_with_step(runner, cur_time, meta)

    @staticmethod
    def _is_better(rule: Mode, value: Any, best: Any) -> bool:
        return bool(value > best) if rule == "greater" else bool(value < best)

    def _save(
        self,
        runner: Any,
        name: str,
        step: int,
        meta: dict[str, Any],
        *,
        save_optimizer: bool,
        save_param_scheduler: bool,
        by_epoch: bool,
        keep: bool = False,
        supersedes: list[str] = (),  # type: ignore[assignment]
        metrics: dict[str, Any] | None = None,
    ) -> SyncSaveHandle | None:
        """Build the checkpoint like ``Runner.save_checkpoint`` and hand it to the writer (on the
        main process only, as ``Runner.save_checkpoint`` is ``master_only``)."""
        if not is_main_process():
            return None
        checkpoint = self._build_checkpoint(runner, meta, save_optimizer, save_param_scheduler,
                                            by_epoch)
        ckpt = self._open()
        victims = [n for n in [*self._pending_removals, *supersedes] if n != name]
        handle = ckpt.save(
            checkpoint,
            step=step,
            epoch=checkpoint["meta"].get("epoch"),
            metrics=_numeric(metrics),
            name=name,
            keep=keep,
            supersedes=list(dict.fromkeys(victims)),
        )
        self._pending_removals.clear()
        return handle

    def _build_checkpoint(
        self,
        runner: Any,
        meta: dict[str, Any],
        save_optimizer: bool,
        save_param_scheduler: bool,
        by_epoch: bool,
    ) -> dict[str, Any]:
        """The dict ``Runner.save_checkpoint`` builds (without its ``.cpu()`` copies: the
        snapshot copies, and records every tensor as a CPU tensor)."""
        if by_epoch:
            meta.setdefault("epoch", runner.epoch + 1)
            meta.setdefault("iter", runner.iter)
        else:
            meta.setdefault("epoch", runner.epoch)
            meta.setdefault("iter", runner.iter + 1)
        run = self._run_meta(runner)
        meta.update(  # in Runner.save_checkpoint's order
            cfg=run["cfg"],
            seed=run["seed"],
            experiment_name=run["experiment_name"],
            time=time.strftime("%Y%m%d_%H%M%S", time.localtime()),
            mmengine_version=run["mmengine_version"],
        )
        if hasattr(runner.train_dataloader.dataset, "metainfo"):
            meta.update(dataset_meta=runner.train_dataloader.dataset.metainfo)
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        checkpoint: dict[str, Any] = {
            "meta": meta,
            "state_dict": model.state_dict(),
            "message_hub": runner.message_hub.state_dict(),
        }
        if save_optimizer:
            if not isinstance(runner.optim_wrapper, OptimWrapper):
                raise TypeError(
                    "runner.optim_wrapper should be an `OptimWrapper` or `OptimWrapperDict` "
                    f"instance, but got {runner.optim_wrapper}"
                )
            checkpoint["optimizer"] = runner.optim_wrapper.state_dict()
        if save_param_scheduler and runner.param_schedulers is None:
            runner.logger.warning(
                "`save_param_scheduler` is True but `self.param_schedulers` is None, so skip "
                "saving parameter schedulers"
            )
            save_param_scheduler = False
        if save_param_scheduler:
            if isinstance(runner.param_schedulers, dict):
                checkpoint["param_schedulers"] = {
                    name: [s.state_dict() for s in schedulers]
                    for name, schedulers in runner.param_schedulers.items()
                }
            else:
                checkpoint["param_schedulers"] = [s.state_dict() for s in runner.param_schedulers]
        runner.call_hook("before_save_checkpoint", checkpoint=checkpoint)
        return checkpoint

    def _run_meta(self, runner: Any) -> dict[str, Any]:
        """The meta entries that stay the same for a whole run. mmengine recomputes them at every
        save (formatting the config, running ``git``); here once per run, off the hot path."""
        if self._meta_cache is None:
            self._meta_cache = dict(
                cfg=runner.cfg.pretty_text,
                seed=runner.seed,
                experiment_name=runner.experiment_name,
                mmengine_version=mmengine.__version__ + get_git_hash(),
            )
        return self._meta_cache

    def _publish_model(self, runner: Any, ckpt_path: str) -> None:
        """Write ``<name>-<sha256[:8]>.pth`` holding only ``published_keys`` of ``ckpt_path``."""
        if not is_main_process():
            return
        keys = self.published_keys or []
        checkpoint = load(ckpt_path, storage_options=self._storage_options)
        removed = [key for key in checkpoint if key not in keys]
        for key in removed:
            del checkpoint[key]
        if removed:
            print_log(
                f"Key {removed} will be removed because they are not found in published_keys. "
                f"If you want to keep them, please set `{removed}` in published_keys",
                logger="current",
            )
        sha = hashlib.sha256(pickle.dumps(checkpoint)).hexdigest()
        source = ckpt_path.rstrip("/").rsplit("/", 1)[-1] if is_uri(ckpt_path) else osp.basename(
            ckpt_path
        )
        name = osp.splitext(source)[0] + f"-{sha[:8]}.pth"
        final_path = join_path(self._folder(), name)
        ckpt = self._open()
        entry = next((c for c in ckpt.checkpoints() if c.name == source), None)
        ckpt.save(
            checkpoint,
            step=entry.step if entry is not None else 0,
            epoch=entry.epoch if entry is not None else None,
            name=name,
            keep=True,
        )
        print_log(f"The checkpoint ({ckpt_path}) is published to {final_path}.", logger="current")

    # -- the writer and the pointer --------------------------------------------------------------
    def _folder(self) -> str:
        if self.out_dir is None:
            raise RuntimeError(
                "AsyncCheckpointHook saves during training: before_train() sets the folder"
            )
        return self.out_dir

    def _open(self) -> Checkpointer:
        if self._ckpt is None:
            folder = self._folder()  # raises: before_train() was not called
            if self._storage is None:  # after_run closed it; runner.val() may save a best file
                self._storage = storage_for(folder, storage_options=self._storage_options)
            _close_abandoned_writer(folder, self)
            self._ckpt = Checkpointer(self._storage, config=self._config)
            self._ckpt.subscribe(self._on_event)
            _OPEN_WRITERS[_folder_key(folder)] = weakref.ref(self)
        return self._ckpt

    def _on_event(self, event: Event) -> None:
        """On the writer's thread: ``last_checkpoint`` follows every commit, as mmengine writes
        it right after each save -- a run that dies before its next hook call (an exception in
        validation, a kill) must still auto-resume from its newest checkpoint."""
        if isinstance(event, Committed):
            self._update_pointer()

    def _close(self, quiet: bool = False) -> None:
        ckpt, self._ckpt, self._storage = self._ckpt, None, None
        if ckpt is None:
            return
        key = _folder_key(self._folder())
        if _writer_hook(key) is self:
            del _OPEN_WRITERS[key]
        try:
            ckpt.close()
        except Exception:
            if not quiet:
                raise
            logging.getLogger("asyncckpt").exception("closing the checkpoint writer failed")
        finally:
            self._update_pointer()

    def _name_in_folder(self, path: str) -> str | None:
        """The file name of ``path`` if it lies directly in the checkpoint folder."""
        folder = self._folder()
        if is_uri(folder):
            prefix = folder.rstrip("/") + "/"
            rest = path[len(prefix):] if path.startswith(prefix) else None
        else:
            head, rest = osp.split(path)
            if osp.abspath(head) != osp.abspath(folder):
                rest = None
        return rest if rest and "/" not in rest else None

    def _update_pointer(self) -> None:
        """Point ``last_checkpoint`` at the newest committed regular checkpoint (main process;
        the hook's thread or the writer's)."""
        with self._pointer_lock:
            if not len(self._committed) or self._work_dir is None:
                return
            path = self._committed.newest_committed()
            if path is not None and path != self._pointer:
                write_text_atomic(osp.join(self._work_dir, LAST_CHECKPOINT_NAME), path)
                self._pointer = path


#: checkpoint folder -> the hook whose writer holds it (one writer per folder and process)
_OPEN_WRITERS: dict[str, weakref.ref[AsyncCheckpointHook]] = {}


def _writer_hook(key: str) -> AsyncCheckpointHook | None:
    """The live hook whose writer holds the folder ``key``, if any."""
    ref = _OPEN_WRITERS.get(key)
    return ref() if ref is not None else None


def _folder_key(folder: str) -> str:
    return folder if is_uri(folder) else osp.abspath(folder)


def _close_abandoned_writer(folder: str, hook: AsyncCheckpointHook) -> None:
    """A run that failed leaves its hook's writer open (mmengine calls no hook on the way out),
    holding the folder; a new run on the folder in the same process (a notebook, a sweep that
    retries) closes it, which also commits what it still had queued."""
    previous = _writer_hook(_folder_key(folder))
    if previous is not None and previous is not hook and previous._ckpt is not None:
        logging.getLogger("asyncckpt").warning(
            "closing the checkpoint writer an earlier run left open on %s", folder)
        previous._close(quiet=True)


def _numeric(metrics: dict[str, Any] | None) -> dict[str, float] | None:
    """The metrics the index can record (real numbers); others are left out."""
    if not metrics:
        return None
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out or None
