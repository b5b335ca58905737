"""Scenarios for multi-rank checkpoints on S3 (a moto server over HTTP), run in every rank by
``dist_support.run``. The ranks are separate processes: each gets the endpoint and credentials
in ``options`` (``storage_options`` of the front doors), never from the parent's environment.
"""

from __future__ import annotations

from typing import Any

import asyncckpt
from support import dist_front as df
from support import dist_support as ds


def rank_options(ctx: ds.RankContext, options: dict[str, Any] | list[dict[str, Any]]
                 ) -> dict[str, Any]:
    """This rank's storage options: the same for every rank, or one dict per rank."""
    return options[ctx.rank] if isinstance(options, list) else options


def _save_twice(ckpt: asyncckpt.Checkpointer, second_step: int) -> list[str]:
    """Save ``plain_state(1)`` as step 1, then ``plain_state(2)`` as ``second_step``; the
    errors the second save raised."""
    ckpt.save(ds.plain_state(1), step=1)
    ckpt.flush()
    ckpt.save(ds.plain_state(2), step=second_step)
    try:
        ckpt.flush()
    except asyncckpt.WriterError as exc:
        return [df._error(exc)]
    return []


def scenario_load_into_ddp(ctx: ds.RankContext, uri: str, which: Any,
                           options: dict[str, Any]) -> dict[str, Any]:
    """``asyncckpt.load_into`` a fresh DDP model + Adam of this world size from S3."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optim, state = ds.fresh_ddp_state()
    state["step"] = -1
    asyncckpt.load_into(state, uri, which=which, storage_options=options)
    set_state_dict(model, optim, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    msd, osd = get_state_dict(model, optim)
    return {"tensors": ds.flat_tensors({"model": msd, "optim": osd}), "step": state["step"]}


def scenario_fault(ctx: ds.RankContext, uri: str,
                   options: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
    """Save step 1, then step 2 (the test makes one rank's upload of it fail): what each rank
    was told, and what it lists afterwards."""
    with asyncckpt.Checkpointer(uri, keep_last=2,
                                storage_options=rank_options(ctx, options)) as ckpt:
        errors = _save_twice(ckpt, second_step=2)
        listed = [c.name for c in ckpt.checkpoints()]
        latest = ckpt.latest()
    return {"errors": errors, "listed": listed, "latest": None if latest is None else latest.name}


def scenario_reopen(ctx: ds.RankContext, uri: str, step: int,
                    options: dict[str, Any]) -> list[str]:
    """Reopen the folder (rank 0 removes leftovers), save once more; the names listed."""
    with asyncckpt.Checkpointer(uri, keep_last=3, storage_options=options) as ckpt:
        ckpt.save(ds.plain_state(step), step=step)
        ckpt.flush()
        return [c.name for c in ckpt.checkpoints()]


def scenario_save_forever(ctx: ds.RankContext, uri: str, timeout: float,
                          options: dict[str, Any]) -> str:
    """Save ``plain_state(step)`` until a peer dies; report each commit (the kill test)."""
    step = 0
    try:
        with asyncckpt.Checkpointer(uri, keep_last=3, dist_timeout=timeout,
                                    storage_options=options) as ckpt:
            while True:
                step += 1
                ckpt.save(ds.plain_state(step, ds.KILL_KEYS, ds.KILL_ROWS), step=step)
                ckpt.flush()
                ctx.report(step)
    except asyncckpt.WriterError as exc:
        return df._error(exc)


def scenario_refuses_other_stores(ctx: ds.RankContext, url: str) -> str:
    """A multi-rank checkpointer on an fsspec store other than S3: the error every rank gets."""
    try:
        asyncckpt.Checkpointer(url).close()
    except ValueError as exc:
        return df._error(exc)
    return "opened"


def scenario_resave(ctx: ds.RankContext, uri: str, options: dict[str, Any]) -> dict[str, Any]:
    """Save step 1, then step 1 again (the same name): the second save's error, the listing."""
    with asyncckpt.Checkpointer(uri, storage_options=options) as ckpt:
        errors = _save_twice(ckpt, second_step=1)
        return {"errors": errors, "listed": [c.name for c in ckpt.checkpoints()]}


def scenario_open_error(ctx: ds.RankContext, uri: str, options: dict[str, Any]) -> str:
    """Open a multi-rank checkpointer that cannot open its folder: the error each rank gets."""
    try:
        asyncckpt.Checkpointer(uri, storage_options=options).close()
    except Exception as exc:
        return df._error(exc)
    return "opened"


def scenario_peer_dies_after_record(ctx: ds.RankContext, uri: str, options: dict[str, Any],
                                    killed: Any) -> str:
    """One save through ``DistSaver`` on S3 in which rank 0 "records" the checkpoint, reports
    it, and waits for ``killed`` (the parent kills rank 1 in between): how rank 0's save ends."""
    import functools

    import anyio

    from asyncckpt._dist import CheckpointGroup, DistSaver
    from asyncckpt._dist.targets import S3Layout
    from asyncckpt.storage import storage_for

    def recorded(result: Any) -> str:
        ctx.report("recorded")
        killed.wait(ds.JOIN_TIMEOUT)
        return "listed"

    async def main() -> str:
        storage = storage_for(uri, storage_options=options)
        await storage.open(writer=ctx.rank == 0)
        try:
            group = await anyio.to_thread.run_sync(CheckpointGroup, 10.0)
            layout = S3Layout(storage, anyio.lowlevel.current_token())  # type: ignore[arg-type]
            saver = DistSaver(layout, group)
            part = saver.prepare(ds.plain_state(1), "step_1")
            try:
                await anyio.to_thread.run_sync(functools.partial(
                    saver.commit, part, on_published=recorded if ctx.rank == 0 else None))
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
            return "committed"
        finally:
            await storage.aclose()

    return anyio.run(main)
