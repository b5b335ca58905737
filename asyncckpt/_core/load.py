"""Reading checkpoints back: ``load()`` and ``checkpoints()`` without opening a writer.

A folder a live writer rotates is read consistently: the index names a committed file, and if
that file is rotated away before it is opened, the index is read again and the choice is made
anew (``which`` still decides). Once a local file is open, its bytes are checked and loaded
through that same open file, so a file swapped in meanwhile is never loaded unchecked.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from typing import IO, Any

import anyio
import torch

from .._errors import CheckpointNotFoundError, DecryptionError, IntegrityError
from .._format.crypto import Opener, check_key, check_mode, is_encrypted
from .._format.hashing import Hasher
from .._format.index import IndexEntry
from .._format.naming import INDEX_NAME
from ..storage import Storage
from ..storage._limits import ObjectTooLargeError
from .dist_read import load_directory
from .events import CheckpointInfo
from .folder import CheckpointFolder, select_entry
from .reading import (
    Target,
    decrypt,
    describe,
    head,
    open_target,
    read_index,
    restore_numpy,
    run_sync,
)

__all__ = ["UnverifiedCheckpointWarning", "checkpoints", "load", "run_sync"]

#: How often a reader of a live folder re-reads the index after its choice was rotated away.
_LIVE_ATTEMPTS = 5
_CHUNK = 8 << 20
#: what ``fetch`` returns for an entry when the state itself was loaded (a multi-rank checkpoint)
_DIRECTORY: Any = object()


class UnverifiedCheckpointWarning(UserWarning):
    """A file no asyncckpt index lists was loaded: there was no size or checksum to check."""


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
        target = await open_target(source, storage_options)
        try:
            if target.index is None or target.name is not None:
                raise CheckpointNotFoundError(f"{describe(source)} is not a checkpoint folder")
            folder = CheckpointFolder(target.storage)
            return [folder.info(e) for e in target.index.entries]
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
            encrypted file: of the stored bytes, so it needs no key). The bytes checked are
            the bytes loaded.
        dec_key: the key of an encrypted checkpoint (see :class:`Encryption`); the whole file is
            authenticated while it is decrypted (in memory) and nothing is returned unless all
            of it authenticates.
        dec_mode: ``"AES-GCM"`` or ``"AES-CBC"``; None accepts the mode the file's header names.

    Returns:
        The saved state. Numpy arrays that were saved come back as numpy arrays (plain
        ``torch.load`` returns them as tensors). A multi-rank checkpoint comes back whole, in
        this one process: every tensor assembled from its shards (use :func:`load_into` to
        load one into sharded state on several ranks).

    Warns:
        UnverifiedCheckpointWarning: ``source`` is a single plain (not encrypted) file that no
            index lists, so nothing could be checked (not with ``verify=False``).

    Raises:
        CheckpointNotFoundError: nothing matches ``source`` / ``which``.
        IntegrityError: the file does not match its checksum.
        DecryptionError: the file is encrypted and ``dec_key`` is missing or wrong, ``dec_mode``
            is not its mode, it is not encrypted but ``dec_key`` was given, or its bytes were
            modified or truncated.
        CorruptIndexError: the folder's index cannot be read.
        NotARegularFileError: (a StorageError) the entry is a link, a FIFO, a device or a
            folder, not a regular file; it is never read.
        TypeError, ValueError: ``dec_key`` is not 16, 24 or 32 bytes, or ``dec_mode`` is unknown.
    """
    if not isinstance(weights_only, bool):
        raise TypeError(f"weights_only must be a bool, got {weights_only!r}")
    if dec_key is not None:  # bad keys and modes fail before anything is read
        dec_key = check_key(dec_key, "dec_key")
    if dec_mode is not None:
        check_mode(dec_mode, "dec_mode")

    async def fetch() -> tuple[Any, IndexEntry | None]:
        target = await open_target(source, storage_options)
        try:
            for attempt in range(_LIVE_ATTEMPTS):
                entry, name = _choose(target, which, source)
                if entry is not None and entry.kind is not None:  # a multi-rank checkpoint
                    storage = target.storage
                    return await load_directory(storage, entry, verify=verify), _DIRECTORY
                try:
                    return await _read(target.storage, name, entry, verify, dec_key, dec_mode)
                except FileNotFoundError as exc:
                    # Rotated away since the index was read? Then choose again from the new
                    # index; a file the index still lists is really missing.
                    if target.name is not None or attempt + 1 == _LIVE_ATTEMPTS:
                        missing = exc
                        break
                    fresh = await read_index(target.storage)
                    if fresh is not None and entry is not None and fresh.get(name) == entry:
                        missing = exc
                        break
                    target.index = fresh
            raise CheckpointNotFoundError(
                f"{missing.filename or describe(source)} is listed but missing"
            ) from missing
        finally:
            await target.close()

    data, entry = run_sync(fetch, source)
    if entry is _DIRECTORY:
        return data
    try:
        fileobj: Any = io.BytesIO(data) if isinstance(data, bytes) else data
        state = torch.load(fileobj, map_location=map_location, weights_only=weights_only)
    finally:
        if not isinstance(data, bytes):
            data.close()
    if entry is not None:
        for path in entry.numpy_paths:
            state = restore_numpy(state, path)
    return state


