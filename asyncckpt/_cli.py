"""The ``asyncckpt`` command (also ``python -m asyncckpt``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import _bench, _demo


def _ls(args: argparse.Namespace) -> int:
    from . import CheckpointError, checkpoints

    try:
        listing = checkpoints(args.uri)
    except CheckpointError as exc:
        print(f"asyncckpt ls: {exc}", file=sys.stderr)
        return 1
    for info in listing:
        metrics = " ".join(f"{k}={v:g}" for k, v in info.metrics.items())
        epoch = "" if info.epoch is None else f" epoch={info.epoch}"
        print(f"{info.name}\tstep={info.step}{epoch}\t{info.size} bytes\t{metrics}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asyncckpt", description="Asynchronous, crash-safe PyTorch checkpointing."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small model with async checkpointing, then resume")
    _demo.add_arguments(demo)
    demo.set_defaults(func=_demo.run)
    ls = sub.add_parser("ls", help="list the committed checkpoints of a folder")
    ls.add_argument("uri", help="checkpoint folder")
    ls.set_defaults(func=_ls)
    bench = sub.add_parser(
        "bench", help="measure save latency/throughput against torch.save, DCP and others",
        description="Measure asyncckpt's save stall, time to durable, memory and CPU next to "
                    "torch.save, DCP async_save, Lightning and the machine's copy/write limits.",
    )
    _bench.add_arguments(bench)
    bench.set_defaults(func=_bench.run)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
