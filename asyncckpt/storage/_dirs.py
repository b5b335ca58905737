"""Removing a multi-rank checkpoint (a directory) from a local folder, crash-safely.

A directory is first renamed to a temporary name in the same folder (one atomic step: from
then on the checkpoint's name is free and nothing can read it half-deleted), the rename is
made durable, and only then is the tree removed. A crash in between leaves a temporary
directory, which the next multi-rank writer to open the folder removes.
"""

from __future__ import annotations

import os
import shutil
import uuid

from .._format.naming import TMP_PREFIX

__all__ = ["CHECKPOINT_MANIFEST", "is_checkpoint_directory", "remove_checkpoint_directory"]

#: the file every multi-rank checkpoint directory holds (its list of files and checksums)
CHECKPOINT_MANIFEST = ".asyncckpt.json"


def is_checkpoint_directory(path: str) -> bool:
    """Whether ``path`` is a real directory (not a link) holding a checkpoint manifest."""
    return (os.path.isdir(path) and not os.path.islink(path)
            and os.path.isfile(os.path.join(path, CHECKPOINT_MANIFEST)))


def remove_checkpoint_directory(path: str) -> str:
    """Move the directory ``path`` aside, make that durable, then delete it; return the
    temporary name it had while being deleted."""
    parent, name = os.path.split(os.path.abspath(path))
    aside = os.path.join(parent, f"{TMP_PREFIX}{name}.removed.{uuid.uuid4().hex[:8]}")
    os.rename(path, aside)
    fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(aside, ignore_errors=True)
    return os.path.basename(aside)
