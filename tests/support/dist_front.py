"""Scenarios for multi-rank checkpoints through the public front doors (``asyncckpt.Checkpointer``,
``AsyncCheckpointer``, ``asyncckpt.load_into``), run in every rank by ``dist_support.run``.

Each returns plain data (tensors, infos, error descriptions) for the parent to check.
"""

from __future__ import annotations

import os
from typing import Any

import anyio
import torch

import asyncckpt
from support import dist_support as ds


def _error(exc: BaseException) -> str:
    """``Type(CauseType): message`` (writer failures reach the caller as a WriterError chained
    to what failed)."""
    cause = exc.__cause__
    inner = "" if cause is None else f"({type(cause).__name__})"
    return f"{type(exc).__name__}{inner}: {exc}"


def scenario_ddp_checkpointer(ctx: ds.RankContext, parent: str, steps: list[int],
                              options: dict[str, Any]) -> dict[str, Any]:
    """Save a DDP model + Adam at each step through ``Checkpointer``; return what every rank
    sees (handles, listing, latest, best) and rank 0's expected tensors per step."""
    expected: dict[int, dict[str, torch.Tensor]] = {}
    infos = []
    with asyncckpt.Checkpointer(parent, **options) as ckpt:
        for step in steps:
            _, _, (msd, osd) = ds.ddp_state(step)
            handle = ckpt.save({"model": msd, "optim": osd, "step": step}, step=step,
                               metrics={"loss": float(10 - step) if step != 2 else 0.5})
            infos.append(handle.wait(timeout=60))
            if ctx.rank == 0:
                expected[step] = ds.flat_tensors({"model": msd, "optim": osd})
        listed = ckpt.checkpoints()
        latest = ckpt.latest()
        best = ckpt.best("loss") if "best" in options else None
    return {"infos": infos, "listed": listed, "latest": latest, "best": best,
            "expected": expected}


def scenario_reopen(ctx: ds.RankContext, parent: str, step: int,
                    options: dict[str, Any]) -> dict[str, Any]:
    """Reopen a folder (a restart): what every rank sees before and after one more save."""
    with asyncckpt.Checkpointer(parent, **options) as ckpt:
        before = [c.name for c in ckpt.checkpoints()]
        latest_before = ckpt.latest()
        ckpt.save(ds.plain_state(step), step=step, metrics={"loss": 100.0})
        ckpt.flush()
        after = [c.name for c in ckpt.checkpoints()]
        best = ckpt.best("loss") if "best" in options else None
    return {"before": before, "latest_before": latest_before, "after": after, "best": best}


def scenario_load_into_ddp(ctx: ds.RankContext, parent: str, which: Any) -> dict[str, Any]:
    """``asyncckpt.load_into`` a fresh DDP model + Adam of this world size."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optim, state = ds.fresh_ddp_state()
    state["step"] = -1
    asyncckpt.load_into(state, parent, which=which)
    set_state_dict(model, optim, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    msd, osd = get_state_dict(model, optim)
    return {"tensors": ds.flat_tensors({"model": msd, "optim": osd}), "step": state["step"]}


def scenario_dtensor_checkpointer(ctx: ds.RankContext, parent: str, seeds: list[int]) -> Any:
    """DTensor states (sharded, replicated, plain, values) through ``AsyncCheckpointer``."""

    async def main() -> list[Any]:
        async with asyncckpt.AsyncCheckpointer(parent, keep_last=5) as ckpt:
            for seed in seeds:
                handle = await ckpt.save(ds.dtensor_state(ctx.world, seed), step=seed)
                await handle.committed()
            return [c.name for c in ckpt.checkpoints()]

    return anyio.run(main)


def scenario_load_into_dtensor(ctx: ds.RankContext, parent: str, which: Any) -> dict[str, Any]:
    state = ds.dtensor_state(ctx.world, seed=0)
    ds.zero_state(state)
    asyncckpt.load_into(state, parent, which=which)
    return {"tensors": ds.flat_tensors(state), "meta": state["meta"]}


def scenario_disagree(ctx: ds.RankContext, parent: str) -> dict[str, Any]:
    """Ranks pass different steps to one save; then agree again."""
    out: dict[str, Any] = {}
    with asyncckpt.Checkpointer(parent) as ckpt:
        ckpt.save(ds.plain_state(1), step=1).wait(timeout=60)
        handle = ckpt.save(ds.plain_state(2), step=2 + ctx.rank)
        try:
            handle.wait(timeout=60)
            out["disagree"] = "committed"
        except asyncckpt.WriterError as exc:
            out["disagree"] = _error(exc)
        try:
            ckpt.flush()
            out["flush"] = "ok"
        except asyncckpt.WriterError as exc:
            out["flush"] = _error(exc)
        ckpt.save(ds.plain_state(5), step=5).wait(timeout=60)
        out["listed"] = [c.step for c in ckpt.checkpoints()]
    return out


def scenario_refusals(ctx: ds.RankContext, parent: str) -> dict[str, str]:
    """Options multi-rank checkpoints refuse, each refused on every rank before anything runs."""
    out = {}
    for option in ({"when_full": "skip"}, {"when_full": "coalesce"},
                   {"snapshot": "pipelined"}):
        key = ",".join(f"{k}={v}" for k, v in option.items())
        try:
            asyncckpt.Checkpointer(parent, **option).close()
            out[key] = "opened"
        except ValueError as exc:
            out[key] = _error(exc)
    return out


def scenario_independent(ctx: ds.RankContext, parent: str) -> list[str]:
    """``distributed=False``: one ordinary single-file writer per rank, in its own folder."""
    folder = os.path.join(parent, f"rank{ctx.rank}")
    with asyncckpt.Checkpointer(folder, distributed=False) as ckpt:
        ckpt.save(ds.plain_state(ctx.rank), step=1).wait(timeout=60)
        return sorted(os.listdir(folder))


def scenario_save_forever(ctx: ds.RankContext, parent: str, timeout: float) -> str:
    """Save ``plain_state(step)`` through the front door until a peer dies; report each commit.

    Returns how the survivor learned of the failure (the exception's type), or raises.
    """
    step = 0
    try:
        with asyncckpt.Checkpointer(parent, keep_last=3, dist_timeout=timeout,
                                    best={"loss": "less"}) as ckpt:
            while True:
                step += 1
                ckpt.save(ds.plain_state(step, ds.KILL_KEYS, ds.KILL_ROWS), step=step,
                          metrics={"loss": float(step % 5)})
                ckpt.flush()
                ctx.report(step)
    except asyncckpt.WriterError as exc:
        return _error(exc)
