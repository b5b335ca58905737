"""One index entry, and the strict JSON rules every index document (and journal record) follows.

An index is read from a folder that may be damaged or hostile, so nothing in it is trusted:
the parser refuses ``NaN``/``Infinity`` tokens, overlong integers and floats that overflow, and
nesting deep enough to exhaust the stack; every field is checked for type and range (counts fit
64 bits, times are finite) and every name or metric key for characters that cannot be stored or
printed safely. Whatever is wrong becomes a :class:`~asyncckpt.CorruptIndexError` naming the
file and the field -- never another exception.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

from .._errors import CorruptIndexError
from .best import check_metric_key
from .crypto import EncMode
from .naming import check_series, validate_name
from .paths import PathKey

__all__ = [
    "MAX_COUNT",
    "IndexEntry",
    "decode_count",
    "decode_number",
    "encode_number",
    "load_json",
    "text",
]

ENCRYPTION_MODES = frozenset(get_args(EncMode))
#: Steps, epochs, sizes and generations fit a signed 64-bit integer.
MAX_COUNT = 2**63 - 1
#: Commit times are seconds since the epoch; anything beyond this (year ~5100) is damage.
MAX_TIME = 1e11
#: Longest integer literal the parser converts (int() is quadratic in the digits).
_MAX_DIGITS = 1000
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def encode_number(value: float) -> float | str:
    """A float as strict JSON: non-finite values are spelled as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def _parse_int(literal: str) -> int:
    if len(literal) > _MAX_DIGITS:
        raise ValueError(f"an integer of {len(literal)} digits")
    return int(literal)


def _parse_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"the number {literal[:40]} is out of range")
    return value


def _refuse_constant(name: str) -> None:
    raise ValueError(f"the token {name} is not JSON")


