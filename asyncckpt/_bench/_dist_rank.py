"""What each rank of the multi-rank benchmark runs, in lockstep with the others::

    join the process group (gloo; cpu:gloo,cuda:nccl for --device cuda)
    for each size, layout:   build the state (the same seed on every rank: replicated, as
                             under DDP) and open every contender afresh
        for each round:      the floors of this rank's share (copy into a warm buffer; a plain
                             write + fsync, every rank at once), then every contender in a
                             rotated order, one save each: barrier, save() (stall), wait until
                             durable, barrier, delete it (untimed), barrier
        close the contenders
    training loop            (see _training; asyncckpt eager against no checkpointing,
                             each block started on every rank at once)
    hand the raw figures to the parent

A rank's *share* is the part of the replicated state it writes: tensors are dealt to the
least-loaded rank, largest first, which is about what DCP's de-duplication of replicated items
(and asyncckpt's plan) gives each rank.
"""

from __future__ import annotations

import inspect
import os
import pickle
import shutil
import time
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ._contenders import Asyncckpt, Contender, Dcp, Pending, _done, _torch_save_durable
from ._dest import Destination
from ._measure import MemoryProbe
from ._references import References, _storages
from ._states import make_state
from ._training import run_training

__all__ = ["make_contenders", "rank_main", "share_of"]


class RankAsyncckpt(Asyncckpt):
    """asyncckpt's eager ``Checkpointer``, multi-rank because torch.distributed runs."""

    def __init__(self, dest: Destination) -> None:
        super().__init__(dest, "eager", direct_io=False, queue_size=1, when_full="block")
        self.label = "asyncckpt Checkpointer (eager, multi-rank)"

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()
        dist.barrier()  # rank 0 writes the index at close; the folder goes after every rank
        if dist.get_rank() == 0:
            self.dest.remove(self.id)


class RankZeroTorchSave(Contender):
    """``torch.save`` + fsync of the full state on rank 0; every rank waits for it.

    The benchmark's state is replicated, so rank 0 already holds all of it and nothing needs
    gathering; the other ranks wait at a barrier, as a training loop that saves this way does.
    """

    id = "torch-save-rank0"
    label = "torch.save + fsync on rank 0 (all ranks wait)"

    def _save(self, tree: Any, name: str, step: int, objects: dict[str, Any] | None) -> Pending:
        nbytes = _torch_save_durable(tree, self.dest, name) if dist.get_rank() == 0 else 0
        dist.barrier()
        return _done(nbytes)

    def cleanup(self) -> None:
        if dist.get_rank() == 0:
            super().cleanup()
        self._names.clear()


class CachedStagingDcp(Dcp):
    """DCP ``async_save`` reusing its staging buffers through one ``FileSystemWriter`` with
    ``cache_staged_state_dict=True`` (the torch releases before ``DefaultStager``)."""

    def __init__(self, dest: Destination) -> None:
        super().__init__(dest, reuse_stager=False)
        self.id = "dcp-reused-stager"
        self.label = "DCP async_save (cache_staged_state_dict)"
        self._cached: Any = None

    def unsupported(self) -> str | None:
        import torch.distributed.checkpoint as dcp

        params = inspect.signature(dcp.FileSystemWriter).parameters
        if "cache_staged_state_dict" not in params:
            return (f"torch {torch.__version__} has neither DCP's DefaultStager nor "
                    "FileSystemWriter(cache_staged_state_dict=True)")
        if not torch.cuda.is_available():
            # its cache is allocated in pinned memory, which needs a CUDA device
            return (f"torch {torch.__version__} has no DCP DefaultStager, and "
                    "FileSystemWriter(cache_staged_state_dict=True) needs CUDA (pinned memory)")
        return None

    def _writer(self, name: str) -> Any:
        import torch.distributed.checkpoint as dcp

        # one writer for every save: the staged copy is cached in it
        if self._cached is None:
            self._cached = dcp.FileSystemWriter(self.dest.path(name), sync_files=True,
                                                cache_staged_state_dict=True)
        else:
            self._cached.reset(self.dest.path(name))
        return self._cached


def _has_default_stager() -> bool:
    try:
        from torch.distributed.checkpoint.staging import DefaultStager  # noqa: F401
    except ImportError:
        return False
    return True


def make_contenders(dest: Destination, select: tuple[str, ...]) -> list[Contender]:
    """The multi-rank contenders named in ``select``, in that order.

    Raises:
        ValueError: one of them cannot run with this torch (the message says why).
    """
    reused: Contender
    if _has_default_stager():
        reused = Dcp(dest, reuse_stager=True)
        reused.label = "DCP async_save (reused DefaultStager)"
    else:
        reused = CachedStagingDcp(dest)
    fresh = Dcp(dest, reuse_stager=False)
    fresh.label = "DCP async_save (new stager each save)"
    known: dict[str, Contender] = {
        c.id: c for c in (RankAsyncckpt(dest), fresh, reused, RankZeroTorchSave(dest))}
    chosen = [known[cid] for cid in select]
    for contender in chosen:
        reason = contender.unsupported()
        if reason is not None:
            raise ValueError(f"{contender.id}: {reason}")
    return chosen