def _choose(target: Target, which: object, source: object) -> tuple[IndexEntry | None, str]:
    """The entry (None for an unlisted single file) and the name to read."""
    if target.name is not None:
        if which != "latest":
            raise ValueError(
                f"which={which!r} selects among a folder's checkpoints, but "
                f"{describe(source)} is a single file"  # type: ignore[arg-type]
            )
        entry = target.index.get(target.name) if target.index is not None else None
        return entry, target.name
    if target.index is None:
        raise CheckpointNotFoundError(f"{target.storage.uri} has no {INDEX_NAME}")
    entry = select_entry(target.index, which, target.storage.uri)
    return entry, entry.name


async def _read(
    storage: Storage,
    name: str,
    entry: IndexEntry | None,
    verify: bool,
    dec_key: bytes | None,
    dec_mode: str | None,
) -> tuple[bytes | IO[bytes], IndexEntry | None]:
    """The bytes of ``name`` (or an open local file positioned at 0), checked if asked."""
    uri = storage.uri_of(name)
    folder = CheckpointFolder(storage)
    recorded = None if entry is None else entry.encryption
    if recorded is not None or is_encrypted(await head(storage, name)):
        if dec_key is None:
            mode = f" ({recorded})" if recorded else ""
            raise DecryptionError(
                f"{uri} is encrypted{mode}; pass dec_key= (and dec_mode=) to load it"
            )
        if verify and entry is not None:
            await folder.check(entry)
        opener = Opener(dec_key, dec_mode, where=uri)
        max_bytes = None if entry is None else entry.size
        return await decrypt(storage, name, opener, max_bytes), entry
    if dec_key is not None:
        raise DecryptionError(
            f"{uri} is not encrypted, but dec_key was given; load it without dec_key "
            "if a plain file is what you expect"
        )
    if verify and entry is None:
        warnings.warn(
            f"{uri} is not listed in an asyncckpt index; loading it without checking its size "
            "or checksum",
            UnverifiedCheckpointWarning,
            stacklevel=2,
        )
    local = await anyio.to_thread.run_sync(storage.open_local, name)
    if local is not None:
        try:
            if verify and entry is not None:
                hasher, size = Hasher(), 0
                while size <= entry.size:  # one byte past the recorded size tells enough
                    chunk = await anyio.to_thread.run_sync(
                        local.read, min(_CHUNK, entry.size + 1 - size)
                    )
                    if not chunk:
                        break
                    hasher.update(chunk)
                    size += len(chunk)
                folder.compare_at(uri, entry, size, hasher.hexdigest())
                local.seek(0)
        except BaseException:
            local.close()
            raise
        return local, entry
    max_bytes = None if entry is None else entry.size
    try:
        data = await storage.read_bytes(name, max_bytes=max_bytes)
    except ObjectTooLargeError as exc:
        raise IntegrityError(
            f"{uri} holds more than the {max_bytes} bytes the index recorded", kind="size",
            uri=uri,
        ) from exc
    if verify and entry is not None:
        hasher = Hasher()
        hasher.update(data)
        folder.compare(entry, len(data), hasher.hexdigest())
    return data, entry
