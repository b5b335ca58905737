"""The contenders: asyncckpt and the anchors it is measured against.

Every contender turns ``save(tree, step)`` into a :class:`Pending` once the caller may go on
(the *stall*), and ``Pending.wait()`` returns once the bytes are durable (fsynced locally, an
upload completed remotely), so "time to durable" means the same for all of them:

=========================  ================================================================
``asyncckpt-<mode>``       :class:`asyncckpt.Checkpointer` with that snapshot mode; on a local
                           folder through the page cache (``direct_io=False``)
``asyncckpt-<mode>-direct`` the same with ``O_DIRECT`` writes (``LocalStorage``'s default)
``torch-save``             ``torch.save`` to the file, then ``fsync`` (remote: to memory, then one
                           upload), on the caller's thread
``dcp``                    ``torch.distributed.checkpoint.async_save`` (thread executor), a new
                           stager each save (its default)
``dcp-reused-stager``      the same with one ``DefaultStager`` kept across saves, so its
                           staging buffers are reused
``lightning``              Lightning's ``AsyncCheckpointIO(TorchCheckpointIO())`` (clone on the
                           caller, ``torch.save`` in a thread); durable after an ``fsync`` that
                           the benchmark adds, since Lightning does not fsync
``lightning-asyncckpt``    Lightning's ``CheckpointIO`` interface with asyncckpt behind it
                           (:class:`asyncckpt.adapters.lightning.AsyncCkptIO`), each save
                           waited for with its ``flush()``
``thread-clone``           the naive way: ``clone()`` every tensor, ``torch.save`` + ``fsync``
                           in a background thread
=========================  ================================================================

Contenders that cannot queue (all but asyncckpt) wait for their previous save before starting
the next one, as their documentation asks; in the training loop that wait is part of the stall.
"""

from __future__ import annotations

import importlib.util
import io
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ._dest import Destination

__all__ = ["Contender", "Pending", "build_contenders", "contender_ids"]


class Pending:
    """A save in flight: ``wait()`` blocks until durable and returns the bytes committed."""

    def __init__(self, wait: Callable[[], int]) -> None:
        self._wait = wait
        self._bytes: int | None = None
        self._lock = threading.Lock()

    def wait(self) -> int:
        with self._lock:
            if self._bytes is None:
                self._bytes = self._wait()
            return self._bytes


def _done(nbytes: int) -> Pending:
    return Pending(lambda: nbytes)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save_durable(tree: Any, dest: Destination, name: str) -> int:
    """``torch.save`` + fsync locally; remotely, serialize to memory and upload it."""
    if dest.local_root is None:
        buf = io.BytesIO()
        torch.save(tree, buf)
        dest.write_bytes(name, buf.getbuffer())
        return buf.getbuffer().nbytes
    path = dest.path(name)
    with open(path, "wb") as f:
        torch.save(tree, f)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def _clone_tree(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone() if tree.device.type == "cpu" else tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone_tree(v) for v in tree)
    return tree


class Contender(ABC):
    """One way of saving a checkpoint.

    Attributes:
        id: short id (``--contenders`` selects by it).
        label: what tables and plots call it.
        queues: whether it accepts a save while its previous one is still being written.
    """

    id: str
    label: str
    queues: bool = False

    def __init__(self, dest: Destination) -> None:
        self.dest = dest
        self._last: Pending | None = None
        self._names: list[str] = []

    def unsupported(self) -> str | None:
        """Why this contender cannot run here, or None."""
        return None

    def open(self) -> None:  # noqa: B027 - optional hook
        """Prepare (called once, before the first save)."""

    def save(self, tree: Any, step: int, objects: dict[str, Any] | None = None) -> Pending:
        """Start saving ``tree``; return once the caller may mutate it again.

        ``objects``: the model/optimizer objects behind ``tree`` (training loop, layout
        ``model``), for contenders that snapshot through ``state_dict()`` themselves.
        """
        if self._last is not None and not self.queues:
            self._last.wait()
        name = f"{self.id}-{step}"
        pending = self._save(tree, name, step, objects)
        self._last = pending
        self._names.append(name)
        return pending

    @abstractmethod
    def _save(self, tree: Any, name: str, step: int, objects: dict[str, Any] | None) -> Pending:
        """Start one save under ``name``."""

    def cleanup(self) -> None:
        """Wait for what is in flight and delete the saved files (between rounds; untimed)."""
        if self._last is not None:
            self._last.wait()
        for name in self._names:
            self.dest.remove(name)
        self._names.clear()

    def close(self) -> None:
        """Wait for everything and release resources."""
        self.cleanup()


class TorchSave(Contender):
    id = "torch-save"
    label = "torch.save + fsync"

    def _save(self, tree: Any, name: str, step: int, objects: dict[str, Any] | None) -> Pending:
        return _done(_torch_save_durable(tree, self.dest, name))


