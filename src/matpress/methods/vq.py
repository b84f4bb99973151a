"""Vector quantization onto a learned codebook (:class:`~matpress.formats.VQFormat`: codes indexing
vectors of ``dim`` weights, fp16 scales per row or group).

- ``vq``: round-to-nearest vector: the codebook learned by k-means weighted by the Hessian diagonal
  (AQLM, Egiazarian et al. 2024, https://arxiv.org/abs/2401.06118, and SqueezeLLM weight their
  objectives by the inputs' statistics), each vector of ``dim`` weights its nearest codeword under
  that weighting (:func:`matpress.formats.vq.learn_codebook`).
- ``gptq_vq``: GPTQ's error feedback over blocks of ``dim`` columns (the vector form of Frantar et al.
  2022; QuIP#'s BlockLDLQ, Tseng et al. 2024, https://arxiv.org/abs/2402.04396). With
  ``H^-1 = U^T U`` (upper Cholesky factor, :func:`matpress.methods.gptq.inverse_hessian_factor`), each
  row takes for the block of columns ``S`` the codeword minimising ``||(w_S - q_S) U_SS^-1||**2``
  (the codebook transformed once per block), and the later columns ``R`` absorb the error by
  ``W_R -= (W_S - Q_S) U_SS^-1 U_SR``. The OBS column sweep (:func:`matpress.methods.obs.obs_sweep`)
  applies exactly that update when the block's values are fixed at its first column: its steps
  ``e_j = (w_j - q_j - sum_{i<j} e_i U_ij) / U_jj`` solve ``e U_SS = W_S - Q_S``. No act-order (the
  blocks are consecutive columns); ``refit_steps`` then re-fits the codebook to the codes by least
  squares on the output error (AQLM alternates such codebook updates with its code search); ``rotate`` (randomized Hadamard incoherence processing, as for
  ``gptq``) is what makes 2-bit vectors work: rotated weights are nearly Gaussian in every block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from matpress.errors import quote
from matpress.formats import Format, VQFormat
from matpress.formats.base import check_weight
from matpress.formats.integer import resolve_group_size
from matpress.formats.ternary import expand_groups
from matpress.formats.transformed import make_transform, quantize_transformed
from matpress.formats.vq import BITS, DIMS, check_vq, learn_codebook, nearest_vectors, rms_scales, scaled_vectors
from matpress.methods.base import LayerStats, check_flag, check_int, register_method
from matpress.methods.gptq import GPTQParams, inverse_hessian_factor
from matpress.methods.obs import live_inputs, obs_sweep, output_error


@dataclass(frozen=True)
class VQParams:
    """bits: bits per code, 2 to 8 (a codebook of 2**bits vectors). dim: weights per code, 2 to 8
    (bits / dim bits per weight: 8 and 4 give 2). group_size: input columns sharing one scale (a
    multiple of dim), or None for one per output row. iterations: k-means rounds of the codebook.
    rotate: randomized Hadamard rotation of the inputs first, signs from ``seed``."""

    bits: int = 8
    dim: int = 4
    group_size: Optional[int] = None
    iterations: int = 10
    rotate: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(f"bits (per code) must be an integer from 2 to 8 for vq, got {quote(self.bits)}")
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim not in DIMS:
            raise ValueError(f"dim (weights per code) must be an integer from 2 to 8 for vq, got {quote(self.dim)}")
        check_int("group_size", self.group_size, null="one scale per row")
        if self.group_size is not None and self.group_size % self.dim:
            raise ValueError(f"group_size must be a multiple of dim={self.dim}, got {self.group_size}")
        check_int("iterations", self.iterations, minimum=0)
        check_flag("rotate", self.rotate)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {quote(self.seed)}")


@dataclass(frozen=True)
class GPTQVQParams(VQParams):
    """VQ parameters plus GPTQ's percdamp and block_size (a multiple of dim; see ``gptq``), and
    refit_steps: conjugate-gradient steps re-fitting the codebook to the sweep's codes under the
    layer's output error (:func:`refit_codebook`; 0: none)."""

    percdamp: float = 0.01
    block_size: int = 128
    refit_steps: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("refit_steps", self.refit_steps, minimum=0)
        GPTQParams(percdamp=self.percdamp, block_size=self.block_size)  # the checks gptq makes of them
        if self.block_size % self.dim:
            raise ValueError(f"block_size must be a multiple of dim={self.dim}, got {self.block_size}")


def vq_quantize(weight: torch.Tensor, hessian: torch.Tensor, params: VQParams) -> VQFormat:
    """Round-to-nearest vectors on a codebook learned with the Hessian diagonal as the importance."""
    importance = hessian.diagonal().float().clamp(min=0)
    return VQFormat.encode(weight, params.bits, params.dim, params.group_size, params.iterations, importance, params.seed)


