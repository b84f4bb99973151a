"""Low-rank methods: truncated SVD, activation-aware SVD (SVD-LLM) and EoRA compensation of a quantized
weight.

- ``svd``: the best rank-r approximation of W (Eckart & Young 1936).
- ``svd_llm``: SVD-LLM (Wang et al. 2024, "SVD-LLM: Truncation-aware Singular Value Decomposition for
  Large Language Model Compression"): whiten by the Cholesky factor S of ``X^T X`` (``H = S S^T``),
  truncate the SVD of ``W S``, and map back, which minimises the layer-output error
  ``||(W - W') S||`` rather than ``||W - W'||``.
- ``eora``: EoRA (Liu et al. 2024, "EoRA: Training-free Compensation for Compressed LLM with
  Eigenspace Low-Rank Approximation"): quantize W, then approximate the residual ``W - Q`` at low rank
  in the eigenspace of ``X^T X`` (project onto ``Q_e Λ^{1/2}``, truncate, project back); the result is
  a ``sum`` of the int format and a low-rank format.

The rank is given directly, by the fraction of (whitened) spectral energy to keep, or by a budget in
bits per weight for the low-rank factors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from matpress.errors import CalibrationError, FormatError, quote
from matpress.formats import Format, LowRankFormat, SumFormat
from matpress.formats.composite import ChildSpec, balanced_factors, check_rank, encode_child
from matpress.methods.base import LayerStats, check_int, get_method, register_method
from matpress.methods.obs import damped, live_inputs
from matpress.methods.rtn import IntParams


def factor_spec(factor_bits: int) -> ChildSpec:
    """Child format of the low-rank factors: 16 -> dense fp16, 2..8 -> int with 128-column groups."""
    return {"format": "dense", "dtype": "fp16"} if factor_bits == 16 else {"format": "int", "bits": factor_bits}


@dataclass(frozen=True)
class RankParams:
    """How the rank is chosen (exactly one): ``rank``; ``energy``, the fraction of the squared (whitened)
    singular values to keep; or ``rank_bits``, the bits per weight the factors may take.
    ``factor_bits``: 16 stores the factors in fp16, 2 to 8 as int with 128-column groups."""

    rank: Optional[int] = None
    energy: Optional[float] = None
    rank_bits: Optional[float] = None
    factor_bits: int = 16

    def __post_init__(self) -> None:
        given = [k for k in ("rank", "energy", "rank_bits") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of rank, energy or rank_bits, got {given or 'none'}")
        check_int("rank", self.rank, null="rank from energy or rank_bits")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"energy must be a fraction in (0, 1], got {quote(self.energy)}")
        if self.rank_bits is not None and not self.rank_bits > 0:
            raise ValueError(f"rank_bits must be positive, got {quote(self.rank_bits)}")
        if self.factor_bits not in (16, *range(2, 9)):
            raise ValueError(f"factor_bits must be 16 (fp16) or 2 to 8, got {quote(self.factor_bits)}")

    @property
    def size_follows_data(self) -> bool:
        """Whether the stored size depends on the weight and statistics (a rank kept by energy), not on
        the shape alone: a budget keeps such a candidate's measured format, as a re-encoding on other
        inputs could come out larger than the size it was allocated."""
        return self.energy is not None


@dataclass(frozen=True)
class WhitenedRankParams(RankParams):
    """damping: added to the Hessian's diagonal, as a fraction of its mean, before factorising it."""

    damping: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.damping >= 0:
            raise ValueError(f"damping must be non-negative, got {quote(self.damping)}")


def factor_nbytes(shape: tuple[int, int], rank: int, spec: ChildSpec) -> int:
    """Exact bytes of rank-``rank`` factors of a ``shape`` matrix stored as ``spec``."""
    return (
        encode_child(torch.zeros(shape[0], rank), spec, "lowrank").nbytes
        + encode_child(torch.zeros(rank, shape[1]), spec, "lowrank").nbytes
    )


