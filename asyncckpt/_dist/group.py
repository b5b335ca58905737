"""The checkpoint process group: the one owner of every collective the engine runs.

It is a dedicated gloo group, created once and collectively (``dist.new_group``), never the
training group: checkpoint collectives run on the writer thread while the training loop runs
its own collectives, and two threads issuing collectives on one group deadlock or mix up
messages. Every wait is bounded by the group's timeout:

* a peer that dies (SIGKILL, OOM) closes its gloo connections; the survivors' pending
  collective fails at once with a connection error;
* a peer that hangs or never arrives makes the collective time out after ``timeout``.

Either way the survivors get a :class:`CheckpointGroupError` naming the operation, and the
group is marked broken: gloo cannot resynchronise a group once a collective failed halfway
(some ranks may have sent data that others never received), so every later call raises at once
instead of exchanging garbage. A rank that fails on its own (a storage error) does not break
the group: it still takes part in the collective and reports its failure in its record.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .._versions import torch_release
from .errors import CheckpointGroupError

__all__ = ["DEFAULT_TIMEOUT", "CheckpointGroup"]

DEFAULT_TIMEOUT = 120.0

# Before torch 2.8 (pytorch#154976) freeing a gloo group holds the GIL while it joins the
# group's worker threads, and a worker that still holds the last collective's tensors needs the
# GIL to free them: freeing a group right after a collective deadlocks now and then. On those
# releases a destroyed group is kept alive until the next one is destroyed (its workers are long
# idle by then), so at most one group's threads and connections outlive destroy().
_FREE_HOLDS_GIL = (torch_release(torch.__version__) or (99, 0)) < (2, 8)
_retired: list[dist.ProcessGroup] = []


class CheckpointGroup:
    """A dedicated gloo process group with bounded, failure-aware collectives.

    Collective to create: every rank of ``ranks_of`` (default: the whole world) must construct
    it, in the same order relative to other group creations.

    Args:
        timeout: seconds any collective may wait for its peers.
        ranks_of: the process group whose ranks take part (default: the world); the new group
            has the same members but its own gloo connections.
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT,
                 ranks_of: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialized: call dist.init_process_group() on every "
                "rank before opening a multi-rank checkpointer"
            )
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        ranks = None if ranks_of is None else dist.get_process_group_ranks(ranks_of)
        self.pg = dist.new_group(ranks=ranks, backend="gloo",
                                 timeout=timedelta(seconds=self.timeout))
        self.rank = dist.get_rank(self.pg)
        self.world_size = dist.get_world_size(self.pg)
        self._broken: BaseException | None = None
        self._sequence = 0
        # one id for this group's lifetime, the same on every rank: temporary directories are
        # named after it, so ranks agree on them without a collective per save
        self.session = self.broadcast(uuid.uuid4().hex[:12] if self.rank == 0 else None,
                                      what="agree on a session id")

    @property
    def broken(self) -> BaseException | None:
        """The failure that broke the group, or None."""
        return self._broken

    def next_sequence(self) -> int:
        """A counter that advances identically on every rank (one per save)."""
        self._sequence += 1
        return self._sequence

    def all_gather(self, obj: Any, *, what: str) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        self._run(what, lambda: dist.all_gather_object(out, obj, group=self.pg))
        return out

    def gather(self, obj: Any, *, what: str) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        self._run(what, lambda: dist.gather_object(
            obj, out, dst=self._global(0), group=self.pg))
        return out

    def scatter(self, objs: list[Any] | None, *, what: str) -> Any:
        """Rank 0's ``objs[r]`` on rank ``r``."""
        out: list[Any] = [None]
        self._run(what, lambda: dist.scatter_object_list(
            out, objs if self.rank == 0 else None, src=self._global(0), group=self.pg))
        return out[0]

    def broadcast(self, obj: Any, *, what: str) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        self._run(what, lambda: dist.broadcast_object_list(
            box, src=self._global(0), group=self.pg))
        return box[0]

    def destroy(self) -> None:
        """Release the group's connections (collective when the group is healthy).

        On torch < 2.8 the group object itself is freed at the next ``destroy()`` (see
        ``_FREE_HOLDS_GIL``); it is deregistered from torch.distributed at once either way.
        """
        if self.pg is not None:
            dist.destroy_process_group(self.pg)
            if _FREE_HOLDS_GIL:
                previous = _retired[:]
                _retired[:] = [self.pg]
                del previous  # freed here, long after their last collective
            self.pg = None

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.pg, group_rank)

    def _run(self, what: str, call: Any) -> None:
        if self._broken is not None:
            raise CheckpointGroupError(
                f"the checkpoint process group is unusable since an earlier collective failed "
                f"({self._broken}); cannot {what}. Restart the job (all ranks) to checkpoint "
                "again"
            ) from self._broken
        try:
            call()
        except Exception as exc:
            self._broken = exc
            raise CheckpointGroupError(
                f"rank {self.rank} of {self.world_size}: could not {what}: a peer rank died, "
                f"failed outside the protocol, or did not arrive within {self.timeout:g} s "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
            ) from exc
