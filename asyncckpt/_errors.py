"""Exceptions raised by asyncckpt.

One root, so ``except asyncckpt.CheckpointError`` catches everything the library raises on its own
behalf; bad arguments raise the built-in ``TypeError`` / ``ValueError`` instead::

    CheckpointError
     ├── WriterError                 a background save failed; raised in the training loop at the
     │                               next save()/flush()/close(), the original is ``__cause__``
     ├── WriterClosedError           the checkpointer was used after close()
     ├── StorageError                a storage operation failed (``__cause__``: the OS/SDK error)
     │    └── TransientStorageError  worth retrying: throttling, timeouts, connection resets
     ├── CorruptIndexError           the index document is unreadable or inconsistent
     ├── IntegrityError              a checkpoint's bytes do not match the checksum in the index
     │    └── DecryptionError        an encrypted checkpoint cannot be authenticated: wrong key or
     │                               mode, not encrypted, or modified / truncated
     ├── SnapshotMutatedError        check_snapshot: a tensor copied in the background (pipelined
     │                               snapshot) was changed in place before its copy completed
     └── CheckpointNotFoundError     no checkpoint matches the request (also a ``LookupError``)
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptIndexError",
    "DecryptionError",
    "IntegrityError",
    "SnapshotMutatedError",
    "StorageError",
    "TransientStorageError",
    "WriterClosedError",
    "WriterError",
]


class CheckpointError(Exception):
    """Base class of every exception asyncckpt raises on its own behalf."""


class WriterError(CheckpointError):
    """A background save failed.

    Raised in the caller at the next ``save()``, ``flush()`` or ``close()``; the original exception
    is chained as ``__cause__``. When several saves failed before the caller looked, ``errors``
    holds all of them, oldest first.
    """

    def __init__(self, message: str, errors: tuple[BaseException, ...] = ()) -> None:
        super().__init__(message)
        self.errors = errors


class WriterClosedError(CheckpointError):
    """The checkpointer is closed (or closing) and accepts no more saves."""


class StorageError(CheckpointError):
    """A storage backend operation failed permanently (or ran out of retries).

    Attributes:
        uri: the object or file the operation was about, when known.
    """

    def __init__(self, message: str, uri: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri


class TransientStorageError(StorageError):
    """A storage failure worth retrying (throttling, timeouts, connection resets)."""


class CorruptIndexError(CheckpointError):
    """The index document cannot be parsed or does not describe a valid checkpoint set."""


class IntegrityError(CheckpointError):
    """A checkpoint's bytes do not match the size or checksum recorded in the index.

    Attributes:
        kind: ``"size"`` (the length differs), ``"checksum"`` (same length, other bytes), or
            None when the error is about something else (a subclass, e.g. decryption).
        uri: the file concerned, when known.
    """

    def __init__(self, message: str, kind: str | None = None, uri: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.uri = uri


class DecryptionError(IntegrityError):
    """An encrypted checkpoint cannot be read back: no key or the wrong key or mode was given, it
    is not encrypted at all, or its bytes were modified, reordered or truncated. Never partial
    plaintext: nothing of a file is returned unless all of it authenticates."""


class SnapshotMutatedError(CheckpointError):
    """A tensor of a pipelined snapshot was modified in place before its background copy completed.

    Raised (through the save's handle and at the next ``save()`` / ``flush()`` / ``close()``)
    only with ``check_snapshot=True``; the save fails rather than commit a state that never
    existed. Attributes:
        path: where the tensor is in the state, e.g. ``state['model'].state_dict()['0.weight']``.
    """

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class CheckpointNotFoundError(CheckpointError, LookupError):
    """No checkpoint matches the request (empty folder, unknown step, no best for a metric)."""
