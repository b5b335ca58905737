"""The saving half of ``AsyncCheckpointHook``: which checkpoints a hook call saves, under
which names, what each one supersedes, and the hand-over to the writer.

The bookkeeping is mmengine's ``CheckpointHook``'s (message hub entries, ``keep_ckpt_ids``,
best scores, log lines); the deletions it makes before the new file exists become
``supersedes=`` of the save that replaces the file.
"""

from __future__ import annotations

import os.path as osp
from collections import deque
from typing import Any, cast

from mmengine.dist import is_main_process
from mmengine.logging import print_log

from asyncckpt import SyncSaveHandle, load

from ._mm_checkpoint import RunMeta, build_checkpoint, numeric, published_copy
from ._mm_writer import HookWriter
from ._mmengine_compat import Mode, infer_rule, is_uri, join_path

__all__ = ["CheckpointSaving"]


class CheckpointSaving:
    """Mixin of ``AsyncCheckpointHook``: the attributes below are set by its constructor and
    ``before_train``."""

    by_epoch: bool
    save_optimizer: bool
    save_param_scheduler: bool
    max_keep_ckpts: int
    filename_tmpl: str
    greater_keys: Any
    less_keys: Any
    rules: list[Mode | None]
    save_best: str | list[str] | None
    key_indicators: list[str]
    best_ckpt_path: str | None
    best_ckpt_path_dict: dict[str, str | None]
    published_keys: list[str] | None
    keep_ckpt_ids: deque[int]
    last_ckpt: str | None
    init_value_map: dict[str, float]
    _writer: HookWriter
    _pending_removals: list[str]
    _run_meta: RunMeta

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
        self.last_ckpt = join_path(self._writer.require_folder(), filename)
        runner.message_hub.update_info("last_ckpt", self.last_ckpt)
        self._save(
            runner,
            filename,
            step,
            meta,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            by_epoch=self.by_epoch,
            supersedes=victims,
            pointed=True,
        )

    def _save_best_checkpoint(self, runner: Any, metrics: dict[str, Any]) -> None:
        if not self.save_best:
            return
        if self._writer.folder is None:
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
            path = join_path(self._writer.require_folder(), name)
            supersedes = []
            if previous and is_main_process():
                # Only a file in our folder is removed (once the new best is committed); a best
                # checkpoint elsewhere (a run resumed from another work dir) is left alone.
                previous_name = _name_in_folder(str(previous), self._writer.require_folder())
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
        pointed: bool = False,
    ) -> SyncSaveHandle | None:
        """Build the checkpoint like ``Runner.save_checkpoint`` and hand it to the writer (on the
        main process only, as ``Runner.save_checkpoint`` is ``master_only``). ``pointed``: a
        regular checkpoint, which ``last_checkpoint`` names once it is committed."""
        if not is_main_process():
            return None
        checkpoint = build_checkpoint(
            runner, meta, self._run_meta.of(runner), save_optimizer=save_optimizer,
            save_param_scheduler=save_param_scheduler, by_epoch=by_epoch,
        )
        ckpt = self._writer.open()
        self._writer.check()
        if pointed:
            self._writer.follow(name)
        victims = [n for n in [*self._pending_removals, *supersedes] if n != name]
        handle = ckpt.save(
            checkpoint,
            step=step,
            epoch=checkpoint["meta"].get("epoch"),
            metrics=numeric(metrics),
            name=name,
            keep=keep,
            supersedes=list(dict.fromkeys(victims)),
        )
        self._pending_removals.clear()
        return handle

    def _publish_model(self, runner: Any, ckpt_path: str) -> None:
        """Write ``<name>-<sha256[:8]>.pth`` holding only ``published_keys`` of ``ckpt_path``."""
        if not is_main_process():
            return
        checkpoint = load(ckpt_path, storage_options=self._writer.storage_options)
        source = ckpt_path.rstrip("/").rsplit("/", 1)[-1] if is_uri(ckpt_path) else osp.basename(
            ckpt_path
        )
        name = published_copy(checkpoint, self.published_keys or [], source)
        ckpt = self._writer.open()
        entry = next((c for c in ckpt.checkpoints() if c.name == source), None)
        ckpt.save(
            checkpoint,
            step=entry.step if entry is not None else 0,
            epoch=entry.epoch if entry is not None else None,
            name=name,
            keep=True,
        )
        final_path = join_path(self._writer.require_folder(), name)
        print_log(f"The checkpoint ({ckpt_path}) is published to {final_path}.", logger="current")


def _name_in_folder(path: str, folder: str) -> str | None:
    """The file name of ``path`` if it lies directly in ``folder``."""
    if is_uri(folder):
        prefix = folder.rstrip("/") + "/"
        rest = path[len(prefix):] if path.startswith(prefix) else None
    else:
        head, rest = osp.split(path)
        if osp.abspath(head) != osp.abspath(folder):
            rest = None
    return rest if rest and "/" not in rest else None
