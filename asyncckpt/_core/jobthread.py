"""The writer's own thread for blocking jobs (serializing and writing a checkpoint).

On a machine with few cores the writer competes with the training loop for CPU; when it runs on
the same core as one of torch's OpenMP compute threads, the whole parallel region waits for that
thread. The job therefore runs in one long-lived thread of the writer's own whose scheduling
priority is lowered (``nice``, per thread on Linux): it gets the CPU whenever the training loop
leaves some, and yields it when the loop needs it. Lowering is one-way for unprivileged
processes, which is why the thread is dedicated rather than one of anyio's shared workers.

Cancellation: the job receives a ``threading.Event`` that is set when the awaiting task is
cancelled; the job checks it between chunks and stops, and the task waits (shielded) until it
has, so nothing the job cleans up is left behind. A job that was already past its last check
(committing) finishes, and its result is returned: what it did must be recorded.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import anyio

__all__ = ["JobThread"]

logger = logging.getLogger("asyncckpt")
T = TypeVar("T")


def _lower_priority(nice: int) -> None:
    if nice <= 0 or not sys.platform.startswith("linux"):
        return  # elsewhere PRIO_PROCESS with a thread id is not per-thread
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:  # containers may forbid it; the writer works all the same
        logger.debug("could not lower the writer thread's priority: %s", exc)


class JobThread:
    """A lazily started, single-thread executor whose thread runs at ``nice`` above normal."""

    def __init__(self, nice: int, name: str = "asyncckpt-serialize") -> None:
        self.nice = nice
        self._name = name
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def run(self, job: Callable[[threading.Event], T]) -> T:
        """Run ``job(cancelled)`` in the thread; on cancellation set ``cancelled``, wait until
        the job returned, then re-raise the cancellation -- unless the job completed anyway,
        whose result is returned."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=self._name,
                initializer=_lower_priority, initargs=(self.nice,),
            )
        cancelled = threading.Event()
        future = self._executor.submit(job, cancelled)
        try:
            return await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(concurrent.futures.wait, [future])
            if future.exception() is None:
                # The job was past its last check and finished (its file is committed): report
                # it, so that it is recorded. anyio's cancellation is level-triggered: the
                # caller's next await that is not shielded is cancelled all the same.
                return future.result()
            raise

    async def aclose(self) -> None:
        """Stop the thread (after its current job)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await anyio.to_thread.run_sync(executor.shutdown)
