"""File names inside a checkpoint folder: reserved names, validation, and filename templates."""

from __future__ import annotations

import string
import unicodedata

__all__ = [
    "INDEX_NAME",
    "LAST_CHECKPOINT_NAME",
    "LOCK_NAME",
    "RESERVED_NAMES",
    "TMP_PREFIX",
    "FilenameTemplate",
    "check_series",
    "unsafe_character",
    "validate_name",
]

#: The index document: entries, latest/best pointers and rotation state (see ``_index``).
INDEX_NAME = "asyncckpt-index.json"
#: mmengine's pointer file: one line, the path/URI of the latest checkpoint.
LAST_CHECKPOINT_NAME = "last_checkpoint"
#: Held (flock) by the one writer a local folder may have at a time.
LOCK_NAME = ".asyncckpt.lock"
#: Prefix of in-flight temporary files; anything with it is a leftover once no writer runs.
TMP_PREFIX = ".asyncckpt-tmp."

RESERVED_NAMES = frozenset({INDEX_NAME, LAST_CHECKPOINT_NAME, LOCK_NAME})
_MAX_NAME_BYTES = 255  # NAME_MAX on Linux / macOS; S3 keys allow more, folders do not
_FIELDS = frozenset({"step", "epoch"})
#: Bidirectional embeddings, overrides and isolates: they reorder what a terminal shows, so a
#: name could display as another one (U+202A-U+202E, U+2066-U+2069).
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def unsafe_character(text: str) -> str | None:
    """Why ``text`` cannot be a name asyncckpt stores and prints, or None when it can.

    Refused: control characters (C0, DEL, C1: they drive terminals), line and paragraph
    separators, bidirectional overrides and isolates, and lone surrogates (not encodable as
    UTF-8, so no file system or JSON reader takes them back).
    """
    for ch in text:
        category = unicodedata.category(ch)
        if category == "Cc":
            return f"it contains a control character (U+{ord(ch):04X}: NUL, newline, escape, ...)"
        if category == "Cs":
            return f"it contains a lone surrogate (U+{ord(ch):04X}), which is not valid UTF-8"
        if ch in _BIDI_CONTROLS:
            return f"it contains a bidirectional override (U+{ord(ch):04X})"
        if category in ("Zl", "Zp"):
            return f"it contains a line separator (U+{ord(ch):04X})"
    return None


def validate_name(name: object, *, where: str) -> str:
    """Check that ``name`` is a safe file name inside a checkpoint folder and return it.

    A safe name is a single path component: no separators, not ``.``/``..``, not hidden (leading
    ``.`` is reserved for asyncckpt's own files), no control characters, bidirectional overrides
    or lone surrogates (:func:`unsafe_character`), at most 255 UTF-8 bytes and not one of the
    folder's reserved names.

    Args:
        name: the candidate name.
        where: what produced it, for the error message (e.g. ``"filename template 'x/{step}'"``).

    Raises:
        TypeError: ``name`` is not a ``str``.
        ValueError: it is not a safe name.
    """
    if not isinstance(name, str):
        raise TypeError(f"{where}: a checkpoint name must be a str, got {type(name).__name__}")
    problem = unsafe_character(name) if name else "it is empty"
    if problem is not None:
        pass  # (checked first: the checks below encode the name)
    elif "/" in name or "\\" in name:
        problem = "it contains a path separator, so it could escape the checkpoint folder"
    elif name in (".", ".."):
        problem = "it names a directory, not a file"
    elif name.startswith("."):
        problem = "names starting with '.' are reserved for temporary files"
    elif len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        problem = f"it is longer than {_MAX_NAME_BYTES} bytes"
    elif name in RESERVED_NAMES:
        problem = "asyncckpt uses that name for its own bookkeeping"
    if problem is not None:
        raise ValueError(f"{where}: invalid checkpoint name {name!r}: {problem}")
    return name


class FilenameTemplate:
    """A ``str.format`` template for checkpoint names with the fields ``{step}`` and ``{epoch}``.

    Format specs are allowed (``"step_{step:08d}.pt"``); conversions, attribute access, indexing
    and other field names are not. The template must use at least one field so that different
    saves get different names; whether two saves still collide (a template with only ``{epoch}``)
    is checked per save by the checkpointer.

    Raises:
        TypeError: ``template`` is not a ``str``.
        ValueError: the template is malformed, uses unknown fields, or renders an unsafe name.
    """

    def __init__(self, template: str) -> None:
        if not isinstance(template, str):
            raise TypeError(f"filename must be a str template, got {type(template).__name__}")
        where = f"filename template {template!r}"
        try:
            parts = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ValueError(f"{where} is malformed: {exc}") from None
        fields: set[str] = set()
        for _literal, field, spec, conversion in parts:
            if field is None:
                continue
            if field not in _FIELDS:
                raise ValueError(
                    f"{where} uses the field {{{field}}}; only {{step}} and {{epoch}} are allowed"
                )
            if conversion is not None:
                raise ValueError(f"{where}: conversions such as !{conversion} are not allowed")
            if spec and ("{" in spec or "}" in spec):
                raise ValueError(f"{where}: nested fields in format specs are not allowed")
            fields.add(field)
        if not fields:
            raise ValueError(
                f"{where} has no {{step}} or {{epoch}} field, so every save would get the same name"
            )
        self.template = template
        self.uses_step = "step" in fields
        self.uses_epoch = "epoch" in fields
        # Render once now so a bad format spec or a literal '/' fails at construction, not mid-run.
        self.render(0, 0 if self.uses_epoch else None)

    def render(self, step: int, epoch: int | None) -> str:
        """Return the (validated) name for ``step``/``epoch``.

        Raises:
            ValueError: the template needs ``{epoch}`` but ``epoch`` is None, or the name is
                unsafe.
        """
        if self.uses_epoch and epoch is None:
            raise ValueError(
                f"filename template {self.template!r} uses {{epoch}}, so save() needs epoch="
            )
        try:
            name = self.template.format(step=step, epoch=epoch)
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"filename template {self.template!r} cannot format step={step!r}, "
                f"epoch={epoch!r}: {exc}"
            ) from None
        return validate_name(name, where=f"filename template {self.template!r}")

    def __repr__(self) -> str:
        return f"FilenameTemplate({self.template!r})"


def check_series(series: object, where: str) -> str:
    """Validate a series name (a non-empty str of printable characters, at most 200)."""
    if not isinstance(series, str):
        raise TypeError(f"{where} must be a str, got {type(series).__name__}")
    if not series or len(series) > 200:
        raise ValueError(f"{where} must be 1 to 200 characters, got {series!r:.60}")
    problem = unsafe_character(series)
    if problem is not None:
        raise ValueError(f"{where} {series!r}: {problem}")
    return series
