"""Measure what one commit of the index costs as the history grows (local disk, fsync on).

Usage: ``python tools/index_commit_cost.py [ENTRIESxCOMMITS ...]`` (default ``1000x50
10000x50 100000x20``). For each size, a folder is given an index of that many entries (a long
run that keeps one checkpoint per 10 minutes, plus the last 3), then ``CheckpointFolder.commit``
and ``delete_pending`` are timed for new saves, each of which also rotates one entry out. Also
printed: the same commits without a retention rule (the index's own cost), and one compaction
(the whole document rewritten) with its share per commit.
"""

from __future__ import annotations

import functools
import statistics
import sys
import tempfile
import time

import anyio

from asyncckpt._core.folder import CheckpointFolder
from asyncckpt._format.best import BestMetric
from asyncckpt._format.index import IndexEntry, IndexState
from asyncckpt._format.naming import INDEX_NAME
from asyncckpt._format.retention import Retention
from asyncckpt.storage import LocalStorage

BEST = (BestMetric("acc", "greater"),)
RETENTION = Retention(keep_last=3, keep_every_n_minutes=10)
START = 1.7e9


def entry(step: int, when: float) -> IndexEntry:
    return IndexEntry(f"step_{step:08d}.pt", step, step // 1000, when, 123456789,
                      "xxh3_128:" + "ab" * 16, {"acc": (step % 97) / 97, "loss": 1 / (step + 1)})


async def commits(n: int, count: int, retention: Retention) -> list[float]:
    """Seconds per commit (and deletion of what it rotated out) after an ``n``-entry index."""
    entries = tuple(entry(i, START + 600.0 * i) for i in range(n))  # one per 10-minute window
    with tempfile.TemporaryDirectory() as folder:
        storage = LocalStorage(folder)
        await storage.open(writer=True)
        try:
            ckpt = CheckpointFolder(storage, best=BEST)
            await ckpt.open_for_writing()
            await ckpt.publish(IndexState(entries, window_origin=START).with_best_metrics(
                BEST, source=folder))
            newest = START + 600.0 * n
            times = []
            for i in range(count):  # new saves share the newest window: one rotates out each
                t0 = time.perf_counter()
                await ckpt.commit(entry(n + i, newest + i), supersedes=(), retention=retention,
                                  series=None)
                await ckpt.delete_pending(lambda name, exc: None)
                times.append(time.perf_counter() - t0)
            return times
        finally:
            await storage.aclose()


async def compaction(n: int) -> float:
    """Seconds to encode and durably write an ``n``-entry document (a journal's new base)."""
    state = IndexState(tuple(entry(i, START + 600.0 * i) for i in range(n)), window_origin=START)
    with tempfile.TemporaryDirectory() as folder:
        storage = LocalStorage(folder)
        await storage.open(writer=True)
        try:
            t0 = time.perf_counter()
            try:
                encode = functools.partial(state.to_json, version=2)
                data = await anyio.to_thread.run_sync(encode)
            except TypeError:  # an index without a journal
                data = state.to_json()
            await storage.write_bytes(INDEX_NAME, data)
            return time.perf_counter() - t0
        finally:
            await storage.aclose()


def main(specs: list[str]) -> None:
    try:
        from asyncckpt._format.journal import compact_after
    except ImportError:
        compact_after = None
    print("entries  commit median (mean, max) with retention | without | compaction (per commit)")
    for spec in specs:
        n, count = (int(x) for x in spec.split("x"))
        full = anyio.run(commits, n, count, RETENTION)
        bare = anyio.run(commits, n, count, Retention())
        whole = anyio.run(compaction, n)
        share = "" if compact_after is None else f" ({whole / compact_after(n) * 1e3:.2f} ms)"
        median, mean = statistics.median(full) * 1e3, statistics.mean(full) * 1e3
        print(f"{n:>7}  {median:8.2f} ms ({mean:.2f}, {max(full) * 1e3:.2f}) | "
              f"{statistics.median(bare) * 1e3:8.2f} ms | "
              f"{whole * 1e3:8.1f} ms{share}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["1000x50", "10000x50", "100000x20"])
