"""Blocking file operations of the local backend, hardened for folders from anyone.

Every function here blocks; the local backend calls them in worker threads. Names in a
checkpoint folder are opened without following symbolic links (``O_NOFOLLOW``) and without
blocking (``O_NONBLOCK``: a FIFO would otherwise wait for a writer forever); what was opened is
then checked with ``fstat`` -- the opened file, not the name, which may have changed meanwhile --
and anything but a regular file is refused with :class:`NotARegularFileError`.
"""

from __future__ import annotations

import builtins
import errno
import logging
import os
import stat
from typing import BinaryIO

from .._errors import StorageError, TransientStorageError
from .._format.naming import TMP_PREFIX
from ._limits import NotARegularFileError, ObjectTooLargeError, describe_mode

__all__ = [
    "TRANSIENT_ERRNOS",
    "fsync_dir",
    "lock_file",
    "open_regular",
    "open_regular_file",
    "read_regular",
    "remove_quietly",
    "remove_temporaries",
    "storage_error",
    "write_all",
]

logger = logging.getLogger("asyncckpt")

#: errno values for which a retry can succeed; everything else (ENOSPC, EACCES, EROFS, EIO, ...)
#: is reported at once.
TRANSIENT_ERRNOS = frozenset({errno.EINTR, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT})

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def storage_error(action: str, path: str, exc: OSError) -> StorageError:
    """A StorageError (transient for the errnos a retry can cure) naming the action and path."""
    cls = TransientStorageError if exc.errno in TRANSIENT_ERRNOS else StorageError
    reason = exc.strerror or str(exc) or type(exc).__name__
    code = f" ({errno.errorcode.get(exc.errno, exc.errno)})" if exc.errno else ""
    return cls(f"cannot {action} {path}: {reason}{code}", path)


def fsync_dir(path: str) -> None:
    """fsync a folder, so that the names renamed into it survive a crash."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, view: memoryview) -> None:
    """``os.write`` until all of ``view`` is written."""
    while view.nbytes:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write returned 0 bytes")
        view = view[n:]


def remove_quietly(path: str) -> None:
    """Remove a temporary file of ours if it is there; a failure is left to the next writer's
    ``cleanup_temporaries`` (the error being reported is the one that matters)."""
    try:
        os.remove(path)
    except OSError:
        pass


def _refuse_link(path: str, exc: OSError) -> None:
    # O_NOFOLLOW reports a link as the last component with ELOOP (EMLINK on some BSDs).
    if _O_NOFOLLOW and exc.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
        raise NotARegularFileError(path, "symbolic link") from exc


def _check_regular(fd: int, path: str) -> os.stat_result:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise NotARegularFileError(path, describe_mode(info.st_mode))
    return info


def open_regular(path: str) -> int:
    """Open ``path`` read-only as a regular file and return the (blocking) descriptor.

    Raises:
        FileNotFoundError: nothing is there (or the folder is a file).
        NotARegularFileError: it is a link, FIFO, device, socket or directory.
        OSError: any other failure to open it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC)
    except NotADirectoryError as exc:  # the "folder" is a file: no such name in it
        raise FileNotFoundError(errno.ENOENT, "no such checkpoint", path) from exc
    except OSError as exc:
        _refuse_link(path, exc)
        raise
    try:
        _check_regular(fd, path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular_file(path: str) -> BinaryIO:
    """:func:`open_regular` as a buffered binary file object."""
    return os.fdopen(open_regular(path), "rb")


def read_regular(path: str, max_bytes: int | None) -> bytes:
    """The whole content of the regular file ``path``, at most ``max_bytes`` of it.

    Raises:
        ObjectTooLargeError: the file holds more than ``max_bytes``.
        (and what :func:`open_regular` raises)
    """
    with open_regular_file(path) as f:
        if max_bytes is None:
            return f.read()
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise ObjectTooLargeError(path, max_bytes, size)
        data = f.read(max_bytes + 1)  # one byte more tells a file that grew meanwhile
        if len(data) > max_bytes:
            raise ObjectTooLargeError(path, max_bytes)
        return data


def lock_file(path: str) -> int:
    """Create (if needed) and exclusively ``flock`` the folder's lock file; return its fd.

    The lock is opened without following links: a link planted as the lock file would make
    the writer create a file wherever it points, outside the folder.

    Raises:
        BlockingIOError: another writer holds the lock.
        NotARegularFileError: the lock file is a link, FIFO, directory, ...
        OSError: it cannot be created or opened.
    """
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC,
                     0o644)
    except OSError as exc:
        _refuse_link(path, exc)
        if exc.errno == errno.EISDIR:
            raise NotARegularFileError(path, "directory") from exc
        raise
    try:
        _check_regular(fd, path)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_temporaries(folder: str) -> builtins.list[str]:
    """Remove what a crashed writer left under the temporary prefix; return the names removed.

    Only names are removed (``unlink``): a link is removed itself, never what it points to.
    A directory with the prefix is not something a writer creates: it is left in place, with
    a warning, and does not stop the folder from being opened.

    Raises:
        StorageError: the folder cannot be listed or a leftover cannot be removed.
    """
    try:
        with os.scandir(folder) as entries:
            candidates = [e for e in entries if e.name.startswith(TMP_PREFIX)]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise storage_error("list", folder, exc) from exc
    removed = []
    for entry in candidates:
        try:
            if entry.is_dir(follow_symlinks=False):
                raise IsADirectoryError(errno.EISDIR, "is a directory", entry.path)
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        except IsADirectoryError:
            logger.warning("%s is a directory named like an asyncckpt temporary file; writers "
                           "never create one, so it is left in place", entry.path)
            continue
        except OSError as exc:
            raise storage_error("remove the leftover", entry.path, exc) from exc
        removed.append(entry.name)
    return sorted(removed)
