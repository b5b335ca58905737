"""Real multi-process runs for the multi-rank tests: launch gloo ranks, run a scenario, collect.

Ranks are forked from a forkserver that has torch and asyncckpt imported already, so a run
of 2-4 ranks starts in a fraction of a second instead of re-importing torch per rank. Each
rank runs ``scenario(ctx, *args)`` (a function of this module, so every rank can import it)
and its return value (or its exception, pickled) comes back through a queue.

States are derived from seeds, so the parent can recompute what any step must contain.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from asyncckpt._dist import CheckpointGroup, DistSaver

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "torch.distributed.checkpoint", "asyncckpt._dist"])
JOIN_TIMEOUT = 120.0  # hang detection only: a run that takes longer has a bug


@dataclass
class RankContext:
    """What a scenario gets in each rank."""

    rank: int
    world: int
    events: Any  # a multiprocessing queue to the parent (progress reports)

    def report(self, message: object) -> None:
        self.events.put((self.rank, message))


@dataclass
class RankFailure:
    """A scenario raised in a rank: the exception's type name, message and traceback."""

    kind: str
    message: str
    trace: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, scenario: Callable[..., Any], args: tuple[Any, ...],
           results: Any, events: Any) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
        try:
            out: Any = scenario(RankContext(rank, world, events), *args)
        except BaseException as exc:
            out = RankFailure(type(exc).__name__, str(exc), traceback.format_exc())
        # plain pickle: torch's queue reducers would pass tensors as shared-memory handles
        # owned by this process, which exits right after
        results.put((rank, pickle.dumps(out)))
    finally:
        # flush the queues' feeder threads first: on torch < 2.8 freeing a gloo group can
        # deadlock holding the GIL (pytorch#154976), and a result still in the feeder thread
        # would never reach the parent
        for q in (results, events):
            q.close()
            q.join_thread()
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: S110 - a peer may be gone (fault tests); nothing to release
            pass
        os._exit(0)  # skip atexit/gloo teardown, which can block on dead peers


