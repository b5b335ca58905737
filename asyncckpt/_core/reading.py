"""What every reader shares: reach a folder (or one file), read its index, run from sync code.

Readers never open a writer: they open the storage to read, or use an open checkpointer's
storage object as it is (on that checkpointer's loop) and leave it open.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import torch

from .._errors import CheckpointNotFoundError
from .._format.crypto import HEADER_SIZE, Opener
from .._format.index import IndexState
from .._format.naming import INDEX_NAME
from .._format.paths import PathKey
from ..storage import Storage, storage_for
from .folder import CheckpointFolder

__all__ = ["Target", "close_reader", "describe", "open_reader", "open_target", "read_index",
           "restore_numpy", "run_sync", "split_location"]

T = TypeVar("T")


def run_sync(fn: Callable[[], Awaitable[T]], source: object = None) -> T:
    """Run an async function from sync code, also when this thread already runs an event loop
    (Jupyter, an async caller): then it runs on a short-lived helper thread. Reading through
    the storage object of an open checkpointer running in another thread (``ckpt.storage``)
    runs on that checkpointer's loop, where the storage's client sessions live."""
    token = source.writer_token if isinstance(source, Storage) else None
    try:
        running: object | None = anyio.lowlevel.current_token()
    except RuntimeError:
        running = None
    if token is not None and token != running and _still_running(token):
        return anyio.from_thread.run(fn, token=token)  # type: ignore[arg-type]
    if running is None:
        return anyio.run(fn)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="asyncckpt-load") as pool:
        return pool.submit(anyio.run, fn).result()


def _still_running(token: object) -> bool:
    """Whether the loop behind an anyio loop token still runs (asyncio's can be asked)."""
    is_running = getattr(getattr(token, "native_token", None), "is_running", None)
    return True if is_running is None else bool(is_running())


def describe(source: str | os.PathLike[str] | Storage) -> str:
    """The path or URI a user gave, for messages."""
    return source.uri if isinstance(source, Storage) else os.fspath(source)


def split_location(location: str) -> tuple[str, str]:
    """(folder, file name) of a local path or URI."""
    stripped = location.rstrip("/")
    if "://" not in stripped:
        head, tail = os.path.split(stripped)
        return head or ".", tail
    head, _, tail = stripped.rpartition("/")
    return head, tail


@dataclass
class Target:
    """What a reader opened: a folder's storage and index, or one file in a folder."""

    storage: Storage
    index: IndexState | None
    name: str | None  # set when the source named a single file
    opened: bool = True  # False: an open checkpointer's storage, used as it is

    async def close(self) -> None:
        await close_reader(self.storage, self.opened)


async def open_reader(storage: Storage) -> bool:
    """Open ``storage`` to read; False (nothing to close) when an open checkpointer holds it."""
    if storage.writer_token is not None:
        return False
    await storage.open(writer=False)
    return True


async def close_reader(storage: Storage, opened: bool) -> None:
    """Close what :func:`open_reader` opened."""
    if opened and storage.writer_token is None:
        await storage.aclose()


async def read_index(storage: Storage) -> IndexState | None:
    """The folder's index, or None when it has none."""
    return await CheckpointFolder(storage).read_index()


def _followed(location: str) -> str:
    """A link the user named (mmcv's ``latest.pth``) is read as the file it names, in that
    file's folder; links found inside a folder are never followed."""
    if "://" not in location and os.path.islink(location):
        return os.path.realpath(location)
    return location


async def open_target(source: Any, storage_options: Mapping[str, Any] | None) -> Target:
    """Open ``source`` to read: a checkpoint folder, or one file (in a folder or not)."""
    storage = storage_for(source, storage_options=storage_options)
    opened = await open_reader(storage)
    try:
        index = await read_index(storage)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await close_reader(storage, opened)  # remote storages hold a client session
        raise
    if index is not None or isinstance(source, Storage):
        return Target(storage, index, None, opened)
    await close_reader(storage, opened)
    # Not a checkpoint folder: maybe a single checkpoint file inside one.
    location = await anyio.to_thread.run_sync(_followed, describe(source))
    parent, name = split_location(location)
    folder = storage_for(parent, storage_options=storage_options)
    await folder.open(writer=False)
    try:
        if name and await folder.exists(name):
            return Target(folder, await read_index(folder), name)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await folder.aclose()
        raise
    await folder.aclose()
    raise CheckpointNotFoundError(
        f"{describe(source)} is neither a checkpoint folder (no {INDEX_NAME}) nor a file"
    )


async def head(storage: Storage, name: str) -> bytes:
    """The first bytes of ``name`` (enough to recognise an encryption header)."""
    stream = storage.read_stream(name, chunk_size=HEADER_SIZE)
    try:
        async for chunk in stream:
            return chunk
        return b""
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def decrypt(
    storage: Storage, name: str, opener: Opener, max_bytes: int | None = None
) -> bytes:
    """Stream ``name`` through ``opener`` (in a worker thread) and return the plaintext."""
    # aclosing: a chunk that fails to authenticate must close the file now, not at GC
    stream = storage.read_stream(name, max_bytes=max_bytes)
    async with aclosing(stream):  # type: ignore[type-var]
        async for chunk in stream:
            await anyio.to_thread.run_sync(opener.feed, chunk)
    return await anyio.to_thread.run_sync(opener.finish)


def restore_numpy(tree: Any, path: PathKey) -> Any:
    """Turn the tensor at ``path`` back into the numpy array that was saved there."""
    if not path:
        if isinstance(tree, torch.Tensor) and tree.device.type == "cpu":
            return tree.detach().numpy()
        return tree
    key, rest = path[0], path[1:]
    if isinstance(tree, tuple) and isinstance(key, int) and 0 <= key < len(tree):
        items = list(tree)
        items[key] = restore_numpy(items[key], rest)
        return tuple(items)
    if isinstance(tree, (dict, list)):
        try:
            tree[key] = restore_numpy(tree[key], rest)  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            pass
    return tree