def gptq_vq_quantize(weight: torch.Tensor, hessian: torch.Tensor, params: GPTQVQParams) -> VQFormat:
    """GPTQ over blocks of ``dim`` columns (see the module docstring) onto the codebook ``vq`` learns:
    the scales (RMS per row or group) and the codebook from the weight before the sweep."""
    check_vq(params.bits, params.dim, params.group_size, weight.shape[1])
    out_f, n = weight.shape
    dim = params.dim
    group = resolve_group_size(params.group_size, n)
    scales = rms_scales(weight, group)
    vectors, weights = scaled_vectors(weight, scales, group, hessian.diagonal().float().clamp(min=0), dim)
    codebook, _ = learn_codebook(vectors, params.bits, weights, params.iterations, params.seed)
    s = expand_groups(scales, group, n)
    hinv = inverse_hessian_factor(hessian, params.percdamp)
    codes = torch.empty(out_f, n // dim, dtype=torch.int64)
    chosen = torch.empty(out_f, dim)
    eye = torch.eye(dim)

    def start_column(j: int, current: torch.Tensor) -> None:
        if j % dim:
            return
        cols = slice(j, j + dim)
        # ||(w - s c) T||^2 = s^2 ||(w / s) T - c T||^2 with T = U_SS^-1; a block shares one scale per row
        t = torch.linalg.solve_triangular(hinv[cols, cols], eye, upper=True)
        row_scale = s[:, j : j + 1]
        codes[:, j // dim] = nearest_vectors((current[:, cols] / row_scale) @ t, codebook @ t)
        chosen.copy_(codebook[codes[:, j // dim]] * row_scale)

    def round_column(j: int, col: torch.Tensor) -> torch.Tensor:
        return chosen[:, j % dim]

    obs_sweep(weight, hinv, round_column, blocksize=params.block_size, start_column=start_column)
    if params.refit_steps:
        codebook = refit_codebook(weight, hessian, codes, s, codebook, params.refit_steps)
    return VQFormat.from_codes(codes, scales, codebook, params.group_size)


def refit_codebook(
    weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, codebook: torch.Tensor, steps: int
) -> torch.Tensor:
    """The codebook ``(K, dim)`` minimising the output error ``tr((W - Q) H (W - Q)^T)`` for fixed
    ``codes`` ``(out, in / dim)`` and scales ``s`` ``(out, in)``, ``Q = s * codebook[codes]``: a linear
    least-squares problem in the codebook, solved by ``steps`` conjugate-gradient steps from
    ``codebook`` (the normal equations ``A c = b`` with ``A c`` the codeword sums of ``s (Q(c) H)``
    and ``b`` those of ``s (W H)``; codewords no vector uses keep their value). Rounded to fp16 and
    kept only if that lowers the error as stored, so never worse than ``codebook``."""
    out_f, n = weight.shape
    index = codes.reshape(-1)

    def decoded(c: torch.Tensor) -> torch.Tensor:
        return c[codes].reshape(out_f, n) * s

    def codeword_sums(m: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(codebook).index_add_(0, index, (m * s).reshape(-1, codebook.shape[1]))

    x = codebook.clone()
    r = codeword_sums((weight - decoded(x)) @ hessian)
    p, rs = r.clone(), float((r * r).sum())
    for _ in range(steps):
        if rs == 0:
            break
        ap = codeword_sums(decoded(p) @ hessian)
        alpha = rs / float((p * ap).sum())
        x += alpha * p
        r -= alpha * ap
        rs, previous = float((r * r).sum()), rs
        p = r + (rs / previous) * p
    fitted = x.half().float()
    if not bool(torch.isfinite(fitted).all()):
        return codebook
    before = output_error(weight, decoded(codebook), hessian)
    return fitted if output_error(weight, decoded(fitted), hessian) < before else codebook


def _calibrated(
    weight: torch.Tensor, params: VQParams, stats: Optional[LayerStats],
    quantize: Callable[[torch.Tensor, torch.Tensor, VQParams], VQFormat],
) -> Format:
    """``quantize`` on the live inputs, after the rotation when ``params.rotate``."""
    h, w = live_inputs(stats, check_weight(weight))
    check_vq(params.bits, params.dim, params.group_size, w.shape[1])
    transform = make_transform(w.shape[1], True, params.seed, None) if params.rotate else None
    return quantize_transformed(w, h, transform, lambda w_t, h_t: quantize(w_t, h_t, params))


@register_method("vq", VQParams, needs_calibration=True)
def vq(weight: torch.Tensor, params: VQParams, stats: Optional[LayerStats] = None) -> Format:
    """Vector quantization, round-to-nearest on a codebook learned by Hessian-weighted k-means."""
    return _calibrated(weight, params, stats, vq_quantize)


@register_method("gptq_vq", GPTQVQParams, needs_calibration=True)
def gptq_vq(weight: torch.Tensor, params: GPTQVQParams, stats: Optional[LayerStats] = None) -> Format:
    """Vector quantization with GPTQ error feedback over blocks of dim columns, optional rotation."""
    return _calibrated(weight, params, stats, gptq_vq_quantize)