def choose_rank(singular_values: torch.Tensor, shape: tuple[int, int], params: RankParams) -> int:
    """The rank ``params`` asks for, given the (whitened) singular values."""
    full = min(shape)
    if params.rank is not None:
        return check_rank(params.rank, shape)
    if params.energy is not None:
        energy = singular_values.square().cumsum(0)
        return min(full, int((energy < params.energy * energy[-1]).sum()) + 1)
    budget = params.rank_bits * shape[0] * shape[1] / 8
    spec = factor_spec(params.factor_bits)
    lo, hi = 0, full  # the largest rank whose factors fit the budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if factor_nbytes(shape, mid, spec) <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        raise FormatError(f"rank_bits={params.rank_bits} is too small for even rank 1 on a {shape} weight")
    return lo


def whitened_lowrank(
    weight: torch.Tensor,
    params: RankParams,
    root: Optional[torch.Tensor] = None,
    root_inverse: Optional[torch.Tensor] = None,
) -> LowRankFormat:
    """Truncate the SVD of ``W root`` and map back by ``root_inverse``: minimises ``||(W - U V) root||``
    (plain truncated SVD without a root). The singular values are split evenly between the factors
    (``sqrt(S)`` each) to balance their ranges."""
    u, s, vh = torch.linalg.svd(weight if root is None else weight @ root, full_matrices=False)
    left, right = balanced_factors(u, s, vh, choose_rank(s, tuple(weight.shape), params))
    return LowRankFormat.from_factors(
        left, right if root_inverse is None else right @ root_inverse, factor_spec(params.factor_bits)
    )


@register_method("svd", RankParams)
def svd(weight: torch.Tensor, params: RankParams, stats: Optional[LayerStats] = None) -> LowRankFormat:
    """Truncated SVD: the best rank-r approximation in Frobenius norm (Eckart-Young)."""
    return whitened_lowrank(weight.float(), params)


def cholesky_whitening(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S^-1)`` with ``S`` the lower Cholesky factor of ``h``."""
    root, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise CalibrationError("the calibration Hessian is singular; raise 'damping' or use more calibration text")
    eye = torch.eye(h.shape[0], device=h.device)
    return root, torch.linalg.solve_triangular(root, eye, upper=False)


def eigen_whitening(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q Λ^{1/2}, Λ^{-1/2} Q^T)`` from the eigendecomposition ``h = Q Λ Q^T`` (``h`` damped, so
    Λ > 0)."""
    eigvals, eigvecs = torch.linalg.eigh(h)
    root = eigvals.clamp(min=float(eigvals.max()) * 1e-10).sqrt()
    return eigvecs * root, eigvecs.T / root[:, None]


@register_method("svd_llm", WhitenedRankParams, needs_calibration=True)
def svd_llm(weight: torch.Tensor, params: WhitenedRankParams, stats: Optional[LayerStats] = None) -> LowRankFormat:
    """Activation-aware low rank (SVD-LLM): truncated SVD after Cholesky whitening by X^T X."""
    h, w = live_inputs(stats, weight)
    return whitened_lowrank(w, params, *cholesky_whitening(damped(h, params.damping)))


@dataclass(frozen=True)
class EoraParams(WhitenedRankParams):
    """The int part (``bits``, ``group_size``, ``symmetric``, made by ``quantizer``: ``rtn`` or any
    registered int method) and the low-rank residual (rank, energy or rank_bits; factor_bits)."""

    bits: int = 3
    group_size: Optional[int] = 128
    symmetric: bool = False
    quantizer: str = "rtn"

    def __post_init__(self) -> None:
        super().__post_init__()
        IntParams(self.bits, self.group_size, self.symmetric)
        if not isinstance(self.quantizer, str) or self.quantizer in ("eora", "svd", "svd_llm"):
            raise ValueError(f"quantizer must name an int quantization method such as 'rtn', got {quote(self.quantizer)}")


@register_method("eora", EoraParams, needs_calibration=True)
def eora(weight: torch.Tensor, params: EoraParams, stats: Optional[LayerStats] = None) -> SumFormat:
    """EoRA: quantize, then fit the residual at low rank in the eigenspace of X^T X (int + lowrank)."""
    quantizer = get_method(params.quantizer)
    int_params = quantizer.make_params(
        {"bits": params.bits, "group_size": params.group_size, "symmetric": params.symmetric}, "eora quantizer"
    )
    quantized: Format = quantizer.run(weight, int_params, stats)
    h, w = live_inputs(stats, weight)
    h = damped(h, params.damping)
    residual = w - quantized.decode().to(w.device)
    return SumFormat(tuple(weight.shape), quantized, whitened_lowrank(residual, params, *eigen_whitening(h)))
