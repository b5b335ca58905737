"""``asyncckpt inspect``: the tensor tree of a checkpoint file, without reading tensor data.

A ``torch.save`` file is a zip archive: ``<archive>/data.pkl`` (the pickled structure) and one
record per storage (``<archive>/data/<key>``). Only ``data.pkl`` is read. It is unpickled by
PyTorch's own weights-only unpickler, the one ``torch.load(weights_only=True)`` uses, so exactly
the same pickles are refused (and the same extra globals allowed through
``torch.serialization.add_safe_globals``). Its storage references are answered with storages
on the ``meta`` device: the tensors come back with their dtype, shape and strides but no bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import torch
from torch import _weights_only_unpickler

from .. import CheckpointError
from .._core.load import run_sync
from .._format.crypto import HEADER_SIZE, is_encrypted
from ..storage import storage_for
from ._output import (
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    fail,
    human_size,
    options_usable,
    safe,
    table,
)

__all__ = ["InspectError", "Inspection", "TreeEntry", "inspect_file", "run_inspect"]

_MAX_PICKLE = 1 << 30  # a data.pkl larger than this is not a checkpoint's structure


class InspectError(CheckpointError):
    """The file cannot be inspected (not a torch.save zip, refused pickle, encrypted, ...)."""


@dataclass(frozen=True)
class TreeEntry:
    """One leaf of the saved structure.

    Attributes:
        path: where it sits (``model.layer.weight``, ``history[3]``).
        type: ``"tensor"``, ``"parameter"`` or the Python type of a plain value.
        dtype / shape / nbytes: for tensors (``nbytes``: the bytes the tensor spans).
        storage: the storage record it views; ``offset`` in elements, ``contiguous`` as usual.
        value: a short rendering of a plain value.
        shares_with: the first path viewing the same storage, when this is not it.
    """

    path: str
    type: str
    dtype: str | None = None
    shape: list[int] | None = None
    nbytes: int | None = None
    storage: str | None = None
    offset: int | None = None
    contiguous: bool | None = None
    value: str | None = None
    shares_with: str | None = None


@dataclass
class Inspection:
    """The tensor tree of one file."""

    file: str
    entries: list[TreeEntry] = field(default_factory=list)
    #: storage key -> bytes
    storages: dict[str, int] = field(default_factory=dict)

    @property
    def tensors(self) -> int:
        return sum(1 for e in self.entries if e.dtype is not None)

    @property
    def total_bytes(self) -> int:
        return sum(self.storages.values())


class _MetaStorages:
    """``persistent_load`` for the weights-only unpickler: meta storages, one per key."""

    def __init__(self) -> None:
        self.by_key: dict[str, torch.storage.TypedStorage] = {}
        self.nbytes: dict[str, int] = {}

    def __call__(self, pid: object) -> torch.storage.TypedStorage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise InspectError(f"unexpected persistent id {pid!r:.80} (not a storage reference)")
        _, storage_type, key, _location, numel = pid
        if isinstance(key, bytes):
            key = key.decode("ascii", "backslashreplace")
        if not isinstance(key, str) or isinstance(numel, bool) or not isinstance(numel, int) \
                or numel < 0:
            raise InspectError(f"malformed storage reference {pid!r:.80}")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        if not isinstance(dtype, torch.dtype):
            raise InspectError(f"storage {key!r} has no dtype")
        if key not in self.by_key:
            nbytes = numel * dtype.itemsize
            meta = torch.UntypedStorage(nbytes, device="meta")
            self.by_key[key] = torch.storage.TypedStorage(
                wrap_storage=meta, dtype=dtype, _internal=True
            )
            self.nbytes[key] = nbytes
        return self.by_key[key]


def _find_pickle(zf: zipfile.ZipFile, where: str) -> zipfile.ZipInfo:
    infos = zf.infolist()
    if not infos:
        raise InspectError(f"{where} is an empty zip archive, not a torch.save file")
    archive = infos[0].filename.split("/", 1)[0]
    names = {i.filename: i for i in infos}
    if f"{archive}/constants.pkl" in names or any(n.startswith(f"{archive}/code/") for n in names):
        raise InspectError(
            f"{where} is a TorchScript archive (torch.jit.save), which weights-only loading "
            "refuses; open it with torch.jit.load"
        )
    info = names.get(f"{archive}/data.pkl")
    if info is None:
        raise InspectError(f"{where} is a zip archive without data.pkl, not a torch.save file")
    if info.file_size > _MAX_PICKLE:
        raise InspectError(f"{where}: data.pkl is {info.file_size} bytes, too large to inspect")
    return info


_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # the zip format's local file header


def _read_stored(fileobj: IO[bytes], info: zipfile.ZipInfo, where: str) -> bytes:
    """The bytes of an uncompressed record, read without ``zipfile``'s CRC check: torch.save
    may leave record CRCs out (``torch.serialization.config.save.compute_crc32 = False``),
    which torch.load accepts, and the checkpoint's own checksum is ``verify``'s job."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise InspectError(f"{where}: data.pkl is compressed, which torch.save never does")
    fileobj.seek(info.header_offset)
    header = fileobj.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise InspectError(f"{where}: the zip record of data.pkl is damaged")
    fields = _LOCAL_HEADER.unpack(header)
    fileobj.seek(info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1])
    data = fileobj.read(info.compress_size)
    if len(data) != info.compress_size:
        raise InspectError(f"{where} is truncated inside data.pkl")
    return data


