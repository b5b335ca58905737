"""Reading checkpoints back: ``load()`` and ``checkpoints()`` without opening a writer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import anyio
import torch

from ._crypto import HEADER_SIZE, Opener, check_key, check_mode, is_encrypted
from ._errors import CheckpointError, CheckpointNotFoundError, DecryptionError, IntegrityError
from ._events import CheckpointInfo
from ._index import IndexEntry, IndexState, PathKey
from ._naming import INDEX_NAME, TMP_PREFIX
from ._serialize import Hasher
from .storage import Storage, storage_for
from .storage._base import held_by_writer, writer_loop_of

__all__ = ["Problem", "VerifyReport", "checkpoints", "load", "run_sync", "verify"]

logger = logging.getLogger("asyncckpt")
T = TypeVar("T")


def run_sync(fn: Callable[[], Awaitable[T]], source: object = None) -> T:
    """Run an async function from sync code, also when this thread already runs an event loop
    (Jupyter, an async caller): then it runs on a short-lived helper thread. Reading through
    the storage object of an open checkpointer running in another thread (``ckpt.storage``)
    runs on that checkpointer's loop, where the storage's client sessions live."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    writer = writer_loop_of(source) if isinstance(source, Storage) else None
    if writer is not None and writer is not running and writer.is_running():
        return asyncio.run_coroutine_threadsafe(_as_coroutine(fn), writer).result()
    if running is None:
        return anyio.run(fn)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="asyncckpt-load") as pool:
        return pool.submit(anyio.run, fn).result()


