"""Lightning: asyncckpt as the Trainer's ``CheckpointIO`` plugin.

::

    import lightning.pytorch as pl
    from asyncckpt.adapters.lightning import AsyncCkptIO

    trainer = pl.Trainer(plugins=[AsyncCkptIO()], callbacks=[ModelCheckpoint(...)])

Lightning's own ``ModelCheckpoint`` still decides when to save, what to call the files and
which to delete; the plugin writes them in the background (snapshot into pooled host buffers,
``torch.save`` format, atomic and durable commit) with one asyncckpt writer per checkpoint
folder, whose index lists exactly the files Lightning keeps. The end of ``Trainer.fit`` (and of
validate/test/predict) waits until everything is durable; ``trainer.save_checkpoint()`` outside
a running Trainer returns once the file is durable. See ``docs/lightning.md``.

Needs ``lightning`` (``pip install lightning``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from .. import CheckpointerConfig, CheckpointNotFoundError, checkpoints, load
from ._lightning_folder import _Folder, running_trainer_on_stack, split_path

__all__ = ["AsyncCkptIO"]

logger = logging.getLogger(__name__)

# CheckpointerConfig fields the plugin passes through; the others are Lightning's to decide
# (ModelCheckpoint keeps, deletes, names and ranks checkpoints) or would make files that
# Lightning's own loaders (LightningModule.load_from_checkpoint) cannot read.
_PASSED = frozenset(
    {"queue_size", "max_retries", "retry_backoff", "torch_crc32", "extra_types",
     "cpu_locations", "writer_nice"}
)


def _cpu(storage: Any, location: str) -> Any:
    return storage


class AsyncCkptIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that saves through asyncckpt.

    ``Trainer(plugins=[AsyncCkptIO()])``. Each checkpoint folder gets one asyncckpt writer,
    opened at its first use (an existing index is resumed) and closed by ``teardown()``, which
    Lightning calls at the end of every Trainer run.

    * ``save_checkpoint`` returns once Lightning's checkpoint dict is copied; the file appears,
      complete and fsynced, when the background write commits. Outside a running Trainer (e.g.
      ``trainer.save_checkpoint()`` after ``fit()``) and after ``teardown()`` it returns only
      once the file is durable, as Lightning's own IO does.
    * ``remove_checkpoint`` drops the file from the folder's index before deleting it: at once
      when nothing is being written, otherwise together with the next save's commit (training
      never waits for the writer) or at ``teardown()``.
    * ``load_checkpoint`` waits for saves still queued in that folder, then loads the file,
      checking it against the index (size and checksum) when the index lists it.

    Args:
        storage_options: options for remote folders (``s3://...``), see
            :func:`asyncckpt.storage.storage_for`.
        observers: callables receiving every asyncckpt event of every folder's writer.
        wait_outside_trainer: return from ``save_checkpoint`` only once the file is durable
            when no running Trainer is on the stack (default). False keeps it asynchronous
            everywhere; :meth:`flush` or :meth:`teardown` then waits.
        **options: writer options: ``queue_size``, ``max_retries``, ``retry_backoff``,
            ``torch_crc32``, ``extra_types``, ``cpu_locations``, ``writer_nice`` (see
            :class:`asyncckpt.CheckpointerConfig`).

    Raises:
        TypeError: an option is unknown, belongs to ModelCheckpoint (retention, names, best),
            or has the wrong type.
        ValueError: an option's value is invalid.
    """

    def __init__(
        self,
        *,
        storage_options: Mapping[str, Any] | None = None,
        observers: Iterable[Callable[[Any], object]] = (),
        wait_outside_trainer: bool = True,
        **options: Any,
    ) -> None:
        refused = sorted(set(options) - _PASSED)
        if refused:
            raise TypeError(
                f"AsyncCkptIO: option(s) {', '.join(refused)} not accepted; the plugin passes "
                f"{', '.join(sorted(_PASSED))}. Retention, file names and best checkpoints are "
                "ModelCheckpoint's (save_top_k, filename, monitor/mode)."
            )
        if not isinstance(wait_outside_trainer, bool):
            raise TypeError(f"wait_outside_trainer must be a bool, got {wait_outside_trainer!r}")
        self._config = CheckpointerConfig(last_checkpoint=False, **options)
        self._storage_options = None if storage_options is None else dict(storage_options)
        self._observers = tuple(observers)
        for observer in self._observers:
            if not callable(observer):
                raise TypeError(f"an observer must be callable, got {type(observer).__name__}")
        self._wait_outside_trainer = wait_outside_trainer
        self._folders: dict[str, _Folder] = {}
        self._torn_down = False

    # -- CheckpointIO ----------------------------------------------------------------------------
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
        storage_options: Any | None = None,
    ) -> None:
        """Queue Lightning's checkpoint dict to be written as ``path``.

        Raises:
            TypeError: ``storage_options`` was given (pass them to the plugin instead), or the
                checkpoint holds something that cannot be checkpointed.
            WriterError: an earlier background save failed.
        """
        if storage_options is not None:
            raise TypeError(
                "Trainer.save_checkpoint(..., storage_options=...) is not supported by "
                "AsyncCkptIO; pass storage_options= to AsyncCkptIO(...) instead"
            )
        if not isinstance(checkpoint, Mapping):
            raise TypeError(f"checkpoint must be a dict, got {type(checkpoint).__name__}")
        folder, name = split_path(path)
        step = checkpoint.get("global_step", 0)
        epoch = checkpoint.get("epoch")
        handle = self._folder(folder).save(
            checkpoint, name,
            step if isinstance(step, int) and step >= 0 else 0,
            epoch if isinstance(epoch, int) and epoch >= 0 else None,
        )
        if self._wait_outside_trainer and (self._torn_down or not running_trainer_on_stack()):
            handle.wait()

    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any | None = _cpu,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load a checkpoint (on the CPU unless ``map_location`` says otherwise).

        ``weights_only=None`` loads with ``weights_only=True``, torch's default.

        Raises:
            FileNotFoundError: nothing is at ``path``.
            IntegrityError: the file does not match the checksum its index records.
            WriterError: a background save in that folder failed.
        """
        folder, name = split_path(path)
        if folder in self._folders:
            self._folders[folder].flush()  # a queued save of this file must land first
        fs = get_filesystem(os.fspath(path))
        if not fs.exists(os.fspath(path)):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        source = os.fspath(path)
        if "://" not in source:
            source = os.path.realpath(source)  # a last.ckpt link: verify its target
        state: dict[str, Any] = load(
            source, map_location=map_location,
            weights_only=True if weights_only is None else weights_only,
            storage_options=None if "://" not in source else self._storage_options,
        )
        return state

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Remove a checkpoint through its folder's index (see the class docstring)."""
        folder, name = split_path(path)
        if folder not in self._folders and not self._has_index(folder):
            # Not an asyncckpt folder (no index to keep right): delete as Lightning does.
            fs = get_filesystem(os.fspath(path))
            if fs.exists(os.fspath(path)):
                fs.rm(os.fspath(path), recursive=True)
            return
        self._folder(folder).remove(name)

    def teardown(self) -> None:
        """Wait until every save is durable, apply pending removals and close the writers.

        Raises:
            WriterError: a background save failed (the first failure; every folder is closed).
        """
        self._torn_down = True
        self.close()

    # -- beyond CheckpointIO ---------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every queued save is durable; raise background failures."""
        for folder in list(self._folders.values()):
            folder.flush()

    def close(self) -> None:
        """Close every folder's writer (pending removals applied); raise the first failure."""
        folders, self._folders = list(self._folders.values()), {}
        error: BaseException | None = None
        for folder in folders:
            try:
                folder.close()
            except Exception as exc:
                logger.error("closing the checkpoint writer of %s failed: %s", folder.uri, exc)
                if error is None:
                    error = exc
        if error is not None:
            raise error

    @property
    def folders(self) -> list[str]:
        """The folders that have an open writer."""
        return list(self._folders)

    def __repr__(self) -> str:
        return f"<AsyncCkptIO folders={self.folders}>"

    # -- internals -------------------------------------------------------------------------------
    def _folder(self, uri: str) -> _Folder:
        folder = self._folders.get(uri)
        if folder is None:
            folder = _Folder(uri, self._config, self._storage_options, self._observers)
            self._folders[uri] = folder
        return folder

    def _has_index(self, uri: str) -> bool:
        try:
            checkpoints(uri, storage_options=self._storage_options)
        except CheckpointNotFoundError:
            return False
        return True
