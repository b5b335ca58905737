"""asyncckpt: asynchronous, crash-safe PyTorch checkpointing.

The training loop hands a snapshot of its state to a bounded queue and goes on; a background
writer serializes it in plain torch.save format, commits it atomically and durably, rotates old
checkpoints and maintains latest/best pointers. Import from here (and ``asyncckpt.storage``,
``asyncckpt.events``); underscored modules are private.
"""

from __future__ import annotations

# _versions first: importing it refuses a torch older than the floor, naming the release needed
from . import _versions, events, storage  # noqa: F401
from ._core.checkpointer import AsyncCheckpointer, SaveHandle
from ._core.config import CheckpointerConfig
from ._core.dist_read import load_into
from ._core.engine import UntrackedBestWarning
from ._core.events import CheckpointInfo, CheckpointStats
from ._core.load import UnverifiedCheckpointWarning, checkpoints, load
from ._core.sync import Checkpointer, SyncSaveHandle
from ._core.verify import Problem, VerifyReport, verify
from ._errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptIndexError,
    DecryptionError,
    IntegrityError,
    SnapshotMutatedError,
    StorageError,
    TransientStorageError,
    WriterClosedError,
    WriterError,
)
from ._format.best import BestMetric, infer_mode
from ._format.crypto import Encryption

__version__ = "0.1.0"

__all__ = [
    "AsyncCheckpointer",
    "BestMetric",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointStats",
    "Checkpointer",
    "CheckpointerConfig",
    "CorruptIndexError",
    "DecryptionError",
    "Encryption",
    "IntegrityError",
    "Problem",
    "SaveHandle",
    "SnapshotMutatedError",
    "StorageError",
    "SyncSaveHandle",
    "TransientStorageError",
    "UnverifiedCheckpointWarning",
    "UntrackedBestWarning",
    "VerifyReport",
    "WriterClosedError",
    "WriterError",
    "__version__",
    "checkpoints",
    "events",
    "infer_mode",
    "load",
    "load_into",
    "storage",
    "verify",
]