class ThreadClone(Contender):
    id = "thread-clone"
    label = "thread: clone + torch.save"

    def open(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-thread-clone")

    def _save(self, tree: Any, name: str, step: int, objects: dict[str, Any] | None) -> Pending:
        copy = _clone_tree(tree)
        future = self._pool.submit(_torch_save_durable, copy, self.dest, name)
        del copy
        return Pending(future.result)

    def close(self) -> None:
        super().close()
        self._pool.shutdown(wait=True)


class Lightning(Contender):
    id = "lightning"
    label = "Lightning AsyncCheckpointIO"

    def unsupported(self) -> str | None:
        if importlib.util.find_spec("lightning") is None:
            return "lightning is not installed (pip install lightning)"
        if self.dest.storage_options:
            return "TorchCheckpointIO takes no storage options"
        return None

    def open(self) -> None:
        from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

        self._io = AsyncCheckpointIO(TorchCheckpointIO())

    def _save(self, tree: Any, name: str, step: int, objects: dict[str, Any] | None) -> Pending:
        path = self.dest.path(name)
        self._io.save_checkpoint(tree, path)
        # AsyncCheckpointIO keeps no per-save future; its executor has one worker, so a task
        # queued after the save runs once the save is done. It also fsyncs, which Lightning
        # does not, so that "durable" means the same for every contender.
        executor = getattr(self._io, "_executor", None)
        if executor is None:
            raise RuntimeError("lightning's AsyncCheckpointIO has no _executor; update the bench")
        future: Future[int] = executor.submit(self._durable, name)
        return Pending(future.result)

    def _durable(self, name: str) -> int:
        if self.dest.local_root is None:
            return self.dest.size(name)
        path = self.dest.path(name)
        _fsync_path(path)
        return os.path.getsize(path)

    def close(self) -> None:
        super().close()
        self._io.teardown()


class LightningAsyncckpt(Contender):
    """Lightning's row with asyncckpt's plugin: the same calls Lightning's Trainer makes."""

    id = "lightning-asyncckpt"
    label = "Lightning AsyncCkptIO (asyncckpt)"
    queues = True

    def unsupported(self) -> str | None:
        if importlib.util.find_spec("lightning") is None:
            return "lightning is not installed (pip install lightning)"
        try:
            self.dest.asyncckpt_storage(self.id)
        except (ValueError, TypeError) as exc:
            return f"asyncckpt cannot write there: {exc}"
        return None

    def open(self) -> None:
        from asyncckpt.adapters.lightning import AsyncCkptIO

        self._io = AsyncCkptIO(storage_options=self.dest.storage_options or None,
                               wait_outside_trainer=False)

    def _file(self, name: str) -> str:
        return f"{self.id}/{name}.ckpt"

    def _save(self, tree: Any, name: str, step: int, objects: dict[str, Any] | None) -> Pending:
        self._io.save_checkpoint(tree, self.dest.path(self._file(name)))

        def wait() -> int:
            self._io.flush()
            return self.dest.size(self._file(name))

        return Pending(wait)

    def cleanup(self) -> None:
        if self._last is not None:
            self._last.wait()
        for name in self._names:  # through the plugin: its folder's index lists them
            self._io.remove_checkpoint(self.dest.path(self._file(name)))
        self._names.clear()

    def close(self) -> None:
        super().close()
        self._io.teardown()
        self.dest.remove(self.id)


class Dcp(Contender):
    id = "dcp"
    label = "DCP async_save"

    def __init__(self, dest: Destination, reuse_stager: bool) -> None:
        super().__init__(dest)
        self.reuse_stager = reuse_stager
        if reuse_stager:
            self.id, self.label = "dcp-reused-stager", "DCP async_save (reused stager)"

    def unsupported(self) -> str | None:
        import torch.distributed as dist

        if not dist.is_available():
            return "torch.distributed is not available in this build"
        if self.dest.local_root is None and importlib.util.find_spec("fsspec") is None:
            return "fsspec is not installed"
        if self.reuse_stager:
            try:
                from torch.distributed.checkpoint.staging import DefaultStager  # noqa: F401
            except ImportError:
                return (f"needs torch >= 2.9 (DCP's DefaultStager); this is torch "
                        f"{torch.__version__}")
        return None

    def open(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            # async_save runs collectives (or warns without a group): a gloo group of one.
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            self._owns_group = True
        else:
            self._owns_group = False
        self._stager = None
        if self.reuse_stager:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self._stager = DefaultStager(
                StagingOptions(use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
                               use_async_staging=False, use_non_blocking_copy=False)
            )

    def _writer(self, name: str) -> Any:
        import torch.distributed.checkpoint as dcp

        if self.dest.local_root is not None:
            return dcp.FileSystemWriter(self.dest.path(name), sync_files=True)
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(self.dest.path(name), sync_files=True, **self.dest.storage_options)

    def _save(self, tree: Any, name: str, step: int, objects: dict[str, Any] | None) -> Pending:
        import torch.distributed.checkpoint as dcp

        # async_stager is torch >= 2.9; without a reused stager the call is the same on every
        # supported torch
        stager: dict[str, Any] = {} if self._stager is None else {"async_stager": self._stager}
        response = dcp.async_save(tree, storage_writer=self._writer(name), **stager)
        upload: Any = getattr(response, "upload_completion", response)

        def wait() -> int:
            upload.result()
            return self.dest.size(name)

        return Pending(wait)

    def close(self) -> None:
        super().close()
        if self._stager is not None:
            self._stager.close()
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


class Asyncckpt(Contender):
    queues = True

    def __init__(self, dest: Destination, mode: str, *, direct_io: bool, queue_size: int,
                 when_full: str) -> None:
        super().__init__(dest)
        self.mode = mode
        self.direct_io = direct_io
        self.id = f"asyncckpt-{mode}" + ("-direct" if direct_io else "")
        # Local folders: say which write path explicitly (O_DIRECT is LocalStorage's default).
        self._extra: dict[str, Any] = (
            {"direct_io": direct_io}
            if dest.local_root is not None and "direct_io" not in dest.storage_options
            else {}
        )
        if "direct_io" in self._extra:
            kind = "O_DIRECT, the default" if direct_io else "page cache"
            self.label = f"asyncckpt {mode} ({kind})"
        else:
            self.label = f"asyncckpt {mode}"
        self.options: dict[str, Any] = {
            "queue_size": queue_size, "when_full": when_full, "snapshot": mode,
            "keep_last": 1, "filename": "step_{step}.pt",
        }
        self._ckpt: Any = None

    def unsupported(self) -> str | None:
        try:
            self.dest.asyncckpt_storage(self.id, **self._extra)
        except (ValueError, TypeError) as exc:
            return f"asyncckpt cannot write there: {exc}"
        return None

    def open(self) -> None:
        import asyncckpt

        self._ckpt = asyncckpt.Checkpointer(
            self.dest.asyncckpt_storage(self.id, **self._extra), **self.options
        )

    def _save(self, tree: Any, name: str, step: int, objects: dict[str, Any] | None) -> Pending:
        handle = self._ckpt.save(objects if objects is not None else tree, step=step)

        def wait() -> int:
            info = handle.wait()
            return 0 if info is None else int(info.size)

        return Pending(wait)

    def cleanup(self) -> None:
        # keep_last=1 rotates the files; flush() also waits for the deletions.
        self._ckpt.flush()
        self._names.clear()

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()
        self.dest.remove(self.id)


def contender_ids(modes: tuple[str, ...], direct_io: bool) -> list[str]:
    """Every contender id, in the order the benchmark lists them."""
    ids = []
    for mode in modes:
        ids.append(f"asyncckpt-{mode}")
        if direct_io:
            ids.append(f"asyncckpt-{mode}-direct")
    return ids + ["torch-save", "dcp", "dcp-reused-stager", "lightning", "lightning-asyncckpt",
                  "thread-clone"]


def build_contenders(
    dest: Destination,
    *,
    modes: tuple[str, ...],
    direct_io: bool,
    queue_size: int,
    when_full: str,
    select: tuple[str, ...] | None,
) -> tuple[list[Contender], dict[str, str]]:
    """The contenders to run and, for the others, why they do not run.

    Raises:
        ValueError: ``select`` names an unknown contender.
    """
    want_direct = direct_io and dest.local_root is not None
    if "direct_io" in dest.storage_options:
        want_direct = False  # the user chose; measure that only
    everything: list[Contender] = []
    for mode in modes:
        everything.append(Asyncckpt(dest, mode, direct_io=False, queue_size=queue_size,
                                    when_full=when_full))
        if want_direct:
            everything.append(Asyncckpt(dest, mode, direct_io=True, queue_size=queue_size,
                                        when_full=when_full))
    everything += [TorchSave(dest), Dcp(dest, reuse_stager=False), Dcp(dest, reuse_stager=True),
                   Lightning(dest), LightningAsyncckpt(dest), ThreadClone(dest)]
    known = {c.id for c in everything} | set(contender_ids(modes, True))
    if select is not None:
        unknown = [s for s in select if s not in known]
        if unknown:
            raise ValueError(
                f"--contenders: unknown {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
    chosen: list[Contender] = []
    skipped: dict[str, str] = {}
    for contender in everything:
        if select is not None and contender.id not in select:
            continue
        reason = contender.unsupported()
        if reason is None:
            chosen.append(contender)
        else:
            skipped[contender.id] = reason
    return chosen, skipped
