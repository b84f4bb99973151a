"""The format registry: format name -> class, for save/load and for composite formats' children.

It imports no format module, so every format (composites included) can look its children up here
without a cycle; :mod:`matpress.formats` registers the built-in formats when it is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from matpress.errors import FormatError, quote

if TYPE_CHECKING:
    from matpress.formats.base import Format

FORMATS: dict[str, type["Format"]] = {}


def register_format(cls: type["Format"]) -> type["Format"]:
    """Make a format class known to save/load under ``cls.name``."""
    if cls.name in FORMATS and FORMATS[cls.name] is not cls:
        raise FormatError(f"a different format is already registered as {cls.name!r}")
    FORMATS[cls.name] = cls
    return cls


def format_class(name: str) -> type["Format"]:
    if not isinstance(name, str) or name not in FORMATS:
        raise FormatError(f"unknown format {quote(name)}; known formats: {sorted(FORMATS)}")
    return FORMATS[name]