def _unpickle(data: bytes, where: str) -> tuple[Any, _MetaStorages]:
    storages = _MetaStorages()
    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8")
    unpickler.persistent_load = storages  # type: ignore[method-assign]
    try:
        return unpickler.load(), storages
    except InspectError:
        raise
    except Exception as exc:  # UnpicklingError for refused globals; anything for broken data
        raise InspectError(
            f"{where}: refused or unreadable pickle (torch.load with weights_only=True would "
            f"refuse it too): {exc}"
        ) from exc


def _child(path: str, key: object) -> str:
    """``model.weight`` for str keys (state-dict style), ``x[3]`` / ``x[(1, 2)]`` otherwise."""
    if isinstance(key, str):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def _walk(root: object) -> Iterator[tuple[str, object, str | None]]:
    """(path, leaf, path of the first occurrence when the container was seen before)."""
    seen: dict[int, str] = {}
    stack: list[tuple[str, object]] = [("", root)]
    while stack:
        path, obj = stack.pop()
        if isinstance(obj, (dict, list, tuple)):
            if id(obj) in seen:
                yield path, obj, seen[id(obj)]
                continue
            seen[id(obj)] = path
            if isinstance(obj, dict):
                children = [(_child(path, k), v) for k, v in obj.items()]
            else:
                children = [(_child(path, i), v) for i, v in enumerate(obj)]
            if not children:
                yield path, obj, None
            stack.extend(reversed(children))
        else:
            yield path, obj, None


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(root: object, storages: _MetaStorages, file: str) -> Inspection:
    result = Inspection(file, storages=dict(storages.nbytes))
    key_of = {s._untyped_storage._cdata: k for k, s in storages.by_key.items()}
    first_view: dict[str, str] = {}
    for path, leaf, again in _walk(root):
        path = path or "(root)"
        if again is not None:
            result.entries.append(TreeEntry(path, type(leaf).__name__,
                                            value=f"same object as {again or '(root)'}"))
        elif isinstance(leaf, torch.Tensor):
            key = key_of.get(leaf.untyped_storage()._cdata) if leaf.layout == torch.strided \
                else None
            shares = None
            if key is not None:
                shares = first_view.setdefault(key, path)
                shares = None if shares == path else shares
            result.entries.append(TreeEntry(
                path,
                "parameter" if isinstance(leaf, torch.nn.Parameter) else "tensor",
                dtype=str(leaf.dtype).removeprefix("torch."),
                shape=list(leaf.shape),
                nbytes=leaf.numel() * leaf.element_size(),
                storage=key,
                offset=int(leaf.storage_offset()) if key is not None else None,
                contiguous=leaf.is_contiguous(),
                shares_with=shares,
            ))
        else:  # a plain value, or an empty container
            result.entries.append(TreeEntry(path, type(leaf).__name__, value=_short(leaf)))
    return result


