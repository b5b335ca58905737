"""Options of the multi-rank benchmark (``asyncckpt bench --ranks 2,4``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._options import BenchOptions

__all__ = ["DIST_CONTENDERS", "DistBenchOptions", "dist_unavailable", "parse_ranks"]

#: Contender ids of the multi-rank benchmark, in the order the tables list them.
DIST_CONTENDERS: tuple[str, ...] = ("asyncckpt-eager", "dcp", "dcp-reused-stager",
                                    "torch-save-rank0")


def parse_ranks(text: str) -> tuple[int, ...]:
    """``"2,4"`` -> ``(2, 4)``: world sizes, each an integer >= 2, duplicates dropped.

    Raises:
        ValueError: a value is not an integer or is below 2 (the message names ``--ranks``).
    """
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise ValueError(f"--ranks: give world sizes as a comma list such as 2,4, got {text!r}")
    sizes: list[int] = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise ValueError(
                f"--ranks: {part!r} is not an integer (write world sizes such as 2,4)"
            ) from None
        if value < 2:
            raise ValueError(f"--ranks: a world size must be >= 2, got {value} (for one "
                             "process, run asyncckpt bench without --ranks)")
        sizes.append(value)
    return tuple(dict.fromkeys(sizes))


def dist_unavailable() -> str | None:
    """Why ranks cannot be started here (torch.distributed or gloo missing), or None."""
    import torch.distributed as dist

    if not dist.is_available():
        return "this torch build has no torch.distributed"
    if not dist.is_gloo_available():
        return "this torch build has no gloo backend"
    return None


_SINGLE_PROCESS_ONLY = {"storage_options": "--storage-option", "queue_size": "--queue-size",
                       "when_full": "--when-full", "modes": "--mode",
                       "direct_io": "--no-direct-io"}


@dataclass(frozen=True)
class DistBenchOptions:
    """What one multi-rank benchmark run measures.

    Args:
        ranks: world sizes; each starts its own set of ranks on this machine.
        bench: the options shared with the single-process benchmark (sizes, layouts, saves,
            warm-up, device, contenders, training loop, output); ``sizes`` is the whole state,
            replicated on every rank as under DDP. ``dest`` must be a local folder, and the
            options that set asyncckpt's single-process saving must keep their defaults.
        timeout_s: bound on every collective and, per case, on waiting for a rank's results.

    Raises:
        ValueError: a world size below 2, an option that does not apply to multi-rank runs,
            a remote ``dest`` or an unknown contender (the message names the option).
    """

    ranks: tuple[int, ...]
    bench: BenchOptions = field(default_factory=BenchOptions)
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 2
                                 for r in self.ranks):
            raise ValueError(f"--ranks: world sizes must be integers >= 2, got {self.ranks}")
        defaults = BenchOptions()
        ignored = [flag for name, flag in _SINGLE_PROCESS_ONLY.items()
                   if getattr(self.bench, name) != getattr(defaults, name)]
        if ignored:
            raise ValueError(f"--ranks does not take {', '.join(ignored)} (multi-rank saves "
                             "are eager, queue_size=1, when_full=block, through the page cache)")
        dest = self.bench.dest
        if dest is not None and "://" in dest and not dest.startswith("file://"):
            raise ValueError(f"--dest {dest!r}: the multi-rank benchmark writes to a local "
                             "folder (multi-rank checkpoints need a filesystem every rank sees)")
        if self.bench.contenders is not None:
            unknown = [c for c in self.bench.contenders if c not in DIST_CONTENDERS]
            if unknown or not self.bench.contenders:
                raise ValueError(f"--contenders with --ranks: unknown {', '.join(unknown)}; "
                                 f"known: {', '.join(DIST_CONTENDERS)}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")

    @property
    def contenders(self) -> tuple[str, ...]:
        """The contender ids to run."""
        return self.bench.contenders or DIST_CONTENDERS

    def spec(self, dest: str, contenders: list[str]) -> dict[str, Any]:
        """What every rank needs to know (plain values: it crosses a process boundary)."""
        b = self.bench
        return {"sizes": list(b.sizes), "layouts": list(b.layouts), "saves": b.saves,
                "device": b.device, "seed": b.seed, "training": b.training,
                "train_size": b.train_size, "train_rounds": b.train_rounds,
                "save_every": b.save_every, "train_batch": b.train_batch,
                "timeout_s": self.timeout_s, "dest": dest, "contenders": contenders}