class Ranks:
    """A started set of ranks; ``wait()`` collects their results."""

    def __init__(self, world: int, scenario: Callable[..., Any], *args: Any) -> None:
        self.world = world
        self.results = _CTX.Queue()
        self.events = _CTX.Queue()
        port = _free_port()
        self.procs = [
            _CTX.Process(target=_entry, args=(r, world, port, scenario, args, self.results,
                                              self.events), daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()

    def next_event(self, timeout: float = JOIN_TIMEOUT) -> tuple[int, Any]:
        """The next progress report of any rank."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            self.kill_all()
            raise TimeoutError(f"no progress report from any rank within {timeout} s") from None

    def kill(self, rank: int) -> None:
        self.procs[rank].kill()
        self.procs[rank].join(JOIN_TIMEOUT)

    def kill_all(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()

    def _drain(self, out: dict[int, Any]) -> None:
        while True:
            try:
                rank, value = self.results.get(timeout=0.5)
            except queue.Empty:
                return
            out[rank] = pickle.loads(value)

    def wait(self, ranks: list[int] | None = None) -> dict[int, Any]:
        """Results of ``ranks`` (default: all); raises if one did not finish in time."""
        wanted = set(range(self.world) if ranks is None else ranks)
        out: dict[int, Any] = {}
        deadline = time.monotonic() + JOIN_TIMEOUT
        try:
            while missing := wanted - out.keys():
                try:
                    rank, value = self.results.get(timeout=1.0)
                except queue.Empty:
                    # a rank flushes its result before it exits, so one that exited without
                    # sending it died (signal, os._exit in the library, interpreter crash)
                    dead = {r: self.procs[r].exitcode for r in missing
                            if self.procs[r].exitcode is not None}
                    if dead:
                        self._drain(out)  # results sent just before the exit was seen
                        dead = {r: c for r, c in dead.items() if r not in out}
                    if dead:
                        raise AssertionError(
                            f"ranks exited without a result (rank: exit code): {dead}") from None
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"ranks {sorted(missing)} did not finish within "
                                           f"{JOIN_TIMEOUT} s") from None
                    continue
                out[rank] = pickle.loads(value)
        finally:
            self.kill_all()
            for p in self.procs:
                p.join(JOIN_TIMEOUT)
        return {r: out[r] for r in sorted(wanted)}


def run(world: int, scenario: Callable[..., Any], *args: Any) -> list[Any]:
    """Run ``scenario`` on ``world`` ranks; every rank's result, or AssertionError with the
    traceback of a rank that raised."""
    results = Ranks(world, scenario, *args).wait()
    for rank, value in results.items():
        if isinstance(value, RankFailure):
            raise AssertionError(f"rank {rank} raised {value.kind}:\n{value.trace}")
    return [results[r] for r in range(world)]


# -- states ----------------------------------------------------------------------------------


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32),
        torch.nn.ReLU(), torch.nn.Linear(32, 8),
    )


def ddp_state(step: int, *, model_seed: int = 0) -> tuple[Any, Any, Any]:
    """A DDP model + Adam after ``step`` training steps (each rank its own batch), and the
    state dict to save: FQN-keyed model and optimizer (DCP's ``get_state_dict``)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_model(model_seed))
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    for s in range(step):
        g = torch.Generator().manual_seed(1000 * s + dist.get_rank())
        model(torch.randn(16, 64, generator=g)).square().mean().backward()
        optim.step()
        optim.zero_grad()
    return model, optim, get_state_dict(model, optim)


def fresh_ddp_state() -> tuple[Any, Any, dict[str, Any]]:
    """A DDP model + Adam with different values but the same structure (for loading into)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim, _ = ddp_state(1, model_seed=99)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    msd, osd = get_state_dict(model, optim)
    return model, optim, {"model": msd, "optim": osd}


def flat_tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested state, by dotted path, as full plain tensors."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(flat_tensors(v, f"{prefix}{k}."))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(flat_tensors(v, f"{prefix}{i}."))
    elif isinstance(state, DTensor):
        out[prefix[:-1]] = state.full_tensor().clone()
    elif isinstance(state, torch.Tensor):
        out[prefix[:-1]] = state.detach().clone()
    return out


def dtensor_state(world: int, seed: int = 0) -> dict[str, Any]:
    """Sharded (row and column), replicated DTensors, a plain tensor and plain values."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(seed)
    full = {
        "rows": torch.randn(35, 16, generator=g),  # uneven shards on 2 and 4 ranks
        "cols": torch.randn(12, 8, generator=g),
        "repl": torch.randn(33, generator=g),
    }
    return {
        "w": {
            "rows": distribute_tensor(full["rows"], mesh, [Shard(0)]),
            "cols": distribute_tensor(full["cols"], mesh, [Shard(1)]),
            "repl": distribute_tensor(full["repl"], mesh, [Replicate()]),
        },
        "plain": torch.arange(10, dtype=torch.float64) * (seed + 1),
        "meta": {"step": seed, "name": "run", "lrs": [0.1, 0.01]},
    }


def save(saver: DistSaver, state: Any, name: str) -> Any:
    """One collective save: snapshot then commit (what a front door does on two threads)."""
    return saver.commit(saver.prepare(state, name))


def open_saver(parent: str, timeout: float = 30.0, **kwargs: Any) -> DistSaver:
    return DistSaver(parent, CheckpointGroup(timeout), **kwargs)


# -- scenarios (run in every rank) -------------------------------------------------------------


def scenario_ddp_saves(ctx: RankContext, parent: str, steps: list[int]) -> dict[str, Any]:
    """Save a DDP model + optimizer at each step; return the commits, plans made, and rank
    0's full state per step (the expected content)."""
    saver = open_saver(parent)
    commits, expected, plans = [], {}, []
    for step in steps:
        _, _, (msd, osd) = ddp_state(step)
        state = {"model": msd, "optim": osd, "step": step}
        commits.append(save(saver, state, f"step_{step}"))
        plans.append(saver.plans_made)
        if ctx.rank == 0:
            expected[step] = flat_tensors({"model": msd, "optim": osd})
    return {"commits": commits, "plans": plans, "expected": expected}


def scenario_ddp_load(ctx: RankContext, directory: str) -> dict[str, torch.Tensor]:
    """Load a DDP checkpoint into a fresh model + optimizer of this world size."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from asyncckpt._dist import load_into

    model, optim, state = fresh_ddp_state()
    load_into(state, directory)
    set_state_dict(model, optim, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    msd, osd = get_state_dict(model, optim)
    return flat_tensors({"model": msd, "optim": osd})


def scenario_dtensor_save(ctx: RankContext, parent: str, seeds: list[int]) -> list[Any]:
    saver = open_saver(parent)
    return [save(saver, dtensor_state(ctx.world, seed), f"step_{seed}") for seed in seeds]


def scenario_dtensor_load(ctx: RankContext, directory: str) -> dict[str, Any]:
    """Load a DTensor checkpoint into zeros sharded over this world; full tensors back."""
    from asyncckpt._dist import load_into

    state = dtensor_state(ctx.world, seed=0)
    zero_state(state)
    load_into(state, directory)
    return {"tensors": flat_tensors(state), "meta": state["meta"]}


def zero_state(state: Any) -> None:
    from torch.distributed.tensor import DTensor

    if isinstance(state, dict):
        for k, v in state.items():
            if isinstance(v, DTensor):
                v.to_local().zero_()
            elif isinstance(v, torch.Tensor):
                v.zero_()
            elif isinstance(v, dict):
                zero_state(v)
            else:
                state[k] = None


def plain_state(step: int, keys: tuple[str, ...] = ("a", "b", "c"), rows: int = 64
                ) -> dict[str, Any]:
    """Replicated plain tensors (equal on every rank), derived from the step."""
    g = torch.Generator().manual_seed(step)
    state: dict[str, Any] = {k: torch.randn(rows * (i + 1), 32, generator=g)
                             for i, k in enumerate(keys)}
    state["n"] = step
    return state


def _attempt(saver: DistSaver, state: Any, name: str) -> tuple[str, bool | None]:
    from asyncckpt._dist import DistributedSaveError

    try:
        return "ok", save(saver, state, name).replanned
    except DistributedSaveError as exc:
        return f"{type(exc).__name__}: {exc}", None


def assigned_to(directory: str, rank: int) -> list[str]:
    """The keys a rank's file holds in a committed checkpoint (from its ``.metadata``)."""
    with open(os.path.join(directory, ".metadata"), "rb") as f:
        metadata = pickle.load(f)
    return sorted({index.fqn for index, info in metadata.storage_data.items()
                   if info.relative_path == f"__{rank}_0.distcp"})


def scenario_structure(ctx: RankContext, parent: str) -> list[tuple[str, bool | None]]:
    """Saves through symmetric and one-sided structure changes (see the test)."""
    saver = open_saver(parent)
    out = [_attempt(saver, plain_state(1), "s1"), _attempt(saver, plain_state(2), "s2")]
    keys = ("a", "b", "c", "d")
    out.append(_attempt(saver, plain_state(3, keys), "s3"))  # every rank adds "d"
    extra = ("e",) if ctx.rank == 1 else ()
    out.append(_attempt(saver, plain_state(4, keys + extra), "s4"))  # rank 1 alone adds "e"
    out.append(_attempt(saver, plain_state(5, keys + extra), "s5"))
    # rank 1 alone drops a key that rank 1 wrote: nobody else copied it
    victim = [k for k in assigned_to(os.path.join(parent, "s5"), 1) if k in keys][0]
    mine = tuple(k for k in keys + extra if ctx.rank != 1 or k != victim)
    out.append(_attempt(saver, plain_state(6, mine), "s6"))
    out.append(_attempt(saver, plain_state(7, mine), "s7"))
    out.append(("victim", victim))  # type: ignore[arg-type]
    return out


def scenario_faults(ctx: RankContext, parent: str) -> list[tuple[str, bool | None]]:
    """A storage fault on rank 1, bad state on rank 0, disagreeing names, then a good save."""

    def failing_open(path: str) -> Any:
        if "faulty" in path and ctx.rank == 1:
            raise OSError(28, "No space left on device (injected)", path)
        return open(path, "xb")  # noqa: SIM115 - closed by the writer

    saver = open_saver(parent, open_file=failing_open)
    out = [_attempt(saver, plain_state(1), "faulty")]
    bad: dict[str, Any] = plain_state(2)
    if ctx.rank == 0:
        bad["x"] = lambda: None  # not checkpointable
    out.append(_attempt(saver, bad, "badstate"))
    out.append(_attempt(saver, plain_state(3), f"step_{3 + ctx.rank}"))
    out.append(_attempt(saver, plain_state(4), "good"))
    return out


KILL_KEYS = ("a", "b", "c", "d")
KILL_ROWS = 2048  # 2.5 MiB per save: big enough that kills land mid-write


def scenario_save_forever(ctx: RankContext, parent: str, timeout: float) -> None:
    """Save ``plain_state(step)`` as ``step_<n>`` until a peer dies (the kill test)."""
    saver = open_saver(parent, timeout=timeout)
    step = 0
    while True:
        step += 1
        save(saver, plain_state(step, KILL_KEYS, KILL_ROWS), f"step_{step}")
        ctx.report(step)


def scenario_fsdp2_save(ctx: RankContext, parent: str) -> dict[str, torch.Tensor]:
    """An FSDP2 (``fully_shard``) model + Adam on CPU; rank 0 returns the full tensors."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (ctx.world,))
    model = make_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 64, generator=torch.Generator().manual_seed(ctx.rank))).sum().backward()
    optim.step()
    msd, osd = get_state_dict(model, optim)
    save(open_saver(parent), {"model": msd, "optim": osd}, "fsdp")
    return flat_tensors({"model": msd, "optim": osd})


def scenario_destroy_groups(ctx: RankContext, rounds: int) -> list[tuple[bool, bool]]:
    """Create, use and destroy ``rounds`` checkpoint groups back to back: per round, whether the
    destroyed group is still held (freed later) and whether the previous one was freed."""
    import weakref

    from asyncckpt._dist import group as group_module

    out: list[tuple[bool, bool]] = []
    previous: weakref.ref[Any] | None = None
    for r in range(rounds):
        group = CheckpointGroup(timeout=30)
        group.all_gather(torch.arange(4) * r, what="exchange tensors")
        pg = weakref.ref(group.pg)
        group.destroy()  # right after the collective: the case torch < 2.8 can deadlock on
        held = pg() is not None and any(p is pg() for p in group_module._retired)
        freed = previous is None or previous() is None
        out.append((held, freed))
        previous = pg
    return out


def scenario_replicated_memory(ctx: RankContext, parent: str, saves: int) -> list[int]:
    """Save the same replicated state (8 x 2 MiB, equal on every rank) ``saves`` times; the
    bytes this rank's pool holds after each save."""
    saver = open_saver(parent)
    state = {f"w{i}": torch.full((512, 1024), float(i)) for i in range(8)}
    held = []
    for step in range(saves):
        save(saver, state, f"step_{step}")
        held.append(saver.pool.reserved_bytes)
    return held