def inspect_fileobj(fileobj: IO[bytes], where: str) -> Inspection:
    """Inspect an open, seekable ``torch.save`` file (see the module docstring).

    Raises:
        InspectError: it is encrypted, not a zip-format torch.save file, or its pickle is
            refused by weights-only loading.
    """
    head = fileobj.read(HEADER_SIZE)
    fileobj.seek(0)
    if is_encrypted(head):
        raise InspectError(f"{where} is encrypted; its structure cannot be read without the key")
    try:
        with zipfile.ZipFile(fileobj) as zf:
            info = _find_pickle(zf, where)
        data = _read_stored(fileobj, info, where)
    except zipfile.BadZipFile as exc:
        raise InspectError(
            f"{where} is not a zip-format torch.save file (the legacy format of "
            f"_use_new_zipfile_serialization=False, or not a checkpoint): {exc}"
        ) from None
    root, storages = _unpickle(data, where)
    return _describe(root, storages, where)


def _is_uri(location: str) -> bool:
    head, sep, _ = location.partition("://")
    return bool(sep) and head.isidentifier()


@contextmanager
def open_checkpoint_file(file: str, options: Mapping[str, str]) -> Iterator[IO[bytes]]:
    """A seekable handle on ``file``: opened in place when local, else downloaded to a
    temporary file (remote backends read whole objects)."""
    if not _is_uri(file) or file.startswith("file://"):
        path = file.removeprefix("file://")
        if os.path.isdir(path):
            raise IsADirectoryError(f"{path} is a folder; inspect takes one checkpoint file")
        with open(path, "rb") as f:
            yield f
        return
    parent, _, name = file.rstrip("/").rpartition("/")
    storage = storage_for(parent, storage_options=options)

    async def download(out: IO[bytes]) -> None:
        await storage.open(writer=False)
        try:
            async for chunk in storage.read_stream(name):
                out.write(chunk)
        finally:
            await storage.aclose()

    with tempfile.TemporaryFile() as tmp:
        run_sync(lambda: download(tmp))
        tmp.seek(0)
        yield tmp


def inspect_file(file: str, options: Mapping[str, str] | None = None) -> Inspection:
    """Inspect a local path or URI (see :func:`inspect_fileobj`)."""
    with open_checkpoint_file(file, options or {}) as f:
        return inspect_fileobj(f, file)


def _print_text(result: Inspection) -> None:
    rows = []
    for e in result.entries:
        if e.dtype is not None:
            notes = []
            if e.shares_with is not None:
                notes.append(f"shares storage with {safe(e.shares_with)}")
            if e.offset:
                notes.append(f"offset {e.offset}")
            if e.contiguous is False:
                notes.append("non-contiguous")
            rows.append([safe(e.path), e.type, e.dtype, str(tuple(e.shape or ())),
                         human_size(e.nbytes or 0), ", ".join(notes)])
        else:
            rows.append([safe(e.path), safe(e.type), "", "", "", safe(e.value or "")])
    table(rows, ["PATH", "TYPE", "DTYPE", "SHAPE", "BYTES", "VALUE / NOTES"], sys.stdout)
    print(f"{safe(result.file)}: {result.tensors} tensor(s) in {len(result.storages)} "
          f"storage(s), {human_size(result.total_bytes)} of tensor data")


def run_inspect(args: argparse.Namespace) -> int:
    if _is_uri(args.file) and not options_usable(
        "inspect", args.file.rstrip("/").rpartition("/")[0], dict(args.storage_option)
    ):
        return EXIT_USAGE
    try:
        result = inspect_file(args.file, dict(args.storage_option))
    except (FileNotFoundError, IsADirectoryError) as exc:
        fail("inspect", exc)
        return EXIT_USAGE
    except (InspectError, CheckpointError, OSError) as exc:
        fail("inspect", exc)
        return EXIT_PROBLEMS
    if args.json:
        doc = {
            "file": result.file,
            "tensors": result.tensors,
            "total_bytes": result.total_bytes,
            "storages": result.storages,
            "entries": [{k: v for k, v in asdict(e).items() if v is not None}
                        for e in result.entries],
        }
        print(json.dumps(doc, indent=1, ensure_ascii=True))
    else:
        _print_text(result)
    return EXIT_OK
