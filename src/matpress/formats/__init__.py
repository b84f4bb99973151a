"""Formats: how a weight matrix is stored and multiplied. See :class:`matpress.formats.base.Format`."""

from __future__ import annotations

from matpress.formats.base import Format
from matpress.formats.codebook import CodebookFormat
from matpress.formats.dense import DenseFormat
from matpress.formats.integer import IntFormat
from matpress.formats.kquant import KQuantFormat
from matpress.formats.composite import LowRankFormat, SumFormat
from matpress.formats.monarch import BlockDiagFormat, MonarchFormat
from matpress.formats.sparse import NMSparseFormat, SparseFormat
from matpress.formats.ternary import TernaryFormat
from matpress.formats.transformed import TransformedFormat
from matpress.formats.vq import VQFormat
from matpress.formats.registry import FORMATS, format_class, register_format

for cls in (
    DenseFormat, IntFormat, KQuantFormat, CodebookFormat, TernaryFormat, LowRankFormat, SumFormat, SparseFormat, NMSparseFormat,
    MonarchFormat, BlockDiagFormat, TransformedFormat, VQFormat,
):
    register_format(cls)


__all__ = [
    "FORMATS", "BlockDiagFormat", "CodebookFormat", "DenseFormat", "Format", "IntFormat", "KQuantFormat", "LowRankFormat", "MonarchFormat",
    "NMSparseFormat", "SparseFormat", "SumFormat", "TernaryFormat", "TransformedFormat", "VQFormat", "format_class",
    "register_format",
]
