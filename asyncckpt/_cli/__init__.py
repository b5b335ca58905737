"""The ``asyncckpt`` command (also ``python -m asyncckpt``).

Exit codes: 0 success; 1 problems found (``verify``) or the command could not complete on its
input (unreadable index, refused pickle, folder held by a writer, ...); 2 usage errors, and an
input that is not a checkpoint folder / file at all. ``ls`` of a path that is not a checkpoint
folder exits 1. Every name, metric key, path and message printed is escaped (see ``_output``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from .. import _bench, _demo
from ._export import run_convert, run_publish
from ._folder import run_ls, run_prune, run_verify
from ._inspect import run_inspect
from ._output import EXIT_PROBLEMS, add_storage_option

__all__ = ["main"]

_EXIT_CODES = """exit codes:
  0  success
  1  problems found, or the command could not complete on this input
  2  usage error, or the input is not a checkpoint folder / file"""


def _command(
    sub: argparse._SubParsersAction,
    name: str,
    summary: str,
    example: str,
    func: Callable[[argparse.Namespace], int],
    details: str = "",
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + "." + (f"\n\n{details}" if details else ""),
        epilog=f"example:\n  {example}\n\n{_EXIT_CODES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=func)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (the newest is always kept), got {value}")
    return value


def _folder_commands(sub: argparse._SubParsersAction) -> None:
    ls = _command(
        sub, "ls", "list the committed checkpoints of a folder, with the latest and best marks",
        "asyncckpt ls runs/exp1 --json", run_ls,
        "Columns: name, step, epoch, time, size, metrics, marks. On a terminal an aligned "
        "table;\nelse one tab-separated line per checkpoint (size in bytes, ISO time).",
    )
    ls.add_argument("uri", help="checkpoint folder (path or URI)")
    fmt = ls.add_mutually_exclusive_group()
    fmt.add_argument("--json", dest="format", action="store_const", const="json",
                     help="print one JSON document")
    fmt.add_argument("--format", choices=("table", "tsv", "json"), default=None,
                     help="output format (default: table on a terminal, else tsv)")
    add_storage_option(ls)

    ver = _command(
        sub, "verify",
        "check every checkpoint of a folder against its recorded size and checksum",
        "asyncckpt verify s3://bucket/runs/exp1 --storage-option endpoint_url=http://minio:9000",
        run_verify, "Problems are collected, not stopped at: one bad file does not hide others.",
    )
    ver.add_argument("uri", help="checkpoint folder (path or URI)")
    ver.add_argument("--load", action="store_true",
                     help="also torch.load(weights_only=True) every checkpoint")
    add_storage_option(ver)

    prune = _command(
        sub, "prune", "delete all but the newest N checkpoints of a folder, through its index",
        "asyncckpt prune runs/exp1 --keep-last 3 --dry-run", run_prune,
        "Keeps the newest N of each series, every checkpoint a best pointer names and those\n"
        "saved with keep=True. The index stops listing a checkpoint before its file is deleted,\n"
        "so an interrupted prune leaves a consistent folder. Refused while a writer holds a\n"
        "local folder; remote folders have no lock: do not prune them while a run writes.",
    )
    prune.add_argument("uri", help="checkpoint folder (path or URI)")
    prune.add_argument("--keep-last", type=_positive, required=True, metavar="N",
                       help="how many of the newest checkpoints to keep (>= 1)")
    prune.add_argument("--dry-run", action="store_true",
                       help="print what would be removed; change nothing")
    add_storage_option(prune)


def _file_commands(sub: argparse._SubParsersAction) -> None:
    ins = _command(
        sub, "inspect", "print the tensor tree of a checkpoint file without loading its tensors",
        "asyncckpt inspect runs/exp1/step_100.pt", run_inspect,
        "Reads only the file's pickled structure (data.pkl), refusing what\n"
        "torch.load(weights_only=True) refuses; shows names, dtypes, shapes, bytes and shared\n"
        "storages. A remote file is downloaded to a temporary file first.",
    )
    ins.add_argument("file", help="checkpoint file (torch.save zip format), path or URI")
    ins.add_argument("--json", action="store_true", help="print one JSON document")
    add_storage_option(ins)

    pub = _command(
        sub, "publish", "write a release copy with only some top-level keys, named by its hash",
        "asyncckpt publish runs/exp1/best_acc.pt --keys meta state_dict", run_publish,
        "Like mmengine's CheckpointHook(published_keys=...): the other keys are removed and\n"
        "the file is written as <name>-<first 8 hex digits of SHA-256>.pth, a plain torch.save\n"
        "file. A checkpoint listed in its folder's index is checked against its checksum.",
    )
    pub.add_argument("file", help="checkpoint file, path or URI")
    pub.add_argument("--keys", nargs="+", default=["meta", "state_dict"], metavar="KEY",
                     help="top-level keys to keep (default: meta state_dict)")
    pub.add_argument("--out-dir", default=None,
                     help="folder to write to (default: the checkpoint's own folder)")
    add_storage_option(pub)

    conv = _command(
        sub, "convert", "convert a checkpoint file to another format (safetensors)",
        "asyncckpt convert runs/exp1/step_100.pt --to safetensors", run_convert,
        "Tensor names are dotted key paths (model.fc.weight, history.0). Tensors that share\n"
        "memory or are not contiguous are written as separate copies (safetensors has no\n"
        "aliasing); values that are not tensors are refused unless --skip-non-tensors.\n"
        "Needs the safetensors package: pip install 'asyncckpt[safetensors]'.",
    )
    conv.add_argument("file", help="checkpoint file, path or URI")
    conv.add_argument("--to", choices=("safetensors",), required=True, help="target format")
    conv.add_argument("-o", "--output", default=None,
                      help="output file (default: the input's name with .safetensors)")
    conv.add_argument("--skip-non-tensors", action="store_true",
                      help="leave out values that are not tensors instead of refusing")
    add_storage_option(conv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncckpt",
        description="Asynchronous, crash-safe PyTorch checkpointing.",
        epilog=_EXIT_CODES + "\n\nrun 'asyncckpt COMMAND --help' for a command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _folder_commands(sub)
    _file_commands(sub)
    demo = _command(sub, "demo", "train a small model with async checkpointing, then resume",
                    "asyncckpt demo --steps 50", _demo.run)
    _demo.add_arguments(demo)
    bench = _command(
        sub, "bench", "measure save latency/throughput against torch.save, DCP and others",
        "asyncckpt bench --size 1GiB", _bench.run,
        "Measure asyncckpt's save stall, time to durable, memory and CPU next to torch.save,\n"
        "DCP async_save, Lightning and the machine's copy/write limits. With --ranks 2,4:\n"
        "the multi-rank benchmark, on 2 then 4 ranks started on this machine.",
    )
    _bench.add_arguments(bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``asyncckpt`` command line; return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader went away (``asyncckpt ls DIR | head``): stop quietly, as other tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PROBLEMS


if __name__ == "__main__":
    raise SystemExit(main())