async def _as_coroutine(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()


def _describe(source: str | os.PathLike[str] | Storage) -> str:
    return source.uri if isinstance(source, Storage) else os.fspath(source)


def _split(location: str) -> tuple[str, str]:
    stripped = location.rstrip("/")
    if "://" not in stripped:
        head, tail = os.path.split(stripped)
        return head or ".", tail
    head, _, tail = stripped.rpartition("/")
    return head, tail


@dataclass
class _Target:
    storage: Storage
    index: IndexState | None
    name: str | None  # set when the source named a single file
    opened: bool = True  # False: an open checkpointer's storage, used as it is

    async def close(self) -> None:
        await _close_reader(self.storage, self.opened)


async def _open_reader(storage: Storage) -> bool:
    """Open ``storage`` to read; False (nothing to close) when an open checkpointer holds it."""
    if held_by_writer(storage):
        return False
    await storage.open(writer=False)
    return True


async def _close_reader(storage: Storage, opened: bool) -> None:
    if opened and not held_by_writer(storage):
        await storage.aclose()


async def _read_index(storage: Storage) -> IndexState | None:
    try:
        data = await storage.read_bytes(INDEX_NAME)
    except FileNotFoundError:
        return None
    return IndexState.from_json(data, storage.uri_of(INDEX_NAME))


async def _open_target(source: Any, storage_options: Mapping[str, Any] | None) -> _Target:
    storage = storage_for(source, storage_options=storage_options)
    opened = await _open_reader(storage)
    try:
        index = await _read_index(storage)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _close_reader(storage, opened)  # remote storages hold a client session
        raise
    if index is not None or isinstance(source, Storage):
        return _Target(storage, index, None, opened)
    await _close_reader(storage, opened)
    # Not a checkpoint folder: maybe a single checkpoint file inside one.
    parent, name = _split(_describe(source))
    folder = storage_for(parent, storage_options=storage_options)
    await folder.open(writer=False)
    try:
        if name and await folder.exists(name):
            return _Target(folder, await _read_index(folder), name)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await folder.aclose()
        raise
    await folder.aclose()
    raise CheckpointNotFoundError(
        f"{_describe(source)} is neither a checkpoint folder (no {INDEX_NAME}) nor a file"
    )


def _select(index: IndexState, which: object, where: str) -> IndexEntry:
    if not index.entries:
        raise CheckpointNotFoundError(f"{where} holds no committed checkpoints")
    if which == "latest":
        return index.entries[-1]
    if isinstance(which, str) and which.startswith("best:"):
        metric = which[len("best:") :]
        record = index.best.get(metric)
        if record is None:
            tracked = ", ".join(repr(m) for m in index.best) or "none"
            raise CheckpointNotFoundError(
                f"{where} has no best checkpoint for {metric!r} (metrics with one: {tracked})"
            )
        entry = index.get(record.name)
        if entry is None:  # from_json validates this; kept for hand-built states
            raise CheckpointNotFoundError(f"{where}: best {metric!r} names a missing entry")
        return entry
    if isinstance(which, int) and not isinstance(which, bool):
        entry = index.by_step(which)
        if entry is None:
            steps = ", ".join(str(e.step) for e in index.entries[-10:])
            raise CheckpointNotFoundError(
                f"{where} has no checkpoint for step {which} (latest steps: {steps})"
            )
        return entry
    if isinstance(which, str):
        entry = index.get(which)
        if entry is None:
            raise CheckpointNotFoundError(f"{where} has no checkpoint named {which!r}")
        return entry
    raise TypeError(
        "which must be 'latest', 'best:<metric>', a step (int) or a checkpoint name, "
        f"got {which!r}"
    )


async def _verify_stream(storage: Storage, entry: IndexEntry) -> None:
    hasher, size = Hasher(), 0
    async for chunk in storage.read_stream(entry.name):
        hasher.update(chunk)
        size += len(chunk)
    _check(storage, entry, size, hasher.hexdigest())


def _check(storage: Storage, entry: IndexEntry, size: int, checksum: str) -> None:
    uri = storage.uri_of(entry.name)
    if size != entry.size:
        raise IntegrityError(
            f"{uri} is {size} bytes but the index recorded {entry.size}: the file was truncated "
            "or replaced after it was committed"
        )
    if checksum != entry.checksum:
        raise IntegrityError(
            f"{uri} does not match its checksum (index {entry.checksum}, file {checksum}): "
            "the file is corrupted"
        )


async def _head(storage: Storage, name: str) -> bytes:
    """The first bytes of ``name`` (enough to recognise an encryption header)."""
    stream = storage.read_stream(name, chunk_size=HEADER_SIZE)
    try:
        async for chunk in stream:
            return chunk
        return b""
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def _decrypt(storage: Storage, name: str, opener: Opener) -> bytes:
    """Stream ``name`` through ``opener`` (in a worker thread) and return the plaintext."""
    async for chunk in storage.read_stream(name):
        await anyio.to_thread.run_sync(opener.feed, chunk)
    return await anyio.to_thread.run_sync(opener.finish)


def _restore_numpy(tree: Any, path: PathKey) -> Any:
    if not path:
        if isinstance(tree, torch.Tensor) and tree.device.type == "cpu":
            return tree.detach().numpy()
        return tree
    key, rest = path[0], path[1:]
    if isinstance(tree, tuple) and isinstance(key, int) and 0 <= key < len(tree):
        items = list(tree)
        items[key] = _restore_numpy(items[key], rest)
        return tuple(items)
    if isinstance(tree, (dict, list)):
        try:
            tree[key] = _restore_numpy(tree[key], rest)  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            pass
    return tree


def checkpoints(
    source: str | os.PathLike[str] | Storage,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> list[CheckpointInfo]:
    """List the committed checkpoints of a folder, oldest first, without opening a writer.

    Raises:
        CheckpointNotFoundError: ``source`` is not a checkpoint folder.
        CorruptIndexError: its index cannot be read.
    """

    async def run() -> list[CheckpointInfo]:
        target = await _open_target(source, storage_options)
        try:
            if target.index is None or target.name is not None:
                raise CheckpointNotFoundError(f"{_describe(source)} is not a checkpoint folder")
            return [
                CheckpointInfo(e.name, target.storage.uri_of(e.name), e.step, e.epoch, e.time,
                               e.size, e.checksum, dict(e.metrics))
                for e in target.index.entries
            ]
        finally:
            await target.close()

    return run_sync(run, source)


def load(
    source: str | os.PathLike[str] | Storage,
    which: str | int = "latest",
    *,
    map_location: Any = None,
    weights_only: bool = True,
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    dec_key: bytes | None = None,
    dec_mode: str | None = None,
) -> Any:
    """Load a checkpoint written by asyncckpt (or any torch.save file).

    Args:
        source: a checkpoint folder, or one checkpoint file in it (or outside any folder).
        which: for a folder: ``"latest"``, ``"best:<metric>"``, a step, or a file name.
        map_location: as for ``torch.load``.
        weights_only: as for ``torch.load``; True (the default) refuses arbitrary pickles.
            Passing False executes whatever the file's pickle says: only for files you trust.
        verify: check the file's size and checksum against the index before loading (for an
            encrypted file: of the stored bytes, so it needs no key).
        dec_key: the key of an encrypted checkpoint (see :class:`Encryption`); the whole file is
            authenticated while it is decrypted (in memory) and nothing is returned unless all
            of it authenticates.
        dec_mode: ``"AES-GCM"`` or ``"AES-CBC"``; None accepts the mode the file's header names.

    Returns:
        The saved state. Numpy arrays that were saved come back as numpy arrays (plain
        ``torch.load`` returns them as tensors).

    Raises:
        CheckpointNotFoundError: nothing matches ``source`` / ``which``.
        IntegrityError: the file does not match its checksum.
        DecryptionError: the file is encrypted and ``dec_key`` is missing or wrong, ``dec_mode``
            is not its mode, it is not encrypted but ``dec_key`` was given, or its bytes were
            modified or truncated.
        CorruptIndexError: the folder's index cannot be read.
        TypeError, ValueError: ``dec_key`` is not 16, 24 or 32 bytes, or ``dec_mode`` is unknown.
    """
    if not isinstance(weights_only, bool):
        raise TypeError(f"weights_only must be a bool, got {weights_only!r}")
    if dec_key is not None:  # bad keys and modes fail before anything is read
        dec_key = check_key(dec_key, "dec_key")
    if dec_mode is not None:
        check_mode(dec_mode, "dec_mode")

    async def fetch() -> tuple[str | bytes, IndexEntry | None]:
        target = await _open_target(source, storage_options)
        try:
            if target.name is not None:
                if which != "latest":
                    raise ValueError(
                        f"which={which!r} selects among a folder's checkpoints, but "
                        f"{_describe(source)} is a single file"
                    )
                entry = target.index.get(target.name) if target.index is not None else None
                name = target.name
                if entry is None:
                    logger.info("%s is not listed in an asyncckpt index; loading it unverified",
                                target.storage.uri_of(name))
            elif target.index is None:
                raise CheckpointNotFoundError(f"{target.storage.uri} has no {INDEX_NAME}")
            else:
                entry = _select(target.index, which, target.storage.uri)
                name = entry.name
            uri = target.storage.uri_of(name)
            recorded = None if entry is None else entry.encryption
            if recorded is not None or is_encrypted(await _head(target.storage, name)):
                if dec_key is None:
                    mode = f" ({recorded})" if recorded else ""
                    raise DecryptionError(
                        f"{uri} is encrypted{mode}; pass dec_key= (and dec_mode=) to load it"
                    )
                if verify and entry is not None:
                    await _verify_stream(target.storage, entry)
                opener = Opener(dec_key, dec_mode, where=uri)
                return await _decrypt(target.storage, name, opener), entry
            if dec_key is not None:
                raise DecryptionError(
                    f"{uri} is not encrypted, but dec_key was given; load it without dec_key "
                    "if a plain file is what you expect"
                )
            path = target.storage.local_path(name)
            if path is not None:
                if verify and entry is not None:
                    await _verify_stream(target.storage, entry)
                return path, entry
            data = await target.storage.read_bytes(name)
            if verify and entry is not None:
                hasher = Hasher()
                hasher.update(data)
                _check(target.storage, entry, len(data), hasher.hexdigest())
            return data, entry
        except FileNotFoundError as exc:
            raise CheckpointNotFoundError(
                f"{exc.filename or _describe(source)} is listed but missing"
            ) from exc
        finally:
            await target.close()

    where, entry = run_sync(fetch, source)
    fileobj: Any = io.BytesIO(where) if isinstance(where, bytes) else where
    state = torch.load(fileobj, map_location=map_location, weights_only=weights_only)
    if entry is not None:
        for path in entry.numpy_paths:
            state = _restore_numpy(state, path)
    return state


def _load_on_cpu(data: Any) -> None:
    torch.load(data, map_location="cpu", weights_only=True)


@dataclass(frozen=True)
class Problem:
    """Something :func:`verify` found wrong.

    Attributes:
        kind: ``"index"`` (unreadable index), ``"missing"`` (listed file absent), ``"size"`` /
            ``"checksum"`` (bytes differ from what was committed), ``"unreadable"`` (torch.load
            failed; only with ``load=True``).
        name: the checkpoint concerned (None for the index).
        message: a human-readable explanation.
    """

    kind: Literal["index", "missing", "size", "checksum", "unreadable"]
    name: str | None
    message: str


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify`."""

    uri: str
    checked: tuple[str, ...]
    problems: tuple[Problem, ...]
    #: temporary files of a writer that did not finish (harmless; removed when a writer opens)
    leftovers: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    source: str | os.PathLike[str] | Storage,
    *,
    load: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Check every checkpoint a folder's index lists against its recorded size and checksum.

    Args:
        source: the checkpoint folder.
        load: also ``torch.load(weights_only=True)`` each checkpoint (slower; catches files
            that verify but do not unpickle, e.g. written by an incompatible torch).

    Returns:
        A report; ``report.ok`` is False when anything is wrong. Problems are collected, not
        raised, so one bad file does not hide the others.

    Raises:
        CheckpointNotFoundError: ``source`` is not a checkpoint folder at all.
    """

    async def run() -> VerifyReport:
        storage = storage_for(source, storage_options=storage_options)
        opened = await _open_reader(storage)
        try:
            names = await storage.list()
            leftovers = tuple(n for n in names if n.startswith(TMP_PREFIX))
            try:
                index = await _read_index(storage)
            except CheckpointError as exc:
                problem = Problem("index", None, str(exc))
                return VerifyReport(storage.uri, (), (problem,), leftovers)
            if index is None:
                raise CheckpointNotFoundError(f"{storage.uri} has no {INDEX_NAME}")
            problems: list[Problem] = []
            for entry in index.entries:
                uri = storage.uri_of(entry.name)
                try:
                    await _verify_stream(storage, entry)
                except FileNotFoundError:
                    problems.append(Problem("missing", entry.name, f"{uri} is listed but missing"))
                    continue
                except IntegrityError as exc:
                    kind: Literal["size", "checksum"] = (
                        "size" if "bytes but the index" in str(exc) else "checksum"
                    )
                    problems.append(Problem(kind, entry.name, str(exc)))
                    continue
                if load and entry.encryption is None:  # encrypted ones need a key to load
                    try:
                        path = storage.local_path(entry.name)
                        if path is None:
                            data: Any = io.BytesIO(await storage.read_bytes(entry.name))
                        else:
                            data = path
                        await anyio.to_thread.run_sync(_load_on_cpu, data)
                    except Exception as exc:
                        problems.append(Problem("unreadable", entry.name, f"{uri}: {exc}"))
            checked = tuple(e.name for e in index.entries)
            return VerifyReport(storage.uri, checked, tuple(problems), leftovers)
        finally:
            await _close_reader(storage, opened)

    return run_sync(run, source)
