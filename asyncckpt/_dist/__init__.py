"""Multi-rank checkpoints on torch.distributed: DCP-readable directories committed only when
every rank's part is durable.

Private: the front doors wire it in. The pieces, in the order a save uses them:

* :class:`CheckpointGroup` (``group.py``) -- the dedicated gloo group; every collective, each
  bounded by a timeout;
* :class:`DistSaver` (``saver.py``) -- ``prepare`` (caller thread: plan, snapshot) and
  ``commit`` (writer thread: write, agree, publish), with the plan cache (``planning.py``);
* ``files.py`` -- the directory layout, rank files, manifest, rename;
* ``load.py`` -- ``load_into`` (collective, resharding), ``load_full``, ``verify_directory``.
"""

from __future__ import annotations

from .errors import CheckpointGroupError, DistributedSaveError
from .files import FileRecord, remove_leftovers
from .group import DEFAULT_TIMEOUT, CheckpointGroup
from .load import load_full, load_into, verify_directory
from .saver import CommitResult, DistSaver, RankPart

__all__ = [
    "DEFAULT_TIMEOUT",
    "CheckpointGroup",
    "CheckpointGroupError",
    "CommitResult",
    "DistSaver",
    "DistributedSaveError",
    "FileRecord",
    "RankPart",
    "load_full",
    "load_into",
    "remove_leftovers",
    "verify_directory",
]