def load_json(data: bytes, source: str) -> object:
    """Parse ``data`` as strict JSON.

    Raises:
        CorruptIndexError: it is not UTF-8, not JSON, nested too deeply, or holds a number
            Python cannot represent faithfully.
    """
    try:
        return json.loads(
            data.decode("utf-8"),
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_refuse_constant,
        )
    except RecursionError:
        raise CorruptIndexError(f"{source}: not a JSON document (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise CorruptIndexError(f"{source}: not a JSON document ({exc})") from None


def decode_number(value: object, where: str, *, finite: bool = False) -> float:
    """A number of the document as a float (``"NaN"``, ``"Infinity"``, ``"-Infinity"`` spell the
    non-finite ones unless ``finite``)."""
    if isinstance(value, str) and value in _NONFINITE and not finite:
        return _NONFINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CorruptIndexError(f"{where}: expected a {'finite ' if finite else ''}number, "
                                f"got {value!r:.60}")
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        bits = value.bit_length() if isinstance(value, int) else "?"
        raise CorruptIndexError(f"{where}: a {bits}-bit integer is out of range") from None


def decode_time(value: object, where: str) -> float:
    """A commit time: a finite number of seconds since the epoch, within +-MAX_TIME."""
    when = decode_number(value, where, finite=True)
    if not -MAX_TIME <= when <= MAX_TIME:
        raise CorruptIndexError(f"{where}: {when!r} is not a plausible time")
    return when


def decode_count(value: object, where: str, *, optional: bool = False) -> Any:
    """An int from 0 to MAX_COUNT (None too when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        shown = f"a {value.bit_length()}-bit int" if isinstance(value, int) else f"{value!r:.60}"
        raise CorruptIndexError(f"{where}: expected an int from 0 to 2**63 - 1, got {shown}")
    return value


def text(check: Any, value: object, where: str) -> str:
    """Run a name check (``validate_name``-like: TypeError/ValueError) as an index check."""
    try:
        return check(value, where)
    except (TypeError, ValueError) as exc:
        raise CorruptIndexError(str(exc)) from None


def _name(value: object, where: str) -> str:
    return validate_name(value, where=where)


@dataclass(frozen=True)
class IndexEntry:
    """One committed checkpoint as the index records it."""

    name: str
    step: int
    epoch: int | None
    time: float
    size: int
    checksum: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    #: paths in the state where the caller passed numpy arrays (stored as tensors)
    numpy_paths: tuple[PathKey, ...] = ()
    #: exempt from retention (``save(..., keep=True)``)
    keep: bool = False
    #: the encryption mode of the stored bytes (never the key); None: a plain torch.save file
    encryption: str | None = None
    #: the series the entry belongs to (``CheckpointerConfig.series``); retention is per series
    series: str | None = None
    #: None: one torch.save file; ``"dcp"``: a multi-rank checkpoint, a directory in DCP's
    #: layout (then ``size`` is the total of its files and ``checksum`` its manifest's)
    kind: str | None = None
    #: ranks that wrote a multi-rank checkpoint
    world_size: int | None = None
    #: every file of a multi-rank checkpoint: (name inside the directory, size, checksum)
    files: tuple[tuple[str, int, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "step": self.step,
            "epoch": self.epoch,
            "time": self.time,
            "size": self.size,
            "checksum": self.checksum,
            "metrics": {k: encode_number(v) for k, v in self.metrics.items()},
            "numpy": [list(p) for p in self.numpy_paths],
            "keep": self.keep,
        }
        if self.encryption is not None:
            doc["encryption"] = self.encryption
        if self.series is not None:
            doc["series"] = self.series
        if self.kind is not None:
            doc["kind"] = self.kind
            doc["world_size"] = self.world_size
            doc["files"] = [list(f) for f in self.files]
        return doc

    @classmethod
    def from_json(cls, raw: object, where: str) -> IndexEntry:
        """Validate one entry of a parsed document.

        Raises:
            CorruptIndexError: a field is missing, of the wrong type or out of range.
        """
        if not isinstance(raw, dict):
            raise CorruptIndexError(f"{where}: expected an object, got {type(raw).__name__}")
        try:
            name, checksum, metrics = raw["name"], raw["checksum"], raw["metrics"]
            step, epoch, size, when = raw["step"], raw["epoch"], raw["size"], raw["time"]
        except KeyError as exc:
            raise CorruptIndexError(f"{where}: missing field {exc.args[0]!r}") from None
        numpy_paths, keep = raw.get("numpy", []), raw.get("keep", False)
        encryption, series = raw.get("encryption"), raw.get("series")
        kind, world_size, files = _directory_fields(raw, where)
        if not isinstance(checksum, str) or ":" not in checksum or len(checksum) > 200:
            raise CorruptIndexError(f"{where}.checksum: expected 'algo:hex', got {checksum!r:.60}")
        if not isinstance(metrics, dict):
            raise CorruptIndexError(f"{where}.metrics: expected an object of numbers")
        if not isinstance(numpy_paths, list) or not all(
            isinstance(p, list) and all(isinstance(k, (str, int)) for k in p) for p in numpy_paths
        ):
            raise CorruptIndexError(f"{where}.numpy: expected a list of key paths")
        if not isinstance(keep, bool):
            raise CorruptIndexError(f"{where}.keep: expected a bool, got {keep!r:.60}")
        if encryption is not None and encryption not in ENCRYPTION_MODES:
            raise CorruptIndexError(f"{where}.encryption: unknown mode {encryption!r:.60}")
        return cls(
            name=text(_name, name, f"{where}.name"),
            step=decode_count(step, f"{where}.step"),
            epoch=decode_count(epoch, f"{where}.epoch", optional=True),
            time=decode_time(when, f"{where}.time"),
            size=decode_count(size, f"{where}.size"),
            checksum=checksum,
            metrics={
                text(check_metric_key, k, f"{where}.metrics"):
                    decode_number(v, f"{where}.metrics[{k!r}]")
                for k, v in metrics.items()
            },
            numpy_paths=tuple(tuple(p) for p in numpy_paths),
            keep=keep,
            encryption=encryption,
            series=None if series is None else text(check_series, series, f"{where}.series"),
            kind=kind,
            world_size=world_size,
            files=files,
        )


#: kinds of entries besides single files
ENTRY_KINDS = frozenset({"dcp"})


def _member_name(value: object, where: str) -> str:
    """A file name inside a multi-rank checkpoint directory (``.metadata`` is one)."""
    if (not isinstance(value, str) or not value or value in (".", "..") or "/" in value
            or "\\" in value or len(value) > 255 or not value.isprintable()):
        raise CorruptIndexError(f"{where}: {value!r:.60} is not a file name")
    return value


def _directory_fields(
    raw: dict[str, Any], where: str
) -> tuple[str | None, int | None, tuple[tuple[str, int, str], ...]]:
    """``kind``, ``world_size`` and ``files`` of an entry (absent: a single file)."""
    kind = raw.get("kind")
    if kind is None:
        return None, None, ()
    if kind not in ENTRY_KINDS:
        raise CorruptIndexError(f"{where}.kind: unknown kind {kind!r:.60}")
    world_size = decode_count(raw.get("world_size"), f"{where}.world_size")
    if world_size < 1:
        raise CorruptIndexError(f"{where}.world_size: expected at least 1, got {world_size}")
    raw_files = raw.get("files")
    if not isinstance(raw_files, list) or not raw_files:
        raise CorruptIndexError(f"{where}.files: expected a non-empty list of [name, size, "
                                "checksum]")
    files = []
    for i, item in enumerate(raw_files):
        at = f"{where}.files[{i}]"
        if not isinstance(item, list) or len(item) != 3:
            raise CorruptIndexError(f"{at}: expected [name, size, checksum]")
        name, size, checksum = item
        if not isinstance(checksum, str) or ":" not in checksum or len(checksum) > 200:
            raise CorruptIndexError(f"{at}: expected a checksum 'algo:hex', got {checksum!r:.60}")
        files.append((_member_name(name, at), decode_count(size, at), checksum))
    if len({f[0] for f in files}) != len(files):
        raise CorruptIndexError(f"{where}.files: a file name appears twice")
    return kind, world_size, tuple(files)

