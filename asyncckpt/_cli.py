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


def _options(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--storage-option expects key=value, got {pair!r}")
        out[key] = value
    return out


def _verify(args: argparse.Namespace) -> int:
    from . import CheckpointError, verify

    try:
        report = verify(args.uri, load=args.load, storage_options=_options(args.storage_option))
    except CheckpointError as exc:
        print(f"asyncckpt verify: {exc}", file=sys.stderr)
        return 2
    bad = {p.name for p in report.problems}
    for name in report.checked:
        if name not in bad:
            print(f"ok      {name}")
    for problem in report.problems:
        print(f"{problem.kind.upper():8s}{problem.name or '(index)'}: {problem.message}")
    for name in report.leftovers:
        print(f"note    {name}: temporary file of an unfinished write (removed by the next writer)")
    verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"{report.uri}: {len(report.checked)} checkpoint(s) checked, {verdict}")
    return 0 if report.ok else 1


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
    ver = sub.add_parser(
        "verify", help="check every checkpoint of a folder against its checksum (exit 1 if bad)"
    )
    ver.add_argument("uri", help="checkpoint folder")
    ver.add_argument("--load", action="store_true",
                     help="also torch.load(weights_only=True) every checkpoint")
    ver.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                     help="backend option (repeatable)")
    ver.set_defaults(func=_verify)
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
