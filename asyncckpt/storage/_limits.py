"""What readers refuse: objects that are not plain files, and streams longer than allowed.

A checkpoint folder may come from anyone. A listed name that is a FIFO would block a reader
forever, and one that is a link to ``/dev/zero`` would feed it bytes forever; a file swapped for
a larger one would be hashed to its end before its size is compared. Readers therefore open
local files without following links and without blocking, check the *opened* file, and stop
reading at ``max_bytes``::

    StorageError
     ├── NotARegularFileError    the name is a link, FIFO, device, socket or directory
     └── ObjectTooLargeError     the object holds more than the reader's max_bytes
"""

from __future__ import annotations

import stat

from .._errors import StorageError

__all__ = ["NotARegularFileError", "ObjectTooLargeError", "check_max_bytes", "describe_mode"]


class NotARegularFileError(StorageError):
    """A name in a checkpoint folder is not a regular file, so it is not read.

    Attributes:
        uri: the path concerned.
        file_type: what it is instead (``"symbolic link"``, ``"FIFO"``, ``"directory"``, ...).
    """

    def __init__(self, uri: str, file_type: str) -> None:
        super().__init__(
            f"{uri} is a {file_type}, not a regular file: asyncckpt reads and locks only "
            "regular files in a checkpoint folder (links are not followed, so that nothing "
            "outside the folder, nor a FIFO or device, is ever opened)",
            uri,
        )
        self.file_type = file_type


class ObjectTooLargeError(StorageError):
    """An object holds more bytes than the reader allowed (``max_bytes``); nothing past the
    limit is read.

    Attributes:
        uri: the object concerned.
        max_bytes: the limit the reader gave (for a checkpoint: the size its index recorded).
        size: the object's size when it was known up front, else None (it grew while read).
    """

    def __init__(self, uri: str, max_bytes: int, size: int | None = None) -> None:
        held = f"{size} bytes, more" if size is not None else "more bytes"
        super().__init__(f"{uri} holds {held} than the {max_bytes} expected; it is not read "
                         "further (replaced, appended to, or not a checkpoint)", uri)
        self.max_bytes = max_bytes
        self.size = size


def check_max_bytes(max_bytes: int | None) -> None:
    """Validate a ``max_bytes`` argument.

    Raises:
        TypeError, ValueError: it is not None or an int >= 0.
    """
    if max_bytes is None:
        return
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
        raise TypeError(f"max_bytes must be an int or None, got {max_bytes!r}")
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")


_KINDS = (
    (stat.S_ISLNK, "symbolic link"),
    (stat.S_ISDIR, "directory"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISSOCK, "socket"),
)


def describe_mode(mode: int) -> str:
    """What kind of file ``st_mode`` describes, in words."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "special file"
