"""Pruning: magnitude, Wanda and SparseGPT, unstructured or n:m, with fp16 or quantized kept values.

- ``magnitude``: drop the weights smallest in absolute value (whole layer, or within each group of m).
- ``wanda``: Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language
  Models"): score ``|W_ij| * ||X_j||``, compared within each output row (or group of m).
- ``sparsegpt``: SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be
  Accurately Pruned in One-Shot"): OBS updates of the remaining weights after each pruned column, in
  lazy blocks; the mask of each block is chosen from the error-updated weights by ``w^2 / [H^-1]_jj^2``.
  With ``value_bits`` < 16 the kept weights are quantized in the same pass (joint sparsification and
  quantization, Section 3.5 of the paper). Here each block's mask keeps the same number of weights in
  every row, so that a row's kept values in one block form one quantization group.

Kept values are stored as fp16 (``value_bits: 16``) or as int with ``value_bits`` bits and one
scale/zero per ``group_size`` input columns' worth of kept values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from matpress.errors import FormatError, quote
from matpress.formats import Format, IntFormat, NMSparseFormat, SparseFormat
from matpress.formats.composite import ChildSpec
from matpress.formats.integer import quantize_codes, rtn_parameters
from matpress.formats.sparse import check_nm, check_sparsity, magnitude_mask, nm_mask
from matpress.methods.base import LayerStats, check_int, register_method
from matpress.methods.gptq import inverse_hessian_factor
from matpress.methods.obs import live_inputs, obs_sweep

SparseResult = Union[SparseFormat, NMSparseFormat]


@dataclass(frozen=True)
class PruneParams:
    """sparsity: fraction of weights dropped (unstructured). nm: None for unstructured, or 'n:m' such as
    '2:4' (then ``sparsity`` is ignored: n of every m kept). value_bits: 16 keeps fp16 values, 2 to 8 quantizes the
    kept values. group_size: input columns whose kept values share one scale (and SparseGPT's lazy
    block). symmetric: symmetric quantization of the kept values."""

    sparsity: float = 0.5
    nm: Optional[str] = None
    value_bits: int = 16
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        if self.value_bits not in (16, *range(2, 9)):
            raise ValueError(f"value_bits must be 16 (fp16) or 2 to 8, got {quote(self.value_bits)}")
        check_int("group_size", self.group_size)
        nm = self.n_m()
        if nm is not None and self.group_size % nm[1]:
            raise ValueError(f"group_size={self.group_size} must be a multiple of m={nm[1]} for n:m sparsity")

    def n_m(self) -> Optional[tuple[int, int]]:
        """``(n, m)`` for n:m sparsity, None for unstructured."""
        if self.nm is None:
            return None
        try:
            n, m = (int(v) for v in self.nm.split(":"))
        except (ValueError, AttributeError):
            raise ValueError(f"nm must be null (unstructured) or 'n:m' such as '2:4', got {quote(self.nm)}") from None
        if not 1 <= n <= m:
            raise ValueError(f"nm={quote(self.nm)}: need 1 <= n <= m")
        return n, m

    @property
    def density(self) -> float:
        nm = self.n_m()
        return 1 - self.sparsity if nm is None else nm[0] / nm[1]

    def kept_per_group(self) -> int:
        """Kept values sharing one quantization scale."""
        return max(1, round(self.group_size * self.density))

    def value_spec(self) -> ChildSpec:
        if self.value_bits == 16:
            return {"format": "dense", "dtype": "fp16"}
        return {"format": "int", "bits": self.value_bits, "group_size": self.kept_per_group(), "symmetric": self.symmetric}


@dataclass(frozen=True)
class SparseGPTParams(PruneParams):
    """damping: added to the Hessian's diagonal, as a fraction of its mean."""

    damping: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damping < 1:
            raise ValueError(f"damping must be a fraction in (0, 1), got {quote(self.damping)}")


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the same number, ``round((1 - sparsity) * cols)`` (at least 1), of highest ``scores`` in
    every row."""
    keep = max(1, round((1 - sparsity) * scores.shape[1]))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, scores.topk(keep, dim=1).indices, True)
    return mask


def from_mask(
    weight: torch.Tensor, mask: torch.Tensor, params: PruneParams, values: Optional[Format] = None
) -> SparseResult:
    """The sparse format (unstructured or n:m, as ``params`` say) keeping ``weight[mask]``, its values
    encoded per ``params`` or given already built as ``values``."""
    nm = params.n_m()
    values = params.value_spec() if values is None else values
    if nm is None:
        return SparseFormat.from_mask(weight, mask, values)
    return NMSparseFormat.from_mask(weight, mask, nm[0], nm[1], values)


@register_method("magnitude", PruneParams)
def magnitude(weight: torch.Tensor, params: PruneParams, stats: Optional[LayerStats] = None) -> SparseResult:
    """Magnitude pruning: drop the smallest |w| of the layer (or of each group of m for n:m)."""
    nm = params.n_m()
    scores = weight.abs()
    mask = magnitude_mask(scores, params.sparsity) if nm is None else nm_mask(scores, *nm)
    return from_mask(weight, mask, params)


@register_method("wanda", PruneParams, needs_calibration=True)
def wanda(weight: torch.Tensor, params: PruneParams, stats: Optional[LayerStats] = None) -> SparseResult:
    """Wanda: prune by |W| times the input feature norm, compared per output row (or group of m)."""
    norms = torch.diagonal(stats.xtx).to(weight.device).float().clamp(min=0).sqrt()
    scores = weight.abs() * norms
    nm = params.n_m()
    mask = row_mask(scores, params.sparsity) if nm is None else nm_mask(scores, *nm)
    return from_mask(weight, mask, params)


@register_method("sparsegpt", SparseGPTParams, needs_calibration=True)
def sparsegpt(weight: torch.Tensor, params: SparseGPTParams, stats: Optional[LayerStats] = None) -> SparseResult:
    """SparseGPT: OBS-updated pruning in lazy blocks, optionally quantizing the kept weights in the same pass."""
    h, w = live_inputs(stats, weight)
    out_f, in_f = w.shape
    nm = params.n_m()
    if nm is not None:
        check_nm(*nm, in_f)
    quantize = params.value_bits != 16
    if quantize and nm is None and in_f % params.group_size:
        raise FormatError(
            f"sparsegpt with quantized values needs in_features={in_f} to be a multiple of group_size="
            f"{params.group_size}; pick a group_size dividing it"
        )
    hinv = inverse_hessian_factor(h, params.damping)
    mask = torch.zeros_like(w, dtype=torch.bool)
    n_blocks = -(-in_f // params.group_size)
    scales = torch.ones(out_f, n_blocks, device=w.device)
    zeros = torch.zeros(out_f, n_blocks, device=w.device)
    codes = torch.zeros(out_f, in_f, device=w.device)

    def start_block(i1: int, i2: int, w1: torch.Tensor, hinv1: torch.Tensor) -> None:
        # OBS saliency of dropping each weight of the block given the updates so far
        scores = w1.square() / torch.diagonal(hinv1).square()
        block_mask = row_mask(scores, params.sparsity) if nm is None else nm_mask(scores, *nm)
        mask[:, i1:i2] = block_mask
        if quantize:
            kept = w1[block_mask].view(out_f, -1)
            scale, zero = rtn_parameters(kept, params.value_bits, params.symmetric)
            scales[:, i1 // params.group_size] = scale
            zeros[:, i1 // params.group_size] = zero

    def round_column(j: int, col: torch.Tensor) -> torch.Tensor:
        keep = mask[:, j]
        if not quantize:
            return torch.where(keep, col, torch.zeros_like(col))
        g = j // params.group_size
        q = quantize_codes(col, scales[:, g], zeros[:, g], params.value_bits)
        codes[:, j] = q
        return torch.where(keep, (q - zeros[:, g]) * scales[:, g], torch.zeros_like(col))

    pruned = obs_sweep(w, hinv, round_column, start_block, blocksize=params.group_size)
    if not quantize:
        return from_mask(pruned, mask, params)
    kept = params.kept_per_group()
    rows = 1 if nm is None else out_f  # unstructured values are one (1, nnz) row
    values = IntFormat.from_codes(
        codes[mask].view(rows, -1), scales.view(rows, -1), zeros.view(rows, -1), params.value_bits, kept, params.symmetric
    )
    return from_mask(pruned, mask, params, values)
