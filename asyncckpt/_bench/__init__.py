"""``asyncckpt bench``: save latency, throughput, memory and CPU of asyncckpt next to its anchors.

The harness lives in the package so that the console script works from any install; the
repository's ``benchmarks/`` folder holds the command for the README figures and their results.
See ``benchmarks/README.md`` for what is measured and how.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
from collections.abc import Sequence

from ._dist_options import DIST_CONTENDERS, DistBenchOptions, parse_ranks
from ._options import LAYOUTS, BenchOptions, parse_size, parse_storage_options, snapshot_modes

__all__ = ["BenchOptions", "add_arguments", "main", "run"]


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ranks_arg(text: str) -> tuple[int, ...]:
    try:
        return parse_ranks(text)
    except ValueError as exc:  # argparse names the option in its usage error
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--ranks: ")) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``asyncckpt bench`` options."""
    modes = snapshot_modes()
    parser.add_argument("--size", default="1GiB",
                        help="state size(s), comma-separated, e.g. 256MiB,1GiB (default 1GiB)")
    parser.add_argument("--layout", default="model",
                        help=f"state layout(s), comma-separated: {', '.join(LAYOUTS)} "
                             "(model: an MLP + Adam state; few-big: 64 MiB tensors; "
                             "many-small: 256 KiB tensors; tiny-many: 64-byte tensors, "
                             "6MiB is about 1e5 of them; default model)")
    parser.add_argument("--dest", default=None,
                        help="where checkpoints go: a local folder or a URI such as "
                             "s3://bucket/prefix (default: a temporary folder inside --out)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="backend option for asyncckpt and fsspec, repeatable "
                             "(values are read as JSON when they parse)")
    parser.add_argument("--saves", type=int, default=8,
                        help="saves per contender and case (default 8)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="first saves left out of the steady state (default 2)")
    parser.add_argument("--queue-size", type=int, default=1,
                        help="asyncckpt queue_size (default 1)")
    parser.add_argument("--when-full", default="block", choices=("block", "skip", "coalesce"),
                        help="asyncckpt when_full policy (default block)")
    parser.add_argument("--mode", default=",".join(modes),
                        help=f"asyncckpt snapshot mode(s): {', '.join(modes)} (default: all)")
    parser.add_argument("--no-direct-io", action="store_true",
                        help="do not also measure asyncckpt with O_DIRECT writes")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the state lives (default cpu)")
    parser.add_argument("--contenders", default=None,
                        help="contender ids to run, comma-separated (default: all available)")
    parser.add_argument("--no-training", action="store_true",
                        help="skip the training-loop scenario")
    parser.add_argument("--train-size", default="256MiB",
                        help="training-loop model size, params + Adam state (default 256MiB)")
    parser.add_argument("--train-rounds", type=int, default=4,
                        help="training rounds, the first a warm-up (default 4)")
    parser.add_argument("--save-every", type=int, default=10,
                        help="training-loop steps between saves (default 10)")
    parser.add_argument("--train-batch", type=int, default=64,
                        help="training-loop batch size (default 64)")
    parser.add_argument("--out", default="bench-out",
                        help="output folder for results.json, results.md and plots "
                             "(default bench-out)")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--ranks", type=_ranks_arg, default=None, metavar="N[,N...]",
                        help="run the multi-rank benchmark instead: world sizes, comma-separated "
                             "(e.g. 2,4), each started as that many ranks on this machine (gloo "
                             "on CPU; nccl for --device cuda); contenders: "
                             f"{', '.join(DIST_CONTENDERS)}")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """Build :class:`BenchOptions` from parsed arguments.

    Raises:
        ValueError: an option is invalid (the message names it).
    """
    return BenchOptions(
        sizes=tuple(parse_size(s) for s in _csv(args.size)),
        layouts=tuple(_csv(args.layout)),
        dest=args.dest,
        storage_options=parse_storage_options(args.storage_option),
        saves=args.saves,
        warmup=args.warmup,
        queue_size=args.queue_size,
        when_full=args.when_full,
        modes=tuple(_csv(args.mode)),
        direct_io=not args.no_direct_io,
        device=args.device,
        contenders=tuple(_csv(args.contenders)) if args.contenders else None,
        training=not args.no_training,
        train_size=parse_size(args.train_size),
        train_rounds=args.train_rounds,
        save_every=args.save_every,
        train_batch=args.train_batch,
        out=args.out,
        progress=not args.no_progress,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed arguments; print where the results are."""
    ranks = getattr(args, "ranks", None)
    needed = ("psutil",) if ranks else ("matplotlib", "psutil")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        print(f"asyncckpt bench needs {' and '.join(missing)}: "
              "pip install 'asyncckpt[bench]'", file=sys.stderr)
        return 2
    command = "asyncckpt bench " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []))
    try:
        options = options_from_args(args)
        if ranks:
            from ._dist_runner import run_dist_bench

            results = run_dist_bench(DistBenchOptions(ranks, options),
                                     command=command.strip(),
                                     log=lambda line: print(line, file=sys.stderr))
        else:
            from ._runner import run_bench

            results = run_bench(options, command=command.strip())
    except ValueError as exc:
        print(f"asyncckpt bench: {exc}", file=sys.stderr)
        return 2
    outputs = results["outputs"]
    with open(outputs["markdown"], encoding="utf-8") as f:
        print(f.read())
    print("results: " + ", ".join(
        os.path.relpath(p) for p in (outputs["json"], outputs["markdown"], *outputs["plots"])
    ))
    if results["errors"]:
        print(f"asyncckpt bench: {len(results['errors'])} contender error(s); see above",
              file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m asyncckpt._bench``-style entry with its own parser."""
    parser = argparse.ArgumentParser(prog="asyncckpt bench", description=__doc__)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return run(args)
