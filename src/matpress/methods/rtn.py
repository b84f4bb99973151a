"""Round-to-nearest: the calibration-free baseline for integer quantization, and dense passthrough."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from matpress.errors import quote
from matpress.formats import DenseFormat, IntFormat
from matpress.formats.dense import DTYPES
from matpress.methods.base import LayerStats, check_flag, check_int, register_method


@dataclass(frozen=True)
class IntParams:
    """Parameters of the ``int`` format shared by every integer quantization method.

    bits: 2 to 8. group_size: input columns sharing one scale, or None for one scale per output
    channel. symmetric: fixed zero point (no zeros stored) instead of a per-group one.
    """

    bits: int = 4
    group_size: Optional[int] = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer from 2 to 8, got {quote(self.bits)}")
        check_int("group_size", self.group_size, null="per channel")
        check_flag("symmetric", self.symmetric)


@dataclass(frozen=True)
class DenseParams:
    """dtype: fp32, fp16 or bf16."""

    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {quote(self.dtype)}")


@register_method("rtn", IntParams)
def rtn(weight: torch.Tensor, params: IntParams, stats: Optional[LayerStats] = None) -> IntFormat:
    """Round-to-nearest integer quantization with per-group min-max scales."""
    return IntFormat.encode(weight, bits=params.bits, group_size=params.group_size, symmetric=params.symmetric)


@register_method("dense", DenseParams)
def dense(weight: torch.Tensor, params: DenseParams, stats: Optional[LayerStats] = None) -> DenseFormat:
    """Keep the weight dense (optionally cast to fp16 or bf16)."""
    return DenseFormat.encode(weight, dtype=params.dtype)
