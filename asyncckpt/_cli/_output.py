"""What the commands print: escaping of untrusted text, tables, sizes, progress bars.

Names, metric keys, paths and error messages come from folders the user may not control. Every
one of them goes through :func:`safe` before it reaches the terminal, so a folder cannot send
escape sequences (retitle the terminal, move the cursor, erase lines) or reorder what is shown
with bidirectional overrides (U+202E) to fake output.
"""

from __future__ import annotations

import argparse
import math
import sys
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = [
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "EXIT_USAGE",
    "fail",
    "options_usable",
    "format_number",
    "human_size",
    "progress",
    "safe",
    "storage_option",
    "table",
]

EXIT_OK = 0
#: problems found (verify), or the command could not complete on its input
EXIT_PROBLEMS = 1
#: usage errors, and an input that is not a checkpoint folder / file at all
EXIT_USAGE = 2

# Categories printed escaped: controls (C0, DEL, C1 incl. the 8-bit CSI), format characters
# (bidi embeddings/overrides/isolates, zero-width characters, BOM), lone surrogates, and the
# line/paragraph separators some terminals treat as newlines.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def safe(text: object, *, backslash: bool = True) -> str:
    """``text`` with control, format (bidi) and separator characters written as escapes.

    Args:
        text: anything; non-strings are converted with ``str``.
        backslash: also double backslashes, so an escape in the output always stands for an
            escaped character, never for a name that spells one (names, keys). Messages that
            already contain ``repr`` escapes pass ``False``.
    """
    s = str(text)
    out = []
    for ch in s:
        if ch == "\\" and backslash:
            out.append("\\\\")
        elif unicodedata.category(ch) in _ESCAPED_CATEGORIES:
            out.append(_escape(ch))
        else:
            out.append(ch)
    return "".join(out)


def fail(command: str, exc: BaseException | str) -> None:
    """Print ``asyncckpt COMMAND: message`` on stderr, escaped."""
    print(f"asyncckpt {command}: {safe(exc, backslash=False)}", file=sys.stderr)


def human_size(nbytes: int) -> str:
    """``1536`` -> ``"1.5 KiB"`` (bytes below 1 KiB are written exactly)."""
    if nbytes < 1024:
        return f"{nbytes} B"
    value = float(nbytes)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def format_number(value: object) -> str:
    """A metric value in short form (``0.25``, ``nan``, a huge int written in full)."""
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) if abs(value) < 10**16 else f"{value:.3e}"
    return safe(value)


def table(rows: Sequence[Sequence[str]], header: Sequence[str] | None, out: TextIO) -> None:
    """Print aligned columns (cells must already be escaped)."""
    all_rows = ([list(header)] if header else []) + [list(r) for r in rows]
    if not all_rows:
        return
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]))]
    for row in all_rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip(), file=out)


def progress_enabled() -> bool:
    """Progress bars are drawn only for a person watching: when stderr is a terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


@contextmanager
def progress(total: int | None, desc: str, unit: str = "B") -> Iterator[Any]:
    """A tqdm bar on stderr when it is a terminal (and tqdm is installed: the ``demo`` extra);
    otherwise a bar that draws nothing."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield _NoBar()
        return
    bar = tqdm(
        total=total,
        desc=safe(desc),
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024,
        file=sys.stderr,
        disable=not progress_enabled(),
        leave=False,
        dynamic_ncols=True,
    )
    try:
        yield bar
    finally:
        bar.close()


class _NoBar:
    """Stands in for a progress bar when tqdm is not installed."""

    def update(self, n: float = 1) -> None:
        pass

    def close(self) -> None:
        pass


def storage_option(text: str) -> tuple[str, str]:
    """Parse one ``--storage-option KEY=VALUE`` (argparse ``type=``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def options_usable(command: str, location: str, options: dict[str, str]) -> bool:
    """Whether the backend for ``location`` accepts ``options`` (else print why: a usage error)."""
    from ..storage import storage_for

    try:
        storage_for(location, storage_options=options)
    except (TypeError, ValueError, ImportError) as exc:
        fail(command, f"{location}: {exc}")
        return False
    return True


def add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-option", action="append", default=[], type=storage_option,
        metavar="KEY=VALUE",
        help="backend option, e.g. endpoint_url=http://localhost:9000 for S3 (repeatable; "
             "values are strings)",
    )