def staging_used() -> str:
    """How the ``dcp-reused-stager`` contender reuses DCP's staging buffers with this torch."""
    if _has_default_stager():
        return "DefaultStager(StagingOptions(...)) passed as async_save(async_stager=...)"
    return "FileSystemWriter(cache_staged_state_dict=True), one writer for every save"


def share_of(sizes: list[int], rank: int, world: int) -> list[int]:
    """Indices of the tensors ``rank`` writes: each to the least-loaded rank, largest first."""
    load = [0] * world
    mine: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(world), key=lambda r: (load[r], r))
        load[target] += sizes[i]
        if target == rank:
            mine.append(i)
    return sorted(mine)


def _floors(refs: References) -> dict[str, float]:
    copies = [refs.run(ref) for ref in (("copy_",) if refs.cuda else ("copy_", "memcpy"))]
    dist.barrier()  # every rank writes at once
    write = refs.run("write-buffered")
    dist.barrier()
    return {"copy_s": min(r.seconds for r in copies if r is not None),
            "write_s": write.seconds if write is not None else float("nan")}


def _save_once(contender: Contender, tree: Any, step: int, probe: MemoryProbe) -> dict[str, Any]:
    probe.begin()
    dist.barrier()
    t0 = time.perf_counter()
    pending = contender.save(tree, step)
    t1 = time.perf_counter()
    nbytes = pending.wait()
    t2 = time.perf_counter()
    probe.end()
    dist.barrier()  # every rank's part is durable before anything is deleted
    contender.cleanup()
    dist.barrier()
    extra, cuda_extra = probe.settle(contender.id)
    return {"step": step, "stall_s": t1 - t0, "durable_s": t2 - t0, "bytes": nbytes,
            "peak_extra_rss_bytes": extra, "peak_extra_cuda_bytes": cuda_extra}


def _run_case(spec: dict[str, Any], dest: Destination, size: int, layout: str,
              device: str, rank: int, world: int) -> dict[str, Any]:
    state = make_state(layout, size, device=device, seed=spec["seed"])
    storages = [s for s in _storages(state.tree) if s.nbytes()]
    mine = share_of([s.nbytes() for s in storages], rank, world)
    share = {f"s{i}": torch.empty(0, dtype=torch.uint8, device=storages[i].device)
             .set_(storages[i]) for i in mine}
    share_bytes = sum(storages[i].nbytes() for i in mine)
    refs = References(share, max(share_bytes, 1),
                      Destination(os.path.join(dest.root, f".floors-rank{rank}")))
    contenders = make_contenders(dest, tuple(spec["contenders"]))
    probe = MemoryProbe(cuda=device == "cuda")
    floors: list[dict[str, float]] = []
    saves: dict[str, list[dict[str, Any]]] = {c.id: [] for c in contenders}
    for contender in contenders:
        contender.open()
    # No try/finally: closing is collective, and after a failure the other ranks are not there
    # to take part; the parent ends every rank and removes its own destination.
    for round_ in range(spec["saves"]):
        floors.append(_floors(refs))
        shift = round_ % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            saves[contender.id].append(_save_once(contender, state.tree, round_ + 1, probe))
    for contender in contenders:
        contender.close()
    dist.barrier()
    shutil.rmtree(refs.dest.root, ignore_errors=True)
    return {"size": size, "layout": layout, "state_bytes": state.nbytes,
            "tensors": state.tensors, "share_bytes": share_bytes, "floors": floors,
            "saves": saves, "labels": {c.id: c.label for c in contenders}}


def _run_training(spec: dict[str, Any], dest: Destination, device: str) -> dict[str, Any]:
    eager = make_contenders(dest, ("asyncckpt-eager",))[0]
    eager.open()
    # Every block starts on all ranks at once (as DDP's gradient all-reduce keeps ranks in
    # step), so one rank's baseline block never overlaps another rank's saving block.
    training = run_training([eager], nbytes=spec["train_size"], batch=spec["train_batch"],
                            rounds=spec["train_rounds"], save_every=spec["save_every"],
                            device=device, seed=spec["seed"], tick=lambda _: dist.barrier())
    eager.close()
    return training


def rank_main(rank: int, world: int, port: int, spec: dict[str, Any], results: Any) -> None:
    """Entry of one rank process: run the cases of ``spec``; put ``(rank, pickled figures or
    failure text)`` on ``results``."""
    torch.set_num_threads(1)  # the ranks share the machine's cores
    device = spec["device"]
    out: dict[str, Any] | str
    try:
        if device == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group("cpu:gloo,cuda:nccl" if device == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=spec["timeout_s"]))
        dest = Destination(spec["dest"])
        cases = [_run_case(spec, dest, size, layout, device, rank, world)
                 for size in spec["sizes"] for layout in spec["layouts"]]
        training = _run_training(spec, dest, device) if spec["training"] else None
        out = {"rank": rank, "cases": cases, "training": training}
    except BaseException as exc:  # reported to the parent, which stops the other ranks
        traceback.print_exc()
        out = f"rank {rank}: {type(exc).__name__}: {exc}".splitlines()[0][:500]
    results.put((rank, pickle.dumps(out)))
    results.close()
    results.join_thread()  # the figures reach the parent before this process goes
    # No destroy_process_group: on torch < 2.8 freeing a gloo group can deadlock
    # (pytorch#154976), and a failed peer would make it wait; the sockets close at exit.
    os._exit(0)
