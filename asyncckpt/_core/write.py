"""Writing one checkpoint's bytes: serialize a snapshot and store it durably and atomically.

::

    serializer (worker thread) ──chunks──▶ storage.write (tmp, fsync, rename, fsync)
      └▶ encrypt, same thread, if encryption

Or, when the backend has a blocking path (local disk: O_DIRECT), the writer's low-priority job
thread serializes and writes the file itself, so no chunk crosses threads. Either way the size
and checksum returned are those of the stored bytes, for the index.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from .._errors import StorageError
from .._format.crypto import Encryption
from .._format.serialize import serialize
from .._snapshot.snapshot import Snapshot
from ..storage import BlockingWrite, Storage
from ..storage._produce import write_produced
from .config import Reducer
from .jobthread import JobThread

__all__ = ["CheckpointWriter"]

logger = logging.getLogger("asyncckpt")

class _JobCancelled(Exception):
    """The blocking job stopped because its task was cancelled (the cancellation is raised)."""


class CheckpointWriter:
    """Serializes snapshots into a storage backend (one attempt per :meth:`write` call).

    Args:
        storage: where checkpoints go.
        encryption: seal the bytes as they are serialized, or None.
        torch_crc32: let torch's zip writer compute its CRC32 (see ``CheckpointerConfig``).
        reducers: copyreg-style reducers for extra types.
        cpu_locations: record CPU as every tensor's location.
        writer_nice: niceness of the job thread.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        encryption: Encryption | None,
        torch_crc32: bool,
        reducers: Mapping[type, Reducer],
        cpu_locations: bool,
        writer_nice: int,
    ) -> None:
        self.storage = storage
        self._encryption = encryption
        self._options: dict[str, Any] = {
            "torch_crc32": torch_crc32,
            "reducers": dict(reducers),
            "cpu_locations": cpu_locations,
        }
        self._jobs = JobThread(writer_nice)

    async def aclose(self) -> None:
        await self._jobs.aclose()

    async def write(self, name: str, snapshot: Snapshot) -> tuple[int, str]:
        """One attempt: serialize in a worker thread, streaming chunks into storage.write, or
        through the backend's blocking path when it has one (:meth:`_write_blocking`).

        With ``encryption`` the serializer writes into a sealer in the same thread, and the size
        and checksum returned (for the index) are those of the stored, encrypted bytes.
        """
        sink = self.storage.blocking_write(name, size_hint=snapshot.nbytes)
        if sink is not None:
            return await self._write_blocking(name, snapshot, sink)
        options = self._options
        encryption = self._encryption

        def produce(emit: Callable[[Any], None]) -> tuple[int, str]:
            if encryption is None:
                return serialize(snapshot, emit, **options)
            sealer = encryption.sealer(emit)
            serialize(snapshot, sealer.write, **options)
            return sealer.finish()

        written, (size, checksum) = await write_produced(self.storage, name, produce)
        await self._check_written(name, written, size)
        return size, checksum

    async def _write_blocking(
        self, name: str, snapshot: Snapshot, sink: BlockingWrite
    ) -> tuple[int, str]:
        """One attempt through the backend's blocking path: the writer's low-priority job
        thread serializes (and encrypts) and writes the file itself, so no chunk crosses
        threads. Cancellation (abandon at close) is noticed between chunks; the sink is then
        aborted and leaves nothing behind."""
        options = self._options
        encryption = self._encryption

        def run(cancelled: threading.Event) -> tuple[int, str, int]:
            def store(chunk: Any) -> None:
                if cancelled.is_set():
                    raise _JobCancelled
                sink.write(chunk)

            sink.cancelled = cancelled
            try:
                if encryption is None:
                    size, checksum = serialize(snapshot, store, borrowed=True, **options)
                else:  # the sealer encrypts or copies each piece before it returns
                    sealer = encryption.sealer(store)
                    serialize(snapshot, sealer.write, borrowed=True, **options)
                    size, checksum = sealer.finish()
                if cancelled.is_set():
                    raise _JobCancelled
                return size, checksum, sink.commit()
            except BaseException:
                sink.abort()
                raise

        size, checksum, written = await self._jobs.run(run)
        await self._check_written(name, written, size)
        return size, checksum

    async def _check_written(self, name: str, written: int, size: int) -> None:
        """Raise if the backend published other than the ``size`` bytes serialized."""
        if written == size:
            return
        # The backend published something other than what was serialized. No index names it (a
        # listed name is unlisted before it is rewritten), so it can go.
        with anyio.CancelScope(shield=True):
            try:
                await self.storage.delete(name)
            except Exception as exc:
                logger.warning("could not remove the short write %s: %s", name, exc)
        raise StorageError(
            f"storage accepted {written} of {size} bytes for {name}", self.storage.uri_of(name)
        )
