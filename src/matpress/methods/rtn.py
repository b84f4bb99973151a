"""Round-to-nearest: the calibration-free baseline for integer quantization, and dense passthrough."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch

from matpress.errors import quote
from matpress.formats import DenseFormat, IntFormat, KQuantFormat
from matpress.formats.dense import DTYPES
from matpress.formats.kquant import KQUANTS, SUPER, kquant_fallback
from matpress.methods.base import LayerStats, check_flag, check_int, register_method


@dataclass(frozen=True)
class IntParams:
    """Parameters of the ``int`` format shared by every integer quantization method.

    bits: 2 to 8. group_size: input columns sharing one scale, or None for one scale per output
    channel. symmetric: fixed zero point (no zeros stored) instead of a per-group one. kquant: one of
    q2_k .. q6_k, for the codes on the exact grid of that GGUF K-quant (the ``kquant`` format; bits,
    group_size and symmetric are then unused), or on the legacy grid llama.cpp falls back to for rows
    that are not a multiple of 256 long (:meth:`for_width`); rtn and gptq produce them.
    """

    bits: int = 4
    group_size: Optional[int] = 128
    symmetric: bool = False
    kquant: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer from 2 to 8, got {quote(self.bits)}")
        check_int("group_size", self.group_size, null="per channel")
        check_flag("symmetric", self.symmetric)
        if self.kquant is not None and self.kquant not in KQUANTS:
            raise ValueError(f"kquant must be one of {sorted(KQUANTS)} or null, got {quote(self.kquant)}")

    def for_width(self, in_features: int) -> "IntParams":
        """These parameters for a layer with ``in_features`` inputs: with ``kquant`` on rows no K-quant
        holds (not a multiple of 256), the legacy grid llama.cpp falls back to, in groups of 32."""
        if self.kquant is None or in_features % SUPER == 0:
            return self
        bits, group_size, symmetric = kquant_fallback(self.kquant, in_features)
        return dataclasses.replace(self, bits=bits, group_size=group_size, symmetric=symmetric, kquant=None)


def refuse_kquant(params: IntParams, method: str) -> None:
    """For the integer methods that do not produce K-quant grids: a clear refusal of ``kquant``."""
    if params.kquant is not None:
        raise ValueError(f"kquant (codes on a GGUF K-quant grid) is produced by rtn and gptq, not by {method}; use one of them")


@dataclass(frozen=True)
class DenseParams:
    """dtype: fp32, fp16 or bf16."""

    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {quote(self.dtype)}")


@register_method("rtn", IntParams)
def rtn(weight: torch.Tensor, params: IntParams, stats: Optional[LayerStats] = None) -> Union[IntFormat, KQuantFormat]:
    """Round-to-nearest integer quantization with per-group min-max scales (or a K-quant's fitted grid)."""
    params = params.for_width(weight.shape[1])
    if params.kquant is not None:
        return KQuantFormat.encode(weight, params.kquant)
    return IntFormat.encode(weight, bits=params.bits, group_size=params.group_size, symmetric=params.symmetric)


@register_method("dense", DenseParams)
def dense(weight: torch.Tensor, params: DenseParams, stats: Optional[LayerStats] = None) -> DenseFormat:
    """Keep the weight dense (optionally cast to fp16 or bf16)."""
    return DenseFormat.encode(weight, dtype=params.dtype)
