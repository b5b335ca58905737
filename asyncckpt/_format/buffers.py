"""Raw addresses of Python buffers, for copies that release the GIL (``ctypes.memmove``)."""

from __future__ import annotations

import ctypes

__all__ = ["address_of", "memmove_into"]


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.py_object),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def address_of(view: memoryview) -> int:
    """The address of a (possibly read-only) buffer, via the buffer protocol."""
    buf = _PyBuffer()
    if _get_buffer(view, ctypes.byref(buf), 0) != 0:  # PyBUF_SIMPLE
        raise BufferError("cannot get the buffer's address")
    try:
        return int(buf.buf or 0)
    finally:
        _release_buffer(ctypes.byref(buf))


def memmove_into(dst_address: int, data: memoryview) -> None:
    """Copy ``data`` (any contiguous buffer, read-only included) to ``dst_address``.

    ``ctypes.memmove`` releases the GIL, unlike slice assignment, so a large copy in a worker
    thread does not stall the training thread.
    """
    ctypes.memmove(dst_address, address_of(data), data.nbytes)
