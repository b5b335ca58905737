"""The whole-file checksum recorded in the index (a leaf: imports nothing of asyncckpt)."""

from __future__ import annotations

from typing import Any

import xxhash

__all__ = ["CHECKSUM_ALGO", "Hasher", "checksum_of"]

CHECKSUM_ALGO = "xxh3_128"


class Hasher:
    """The whole-file checksum: ``"xxh3_128:<hex>"``."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()

    def update(self, data: Any) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return f"{CHECKSUM_ALGO}:{self._h.hexdigest()}"


def checksum_of(data: bytes | memoryview) -> str:
    """Checksum of a whole byte string, in the index's format."""
    h = Hasher()
    h.update(data)
    return h.hexdigest()
