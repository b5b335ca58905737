"""asyncckpt: asynchronous, crash-safe PyTorch checkpointing.

The training loop hands a snapshot of its state to a bounded queue and goes on; a background
writer serializes it in plain torch.save format, commits it atomically and durably, rotates old
checkpoints and maintains latest/best pointers. Import from here (and ``asyncckpt.storage``,
``asyncckpt.events``); underscored modules are private.
"""

from __future__ import annotations

from . import events, storage
from ._config import BestMetric, CheckpointerConfig, infer_mode
from ._crypto import Encryption
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
from ._events import CheckpointInfo, CheckpointStats
from ._load import Problem, VerifyReport, checkpoints, load, verify
from ._sync import Checkpointer, SyncSaveHandle
from ._writer import AsyncCheckpointer, SaveHandle

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
    "VerifyReport",
    "WriterClosedError",
    "WriterError",
    "__version__",
    "checkpoints",
    "events",
    "infer_mode",
    "load",
    "storage",
    "verify",
]
