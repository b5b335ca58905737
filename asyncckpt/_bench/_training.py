"""The training-loop scenario: what checkpointing every N steps costs a real loop.

An MLP (parameters + Adam state of about ``--train-size``) trains on random batches. Rounds are
interleaved: in each round, the baseline (no checkpointing) and every contender run
``save_every`` steps in turn, the contender saving once, right after the first optimizer step of
its block, so its background write overlaps the block's remaining steps. At the end of a block
the benchmark waits (untimed, recorded as ``drain_s``) until the save is durable, so one
contender's writing never slows another's steps; a non-zero drain means the writer could not
keep up with a save every ``save_every`` steps at this step time. The first round is a warm-up
(buffer pools fill, pages fault in) and is left out of the means. The overhead is the mean step
time against the baseline's; a second figure, the median over rounds of each block against the
baseline block of the same round, resists bursts of noise from other processes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ._contenders import Contender, Pending
from ._states import make_mlp, state_nbytes

__all__ = ["run_training"]

BASELINE = "none"


class _Trainer:
    def __init__(self, nbytes: int, batch: int, device: str, seed: int) -> None:
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.model = make_mlp(max(1, nbytes // 12), self.device)
        self.optim = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        width = int(self.model[0].in_features)  # type: ignore[arg-type]
        self.x = torch.randn(batch, width, device=self.device)
        self.y = torch.randn(batch, width, device=self.device)
        self.step_count = 0

    def step(self) -> None:
        loss = torch.nn.functional.mse_loss(self.model(self.x), self.y)
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        self.optim.step()
        self.step_count += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optim": self.optim.state_dict(),
                "step": self.step_count}

    def objects(self) -> dict[str, Any]:
        return {"model": self.model, "optim": self.optim, "step": self.step_count}


def run_training(
    contenders: list[Contender],
    *,
    nbytes: int,
    batch: int,
    rounds: int,
    save_every: int,
    device: str,
    seed: int,
    tick: Callable[[str], None],
) -> dict[str, Any]:
    """Run the scenario; return its raw figures (see the module docstring)."""
    trainer = _Trainer(nbytes, batch, device, seed)
    for _ in range(2):  # first steps allocate gradients and the Adam state
        trainer.step()
    state_bytes, _ = state_nbytes(trainer.state())
    names = [BASELINE] + [c.id for c in contenders]
    failed: dict[str, str] = {}
    timeline: list[dict[str, Any]] = []
    blocks: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_ in range(rounds):
        # Rotate the order each round so no contender always follows the same one.
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            tick(f"training {name}")
            if name in failed:
                continue
            contender = next((c for c in contenders if c.id == name), None)
            try:
                blocks[name].append(_block(trainer, contender, name, round_, save_every,
                                           timeline))
            except Exception as exc:  # one contender failing does not end the scenario
                failed[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    names = [n for n in names if n not in failed]
    summary: dict[str, Any] = {}
    base_blocks = blocks[BASELINE][1:] if rounds > 1 else blocks[BASELINE]
    base_mean = statistics.fmean(s for b in base_blocks for s in b["steps_s"])
    base_by_round = {b["round"]: statistics.fmean(b["steps_s"]) for b in base_blocks}
    for name in names:
        counted = blocks[name][1:] if rounds > 1 else blocks[name]
        mean = statistics.fmean(s for b in counted for s in b["steps_s"])
        # Noise on a shared machine comes in bursts longer than a block; comparing each block
        # with the baseline block of the same round and taking the median resists them.
        paired = [statistics.fmean(b["steps_s"]) / base_by_round[b["round"]] - 1
                  for b in counted if b["round"] in base_by_round]
        summary[name] = {
            "mean_step_s": mean,
            "median_step_s": statistics.median(s for b in counted for s in b["steps_s"]),
            "overhead_pct": (mean / base_mean - 1) * 100,
            "overhead_paired_median_pct": statistics.median(paired) * 100 if paired else None,
            "stall_p50_s": statistics.median(b["stall_s"] for b in counted),
            "drain_max_s": max(b["drain_s"] for b in counted),
        }
    return {
        "state_bytes": state_bytes,
        "batch": batch,
        "rounds": rounds,
        "save_every": save_every,
        "device": device,
        "baseline_step_s": base_mean,
        "summary": summary,
        "blocks": blocks,
        "timeline": timeline,
        "failed": failed,
    }


def _block(trainer: _Trainer, contender: Contender | None, name: str, round_: int,
           save_every: int, timeline: list[dict[str, Any]]) -> dict[str, Any]:
    """``save_every`` steps, saving after the first; then wait (untimed) until durable."""
    steps: list[float] = []
    pending: Pending | None = None
    stall = 0.0
    for i in range(save_every):
        t0 = time.perf_counter()
        trainer.step()
        if i == 0 and contender is not None:
            s0 = time.perf_counter()
            pending = contender.save(trainer.state(), trainer.step_count, trainer.objects())
            stall = time.perf_counter() - s0
        steps.append(time.perf_counter() - t0)
        timeline.append({"index": len(timeline), "contender": name, "round": round_,
                         "step_s": steps[-1], "saved": i == 0 and pending is not None})
    d0 = time.perf_counter()
    if pending is not None:
        pending.wait()
    drain = time.perf_counter() - d0
    if contender is not None:
        contender.cleanup()
    return {"round": round_, "steps_s": steps, "stall_s": stall, "drain_s": drain}
