"""Formats: how a weight matrix is stored and multiplied. See :class:`matpress.formats.base.Format`."""

from __future__ import annotations

from matpress.errors import FormatError, quote
from matpress.formats.base import Format
from matpress.formats.dense import DenseFormat
from matpress.formats.integer import IntFormat
from matpress.formats.composite import LowRankFormat, SumFormat
from matpress.formats.monarch import BlockDiagFormat, MonarchFormat
from matpress.formats.sparse import NMSparseFormat, SparseFormat
from matpress.formats.ternary import TernaryFormat
from matpress.formats.transformed import TransformedFormat

FORMATS: dict[str, type[Format]] = {
    cls.name: cls
    for cls in (
        DenseFormat, IntFormat, TernaryFormat, LowRankFormat, SumFormat, SparseFormat, NMSparseFormat,
        MonarchFormat, BlockDiagFormat, TransformedFormat,
    )
}


def register_format(cls: type[Format]) -> type[Format]:
    """Make a format class known to save/load under ``cls.name``."""
    if cls.name in FORMATS and FORMATS[cls.name] is not cls:
        raise FormatError(f"a different format is already registered as {cls.name!r}")
    FORMATS[cls.name] = cls
    return cls


def format_class(name: str) -> type[Format]:
    if not isinstance(name, str) or name not in FORMATS:
        raise FormatError(f"unknown format {quote(name)}; known formats: {sorted(FORMATS)}")
    return FORMATS[name]


__all__ = [
    "FORMATS", "BlockDiagFormat", "DenseFormat", "Format", "IntFormat", "LowRankFormat", "MonarchFormat",
    "NMSparseFormat", "SparseFormat", "SumFormat", "TernaryFormat", "TransformedFormat", "format_class",
    "register_format",
]
