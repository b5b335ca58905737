"""Folder commands: ``ls``, ``verify`` and ``prune``."""

from __future__ import annotations

import argparse
import builtins
import json
import math
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

from .. import CheckpointError, CheckpointNotFoundError, checkpoints, verify
from .._cli_prune import plan_prune, prune, read_index
from .._format.index import IndexState
from ..storage import Buffer, Storage, storage_for
from ._output import (
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    fail,
    format_number,
    human_size,
    options_usable,
    progress,
    safe,
    table,
)

__all__ = ["ProgressStorage", "run_ls", "run_prune", "run_verify"]


class ProgressStorage(Storage):
    """Delegates to ``inner`` and advances a progress bar by the bytes read through it."""

    def __init__(self, inner: Storage, bar: Any) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.bar = bar

    async def open(self, *, writer: bool) -> None:
        await self.inner.open(writer=writer)

    async def write(self, name: str, chunks: AsyncIterable[Buffer]) -> int:
        return await self.inner.write(name, chunks)

    async def write_bytes(self, name: str, data: Buffer) -> int:
        return await self.inner.write_bytes(name, data)

    async def read_bytes(self, name: str, max_bytes: int | None = None) -> bytes:
        data = await self.inner.read_bytes(name, max_bytes)
        self.bar.update(len(data))
        return data

    async def read_stream(self, name: str, chunk_size: int = 8 << 20,
                          max_bytes: int | None = None) -> AsyncIterator[bytes]:
        stream = self.inner.read_stream(name, chunk_size, max_bytes)
        try:
            async for chunk in stream:
                self.bar.update(len(chunk))
                yield chunk
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def delete(self, name: str) -> None:
        await self.inner.delete(name)

    async def list(self) -> builtins.list[str]:
        return await self.inner.list()

    async def exists(self, name: str) -> bool:
        return await self.inner.exists(name)

    def uri_of(self, name: str) -> str:
        return self.inner.uri_of(name)

    def local_path(self, name: str) -> str | None:
        return self.inner.local_path(name)

    async def cleanup_temporaries(self) -> builtins.list[str]:
        return await self.inner.cleanup_temporaries()

    async def aclose(self) -> None:
        await self.inner.aclose()


def options_of(args: argparse.Namespace) -> dict[str, str]:
    return dict(args.storage_option)


# -- ls --------------------------------------------------------------------------------------------
def _json_number(value: float) -> float | str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _index_for_marks(uri: str, options: Mapping[str, str]) -> IndexState | None:
    """The index, for the best pointers (None if it cannot be read a second time)."""
    try:
        return read_index(uri, storage_options=options)[1]
    except CheckpointError:
        return None


def _when(seconds: float, sep: str) -> str:
    try:
        return time.strftime(f"%Y-%m-%d{sep}%H:%M:%S", time.localtime(seconds))
    except (OverflowError, OSError, ValueError):
        return format_number(seconds)


def run_ls(args: argparse.Namespace) -> int:
    options = options_of(args)
    if not options_usable("ls", args.uri, options):
        return EXIT_USAGE
    try:
        listing = checkpoints(args.uri, storage_options=options)
    except CheckpointError as exc:
        fail("ls", exc)
        return EXIT_PROBLEMS
    index = _index_for_marks(args.uri, options)
    best: dict[str, list[str]] = {}
    for metric, record in (index.best.items() if index is not None else ()):
        best.setdefault(record.name, []).append(metric)
    latest = listing[-1].name if listing else None
    fmt = args.format or ("table" if sys.stdout.isatty() else "tsv")
    if fmt == "json":
        doc = {
            "latest": latest,
            "best": {
                m: {"name": r.name, "step": r.step, "mode": r.mode, "value": _json_number(r.value)}
                for m, r in (index.best.items() if index is not None else ())
            },
            "checkpoints": [
                {
                    "name": c.name, "uri": c.uri, "step": c.step, "epoch": c.epoch,
                    "time": c.time, "size": c.size, "checksum": c.checksum,
                    "metrics": {k: _json_number(v) for k, v in c.metrics.items()},
                    "latest": c.name == latest, "best": best.get(c.name, []),
                    "kind": c.kind, "world_size": c.world_size,
                }
                for c in listing
            ],
        }
        print(json.dumps(doc, indent=1, ensure_ascii=True))
        return EXIT_OK
    rows = []
    for c in listing:
        marks = (["latest"] if c.name == latest else []) + [
            "best:" + safe(m) for m in best.get(c.name, [])
        ]
        if c.kind != "file":  # a multi-rank checkpoint: a directory, written by N ranks
            marks.append(f"ranks:{c.world_size}")
        rows.append([
            safe(c.name) + ("/" if c.kind != "file" else ""),
            str(c.step),
            "" if c.epoch is None else str(c.epoch),
            _when(c.time, " " if fmt == "table" else "T"),
            human_size(c.size) if fmt == "table" else str(c.size),
            " ".join(f"{safe(k)}={format_number(v)}" for k, v in c.metrics.items()),
            " ".join(marks),
        ])
    if fmt == "table":
        table(rows, ["NAME", "STEP", "EPOCH", "TIME", "SIZE", "METRICS", "MARKS"], sys.stdout)
        if not rows:
            print(f"{safe(args.uri)}: no committed checkpoints")
    else:
        for row in rows:
            print("\t".join(row))
    return EXIT_OK


# -- verify ----------------------------------------------------------------------------------------
def run_verify(args: argparse.Namespace) -> int:
    options = options_of(args)
    if not options_usable("verify", args.uri, options):
        return EXIT_USAGE
    try:
        total: int | None = sum(c.size for c in checkpoints(args.uri, storage_options=options))
    except CheckpointError:
        total = None  # not a folder, or an unreadable index: verify() tells which
    with progress(total, "verifying") as bar:
        try:
            report = verify(
                ProgressStorage(storage_for(args.uri, storage_options=options), bar),
                load=args.load,
            )
        except CheckpointError as exc:
            bar.close()
            fail("verify", exc)
            return EXIT_USAGE
    bad = {p.name for p in report.problems}
    for name in report.checked:
        if name not in bad:
            print(f"ok      {safe(name)}")
    for problem in report.problems:
        where = "(index)" if problem.name is None else safe(problem.name)
        print(f"{problem.kind.upper():8s}{where}: {safe(problem.message, backslash=False)}")
    for name in report.leftovers:
        print(f"note    {safe(name)}: temporary file of an unfinished write "
              "(removed by the next writer)")
    verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"{safe(report.uri)}: {len(report.checked)} checkpoint(s) checked, {verdict}")
    return EXIT_OK if report.ok else EXIT_PROBLEMS


# -- prune -----------------------------------------------------------------------------------------
def run_prune(args: argparse.Namespace) -> int:
    options = options_of(args)
    if not options_usable("prune", args.uri, options):
        return EXIT_USAGE
    try:
        if args.dry_run:
            plan = plan_prune(args.uri, args.keep_last, storage_options=options)
            dropped, kept = list(plan.dropped), len(plan.after.entries)
        else:
            dropped = prune(args.uri, args.keep_last, storage_options=options)
            kept = None
    except CheckpointNotFoundError as exc:
        fail("prune", exc)
        return EXIT_USAGE
    except CheckpointError as exc:
        fail("prune", exc)
        return EXIT_PROBLEMS
    for name in dropped:
        print(f"{'would remove' if args.dry_run else 'removed'} {safe(name)}")
    summary = f"{safe(args.uri)}: {len(dropped)} checkpoint(s) " + (
        f"would be removed, {kept} kept" if kept is not None else "removed"
    )
    print(summary)
    return EXIT_OK
