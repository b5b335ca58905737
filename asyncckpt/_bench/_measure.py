"""What one save costs: wall time, CPU time by thread, peak memory.

CPU accounting: ``time.process_time()`` (all threads of the process) and ``time.thread_time()``
(the calling thread) are read at the start of ``save()`` and once the save is durable. While the
caller waits for durability it sleeps, so ``process - caller`` is the CPU the contender's
background threads (its writer) spent on that save; for a synchronous contender the caller *is*
the writer, which is why both figures are reported.

Peak memory: on Linux the kernel's peak-RSS counter (``VmHWM``) is reset before each save through
``/proc/self/clear_refs`` and read after it; elsewhere a thread samples the RSS every 2 ms.
Memory a contender keeps between saves (buffer pools, staging caches) is accounted to it: the RSS
growth over each of its saves (after its cleanup, a GC and glibc's ``malloc_trim``, so that memory
another contender freed is not counted against the next one) accumulates in ``retained``, and a
save's extra memory is ``retained before it + (peak during it - RSS before it)``. Allocator
effects can still shift a few percent between contenders in an interleaved run; run one
contender alone (``--contenders``) to confirm a memory figure.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CpuWindow", "MemoryProbe", "percentile", "summarize"]

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _rss_now() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def _hwm() -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _trim(collect: bool = True) -> None:
    """Return freed heap memory to the OS now (glibc only), so RSS reflects what is in use;
    first collect Python's cyclic garbage, unless ``collect`` is False."""
    if collect:
        gc.collect()
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def _reset_hwm() -> bool:
    try:
        fd = os.open(_CLEAR_REFS, os.O_WRONLY)
    except OSError:
        return False
    try:
        os.write(fd, b"5")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class _Sampler:
    """Fallback peak-RSS tracker: a thread sampling the RSS every 2 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_now())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_now())


class MemoryProbe:
    """Peak host RSS (and CUDA memory) of one save; tracks what each contender retains."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda and torch.cuda.is_available()
        self.method = "VmHWM" if _reset_hwm() and _hwm() is not None else "sampled"
        self.retained: dict[str, int] = {}
        self._before = 0
        self._sampler: _Sampler | None = None
        self._cuda_before = 0
        self._peak = 0
        self._cuda_extra: int | None = None

    def begin(self) -> None:
        """Call right before a save."""
        # No full garbage collection here (settle() ran one after the previous save): right
        # after one, a save of a sub-millisecond stall measures a few milliseconds more.
        _trim(collect=False)
        self._before = _rss_now()
        if self.method == "VmHWM":
            _reset_hwm()
        else:
            self._sampler = _Sampler()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_before = torch.cuda.memory_allocated()

    def end(self) -> None:
        """Call once the save is durable: read the peaks."""
        if self._sampler is not None:
            self._peak = self._sampler.stop()
            self._sampler = None
        else:
            self._peak = max(_hwm() or 0, _rss_now())
        self._cuda_extra = None
        if self.cuda:
            self._cuda_extra = max(0, torch.cuda.max_memory_allocated() - self._cuda_before)

    def settle(self, contender: str) -> tuple[int, int | None]:
        """Call after the contender cleaned up; return ``(extra host bytes, extra CUDA bytes)``
        of the save and update what the contender retains."""
        kept = self.retained.get(contender, 0)
        extra = kept + max(0, self._peak - self._before)
        _trim()
        self.retained[contender] = max(0, kept + _rss_now() - self._before)
        return extra, self._cuda_extra


@dataclass
class CpuWindow:
    """Process and caller-thread CPU time over a window."""

    process0: float = 0.0
    thread0: float = 0.0
    process: float = 0.0
    caller: float = 0.0

    def start(self) -> None:
        self.process0, self.thread0 = time.process_time(), time.thread_time()

    def stop(self) -> None:
        self.process = time.process_time() - self.process0
        self.caller = time.thread_time() - self.thread0

    @property
    def background(self) -> float:
        return max(0.0, self.process - self.caller)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest-rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def summarize(saves: Sequence[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Per-contender figures from its save records (steady state = after ``warmup`` saves)."""
    ok = [s for s in saves if s.get("error") is None]
    if not ok:
        return {"ok": False}
    steady = ok[warmup:] if len(ok) > warmup else ok[-1:]
    stalls = [s["stall_s"] for s in steady]
    durables = [s["durable_s"] for s in steady]
    total_bytes = sum(s["bytes"] for s in steady)
    total_durable = sum(durables)
    gb = total_bytes / 1e9
    first = ok[0]
    out: dict[str, Any] = {
        "ok": True,
        "saves": len(ok),
        "steady_saves": len(steady),
        "bytes": statistics.median(s["bytes"] for s in steady),
        "first_stall_s": first["stall_s"],
        "first_durable_s": first["durable_s"],
        "stall_p50_s": statistics.median(stalls),
        "stall_p95_s": percentile(stalls, 95),
        "stall_max_s": max(stalls),
        "durable_p50_s": statistics.median(durables),
        "durable_max_s": max(durables),
        "throughput_gbps": gb / total_durable if total_durable > 0 else math.nan,
        "peak_extra_rss_bytes": max(s["peak_extra_rss_bytes"] for s in ok),
        "cpu_s_per_gb": sum(s["cpu_s"] for s in steady) / gb if gb else math.nan,
        "background_cpu_s_per_gb": (
            sum(s["background_cpu_s"] for s in steady) / gb if gb else math.nan
        ),
    }
    cuda = [s["peak_extra_cuda_bytes"] for s in ok if s.get("peak_extra_cuda_bytes") is not None]
    out["peak_extra_cuda_bytes"] = max(cuda) if cuda else None
    return out
