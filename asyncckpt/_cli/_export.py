"""File commands that write a new file: ``publish`` and ``convert``."""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .. import CheckpointError, CheckpointNotFoundError, checkpoints, load
from .._core.reading import run_sync, split_location
from ..storage import LocalStorage, storage_for
from ._folder import ProgressStorage
from ._output import EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, fail, options_usable, progress, safe

__all__ = ["ExportError", "convert_to_safetensors", "publish", "run_convert", "run_publish"]


class ExportError(CheckpointError):
    """The checkpoint cannot be published / converted as asked."""


def join_location(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if "://" in folder else os.path.join(folder, name)


def load_checkpoint(file: str, options: Mapping[str, str]) -> Any:
    """Load ``file`` on the CPU (weights only). A file its folder's index lists is checked
    against its checksum first, with a progress bar; any other file loads unverified."""
    folder, name = split_location(file)
    try:
        listed = {c.name: c.size for c in checkpoints(folder, storage_options=options)}
    except CheckpointError:
        listed = {}
    if name not in listed:
        print(f"note: {safe(file)} is not listed in an asyncckpt index; it is read without "
              "checksum verification", file=sys.stderr)
        return load(file, map_location="cpu", storage_options=options)
    with progress(listed[name], f"reading {name}") as bar:
        storage = ProgressStorage(storage_for(folder, storage_options=options), bar)
        return load(storage, name, map_location="cpu")


async def _write(folder: str, name: str, data: memoryview, options: Mapping[str, str]) -> str:
    storage = storage_for(folder, storage_options=options)
    if isinstance(storage, LocalStorage):
        os.makedirs(storage.path, exist_ok=True)
    await storage.open(writer=False)  # no writer lock: publishing next to a live run is fine
    try:
        await storage.write_bytes(name, data)  # temporary name, fsync, atomic rename
        return storage.uri_of(name)
    finally:
        await storage.aclose()


def write_file(folder: str, name: str, data: memoryview, options: Mapping[str, str]) -> str:
    """Publish ``data`` as ``folder/name`` atomically; refuse to replace a listed checkpoint."""
    try:
        listed = {c.name for c in checkpoints(folder, storage_options=options)}
    except CheckpointNotFoundError:
        listed = set()
    if name in listed:
        raise ExportError(
            f"{join_location(folder, name)} is a checkpoint its folder's index lists; "
            "choose another output"
        )
    return run_sync(lambda: _write(folder, name, data, options))


# -- publish ---------------------------------------------------------------------------------------
def publish(
    file: str, keys: Sequence[str], out_dir: str | None, options: Mapping[str, str]
) -> tuple[str, list[str]]:
    """Write ``<stem>-<sha256[:8]>.pth`` with only the top-level ``keys`` of ``file``.

    The keys as mmengine's ``CheckpointHook(published_keys=...)`` chooses them: every other
    top-level key is removed (keys asked for but absent are ignored), and the result is a plain
    ``torch.save`` file named like mmengine's. The suffix is the first 8 hex digits of the
    SHA-256 *of the written file*, so ``sha256sum`` and ``torch.hub``'s ``check_hash=True``
    verify a download against its name. (mmengine hashes ``pickle.dumps`` of the dict instead,
    whose bytes depend on memory addresses: its suffix changes between runs and does not
    match the file.)

    Returns:
        The path / URI written and the keys removed.

    Raises:
        ExportError: the checkpoint is not a dict, or the output would replace a listed one.
        CheckpointError: the file cannot be loaded.
    """
    checkpoint = load_checkpoint(file, options)
    if not isinstance(checkpoint, dict):
        raise ExportError(
            f"{file} holds a {type(checkpoint).__name__}, not a dict of top-level keys to publish"
        )
    removed = [key for key in checkpoint if key not in keys]
    for key in removed:
        del checkpoint[key]
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    folder, name = split_location(file)
    # the view is released before the buffer can be collected: a BytesIO collected while a
    # view of it is alive reports an ignored BufferError (seen on Python 3.13)
    with buffer.getbuffer() as view:
        sha = hashlib.sha256(view).hexdigest()
        out_name = os.path.splitext(name)[0] + f"-{sha[:8]}.pth"
        return write_file(out_dir or folder, out_name, view, options), removed


def run_publish(args: argparse.Namespace) -> int:
    keys = list(args.keys)
    if len(set(keys)) != len(keys):
        fail("publish", f"--keys names a key twice: {keys!r}")
        return EXIT_USAGE
    if not options_usable("publish", split_location(args.file)[0], dict(args.storage_option)):
        return EXIT_USAGE
    try:
        written, removed = publish(args.file, keys, args.out_dir, dict(args.storage_option))
    except CheckpointNotFoundError as exc:
        fail("publish", exc)
        return EXIT_USAGE
    except (CheckpointError, OSError) as exc:
        fail("publish", exc)
        return EXIT_PROBLEMS
    if removed:
        print("removed keys not in --keys: " + ", ".join(safe(repr(k)) for k in removed),
              file=sys.stderr)
    print(f"published {safe(args.file)} to {safe(written)}")
    return EXIT_OK


# -- convert ---------------------------------------------------------------------------------------
def _flatten(tree: object, prefix: str, out: dict[str, Any], others: list[str]) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out, others)
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            _flatten(value, f"{prefix}.{i}" if prefix else str(i), out, others)
    elif isinstance(tree, (torch.Tensor, np.ndarray)):
        if prefix in out:
            raise ExportError(f"two values flatten to the same name {prefix!r}")
        out[prefix] = tree
    else:
        others.append(prefix or "(root)")


