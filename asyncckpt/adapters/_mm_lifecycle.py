"""Closing the writers that their owners forgot to close.

A hook driven by hand (tests, notebooks) is often dropped without ``after_run``. Its writer must
not outlive it: it would keep writing after the caller has moved on (into a folder it may have
deleted), and at interpreter exit its failures would be printed as "Exception ignored". So the
owner's writer is closed when the owner is garbage-collected, or at interpreter exit if it is
still alive then, and the outcome is logged as one line (never a traceback).

The exit hook is registered with ``threading``'s own exit hooks (as the sync ``Checkpointer``
does for itself), which run newest first and before ``concurrent.futures`` stops its executors,
so the close runs while the writer's thread pools still work, and before the ``Checkpointer``'s
own last-resort close.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Callable

__all__ = ["close_when_forgotten"]

logger = logging.getLogger("asyncckpt")


def close_when_forgotten(owner: object, close: Callable[[], None], what: str) -> weakref.finalize:
    """Call ``close()`` when ``owner`` is garbage-collected or at interpreter exit, whichever
    comes first, unless the returned finalizer is detached (``finalizer.detach()``) first.

    ``close`` must not reference ``owner`` (it would keep it alive).
    """
    finalizer = weakref.finalize(owner, _close_forgotten, close, what)
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(finalizer)
        except RuntimeError:  # the interpreter is already shutting down: atexit covers it
            pass
    return finalizer


def _running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _close_forgotten(close: Callable[[], None], what: str) -> None:
    if _running_loop():
        # Collected on a thread that runs an event loop (the writer's own, for one): closing
        # blocks until the queue is drained, which must not happen on a loop.
        threading.Thread(target=_close_and_log, args=(close, what),
                         name="asyncckpt-close").start()
        return
    _close_and_log(close, what)


def _close_and_log(close: Callable[[], None], what: str) -> None:
    try:
        close()
    except Exception as exc:  # one line: the caller is gone, nobody can handle it
        logger.warning("%s was never closed; closing it now failed: %s", what, _one_line(exc))
    else:
        logger.warning("%s was never closed; closed it now (queued checkpoints were written)",
                       what)


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None and str(cause) not in text:
        text += f" (caused by {type(cause).__name__}: {cause})"
    return " ".join(text.split())
