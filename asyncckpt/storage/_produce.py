"""Publishing bytes that a blocking function produces in a worker thread, through the async
:meth:`Storage.write` of a backend without a blocking path::

    produce(emit) (worker thread) ──chunks──▶ bounded stream ──▶ storage.write(name, ...)
                                                                 (event loop)

The producer waits while the stream is full, so at most a few chunks are in flight; chunks must
stay valid until consumed (the serializer's default, non-borrowed mode).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import anyio

from ._base import Buffer, Storage

__all__ = ["ProducerStopped", "write_produced"]

T = TypeVar("T")

_CHANNEL_DEPTH = 8  # chunks in flight between the producer thread and storage.write
_END = object()  # the producer finished; anything else ending the stream is an abort


class ProducerStopped(Exception):
    """The producer stopped before the end of the stream (its own error is raised instead)."""


class _Outcome(Generic[T]):
    """What the producer thread returned or raised."""

    def __init__(self) -> None:
        self.done = False
        self.result: T | None = None
        self.error: Exception | None = None


async def write_produced(
    storage: Storage, name: str, produce: Callable[[Callable[[Buffer], None]], T]
) -> tuple[int, T]:
    """Publish ``name`` with what ``produce(emit)`` passes to ``emit`` in a worker thread.

    Args:
        storage: the backend (its async ``write`` runs on this event loop).
        name: the object to publish.
        produce: blocking; called once in a worker thread with ``emit``, which takes the next
            chunk (valid until the storage consumed it) and returns once it is queued.

    Returns:
        ``(bytes stored, what produce returned)``.

    Raises:
        Exception: the storage's error if the write failed (the root cause: the producer only
            saw the stream close), else the producer's own error. Nothing is published then.
    """
    send, recv = anyio.create_memory_object_stream[object](_CHANNEL_DEPTH)
    outcome: _Outcome[T] = _Outcome()

    def run() -> T:
        def emit(chunk: Buffer) -> None:
            anyio.from_thread.run(send.send, chunk)

        result = produce(emit)
        anyio.from_thread.run(send.send, _END)
        return result

    async def producer() -> None:
        with send:
            try:
                outcome.result = await anyio.to_thread.run_sync(run)
                outcome.done = True
            except Exception as exc:
                outcome.error = exc

    async def chunks() -> Any:
        async for item in recv:
            if item is _END:
                return
            yield item
        raise ProducerStopped

    storage_error: Exception | None = None
    written = 0
    async with anyio.create_task_group() as tg:
        tg.start_soon(producer)
        with recv:  # closing it unblocks a producer waiting to send, whatever happens here
            stream = chunks()
            try:
                written = await storage.write(name, stream)
            except Exception as exc:
                storage_error = exc
            finally:
                await stream.aclose()
    if storage_error is not None and not isinstance(storage_error, ProducerStopped):
        raise storage_error
    if outcome.error is not None:
        raise outcome.error
    if not outcome.done:  # pragma: no cover - the producer either returned or raised
        raise RuntimeError(f"the producer of {storage.uri_of(name)} stopped without a result")
    return written, outcome.result  # type: ignore[return-value]