def safetensors_tensors(state: object, skip_non_tensors: bool) -> tuple[dict[str, Any], list[str],
                                                                         list[str]]:
    """The flat ``{name: contiguous CPU tensor}`` safetensors takes, the paths of skipped
    non-tensor values, and the names written as copies (shared or non-contiguous storage)."""
    flat: dict[str, Any] = {}
    others: list[str] = []
    _flatten(state, "", flat, others)
    if others and not skip_non_tensors:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ExportError(
            f"{len(others)} value(s) are not tensors ({shown}); safetensors stores tensors "
            "only: pass --skip-non-tensors to leave them out"
        )
    tensors: dict[str, torch.Tensor] = {}
    owners: dict[int, str] = {}
    copied: list[str] = []
    for name, value in flat.items():
        try:
            t = torch.from_numpy(value) if isinstance(value, np.ndarray) else value.detach()
        except TypeError as exc:  # numpy arrays of objects or strings
            raise ExportError(f"{name}: {exc}") from None
        if t.layout != torch.strided:
            raise ExportError(f"{name} is a {t.layout} tensor; safetensors stores dense ones")
        if t.nbytes:
            ptr = t.untyped_storage().data_ptr()
            shared = ptr in owners
            owners.setdefault(ptr, name)
            whole = t.is_contiguous() and t.storage_offset() == 0 \
                and t.nbytes == t.untyped_storage().nbytes()
            if shared or not whole:
                t = t.contiguous().clone()  # safetensors has no aliasing and no strides
                copied.append(name)
        tensors[name] = t
    return tensors, others, copied


def convert_to_safetensors(
    file: str, output: str | None, skip_non_tensors: bool, options: Mapping[str, str]
) -> tuple[str, list[str], list[str]]:
    """Write the tensors of ``file`` as a ``.safetensors`` file (names: dotted key paths).

    Returns:
        The path / URI written, the skipped non-tensor paths, the names written as copies.

    Raises:
        ExportError: safetensors is not installed, or the state cannot be represented.
        CheckpointError: the file cannot be loaded.
    """
    try:
        from safetensors.torch import save as safetensors_save
    except ImportError:
        raise ExportError(
            "converting to safetensors needs the safetensors package: "
            "pip install 'asyncckpt[safetensors]'"
        ) from None
    state = load_checkpoint(file, options)
    tensors, skipped, copied = safetensors_tensors(state, skip_non_tensors)
    if not tensors:
        raise ExportError(f"{file} holds no tensors")
    try:
        data = safetensors_save(tensors, metadata={"format": "pt"})
    except Exception as exc:  # unsupported dtypes, mostly
        raise ExportError(f"safetensors cannot store the state of {file}: {exc}") from exc
    if output is None:
        folder, name = split_location(file)
        output = join_location(folder, os.path.splitext(name)[0] + ".safetensors")
    folder, name = split_location(output)
    return write_file(folder, name, memoryview(data), options), skipped, copied


def run_convert(args: argparse.Namespace) -> int:
    if not options_usable("convert", split_location(args.file)[0], dict(args.storage_option)):
        return EXIT_USAGE
    try:
        written, skipped, copied = convert_to_safetensors(
            args.file, args.output, args.skip_non_tensors, dict(args.storage_option)
        )
    except CheckpointNotFoundError as exc:
        fail("convert", exc)
        return EXIT_USAGE
    except (CheckpointError, OSError) as exc:
        fail("convert", exc)
        return EXIT_PROBLEMS
    if skipped:
        print(f"left out {len(skipped)} non-tensor value(s): "
              + ", ".join(safe(p) for p in skipped[:10]), file=sys.stderr)
    if copied:
        print(f"wrote {len(copied)} tensor(s) that shared memory or were not contiguous as "
              "separate contiguous copies", file=sys.stderr)
    print(f"converted {safe(args.file)} to {safe(written)}")
    return EXIT_OK
