"""Structured projections: Monarch (Dao et al. 2022, "Monarch: Expressive Structured Matrices for
Efficient and Accurate Training") and block-diagonal.

``monarch`` projects W onto Monarch matrices in closed form (a rank-1 SVD per sub-block, Theorem 1 of
the paper); ``monarch_aw`` weights each sub-block's fit by its input block's activation second moment
(``||(W_aj - l r^T) C_j||`` with ``C_j C_j^T = H_jj``, the block-diagonal part of the Hessian), which is
still one rank-1 SVD per sub-block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from matpress.errors import quote
from matpress.formats import BlockDiagFormat, MonarchFormat
from matpress.formats.monarch import check_blocks
from matpress.methods.base import LayerStats, check_int, register_method
from matpress.methods.obs import damped, live_inputs


@dataclass(frozen=True)
class MonarchParams:
    """nblocks: input blocks b (divides in_features); out_blocks: output blocks q (divides
    out_features; default nblocks). Storage: ``q * in + b * out`` fp16 values. damping: for monarch_aw."""

    nblocks: int = 4
    out_blocks: Optional[int] = None
    damping: float = 0.01

    def __post_init__(self) -> None:
        check_int("nblocks", self.nblocks)
        check_int("out_blocks", self.out_blocks, null="as many as nblocks")
        if not self.damping >= 0:
            raise ValueError(f"damping must be non-negative, got {quote(self.damping)}")


@register_method("monarch", MonarchParams)
def monarch(weight: torch.Tensor, params: MonarchParams, stats: Optional[LayerStats] = None) -> MonarchFormat:
    """Monarch projection: closed-form rank-1 SVD of every sub-block."""
    return MonarchFormat.encode(weight, params.nblocks, params.out_blocks)


@register_method("monarch_aw", MonarchParams, needs_calibration=True)
def monarch_aw(weight: torch.Tensor, params: MonarchParams, stats: Optional[LayerStats] = None) -> MonarchFormat:
    """Activation-weighted Monarch projection (block-diagonal Hessian whitening per input block)."""
    check_blocks(params.nblocks, weight.shape[1], "monarch: nblocks")
    h, w = live_inputs(stats, weight)
    h = damped(h, params.damping)
    b, p = params.nblocks, weight.shape[1] // params.nblocks
    diagonal_blocks = h.reshape(b, p, b, p)[torch.arange(b), :, torch.arange(b)]  # (b, p, p)
    return MonarchFormat.encode(w, params.nblocks, params.out_blocks, torch.linalg.cholesky(diagonal_blocks))


@dataclass(frozen=True)
class BlockDiagParams:
    """nblocks: diagonal blocks (divides both dimensions)."""

    nblocks: int = 4

    def __post_init__(self) -> None:
        check_int("nblocks", self.nblocks)


@register_method("blockdiag", BlockDiagParams)
def blockdiag(weight: torch.Tensor, params: BlockDiagParams, stats: Optional[LayerStats] = None) -> BlockDiagFormat:
    """Block-diagonal projection: keep the diagonal blocks."""
    return BlockDiagFormat.encode(weight, nblocks=params.nblocks)
