"""GPTQ: layer-wise quantization with second-order error compensation (Frantar et al. 2022, "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers",
https://arxiv.org/abs/2210.17323).

Columns of ``W`` are quantized one at a time; the rounding error of each is spread over the columns
not yet quantized through the inverse Hessian ``H^-1`` of the layer-wise objective
``||X W^T - X Q^T||^2`` (``H = E[x x^T]``), which makes the output error far smaller than rounding each
weight on its own. As in the paper: ``H^-1`` comes from a Cholesky factorisation of the damped Hessian
(``percdamp`` times its mean diagonal added), updates to later columns are applied lazily per block of
``block_size`` columns, and ``act_order`` quantizes columns in order of decreasing ``H_ii`` (the most
active inputs first, while most columns are still free to absorb their error). With act-order the
groups keep their original column ranges and their scales are computed before the pass ("static
groups"), so the result is the plain ``int`` format.

Options: ``rotate`` (randomized Hadamard incoherence processing, QuaRot / QuIP#: GPTQ runs on ``W R``
with ``H' = R^T H R``) and ``scale_inputs`` (AWQ's activation-aware per-channel scales, searched first;
GPTQ then runs on ``W diag(s)``); either gives a ``transformed`` format around the ``int`` child.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from scipy.linalg.lapack import dpotrf, dtrtri

from matpress.errors import CalibrationError, quote
from matpress.formats import Format, IntFormat, KQuantFormat
from matpress.formats.integer import grouped, quantize_codes, resolve_group_size, rtn_parameters
from matpress.formats.kquant import SUPER, KGrid, kquant_grid, kquant_nearest, kquant_spec
from matpress.formats.transformed import make_transform, quantize_transformed
from matpress.methods.awq import CLIP_RATIOS, clipped_parameters, search_input_scale
from matpress.methods.base import LayerStats, check_flag, check_int, register_method
from matpress.methods.obs import AUTO, asymmetric_target, drop_dead_inputs, obs_sweep
from matpress.methods.rtn import IntParams


@dataclass(frozen=True)
class GPTQParams(IntParams):
    """Integer parameters (bits, group_size, symmetric) plus: percdamp (damping as a fraction of the
    mean Hessian diagonal, > 0), block_size (columns per lazy update), act_order (quantize columns in
    order of decreasing activation energy), rotate (randomized Hadamard rotation of the inputs, signs
    from ``seed``), scale_inputs (AWQ input scales before GPTQ), clip (each group's grid range shrunk by
    the ratio that minimises the group's output error, :func:`matpress.methods.awq.clipped_parameters`,
    instead of its min-max range), asymmetric (0 to 1: how far to move the weight toward the target that
    also undoes the error of earlier layers, :func:`matpress.methods.obs.asymmetric_target`; 0 is plain
    GPTQ; ``"auto"``: per layer, the strength that does best on held-out calibration batches)."""

    percdamp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    rotate: bool = False
    scale_inputs: bool = False
    clip: bool = False
    seed: int = 0
    asymmetric: Union[float, str] = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.percdamp, (int, float)) or isinstance(self.percdamp, bool) or not 0 < self.percdamp < 1:
            raise ValueError(f"percdamp must be a number in (0, 1), got {quote(self.percdamp)}")
        check_int("block_size", self.block_size)
        for name in ("act_order", "rotate", "scale_inputs", "clip"):
            check_flag(name, getattr(self, name))
        if self.kquant is not None and (self.scale_inputs or self.clip):
            raise ValueError("gptq with kquant fits each super-block's K-quant grid itself: scale_inputs and clip do not apply; drop them")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {quote(self.seed)}")
        check_strength("asymmetric", self.asymmetric)


def check_strength(name: str, value: object) -> None:
    """Refuse anything but a number in [0, 1] or ``"auto"`` for parameter ``name``."""
    if value == AUTO:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1] or {quote(AUTO)}, got {quote(value)}")


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float, overwrite: bool = False) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` (``U^T U`` is that inverse), in fp64 for
    stability; its rows give the error propagation coefficients GPTQ uses.

    Without forming the inverse: with ``J`` the reversal permutation and ``J H J = L L^T``,
    ``H^-1 = (J L^-1 J)^T (J L^-1 J)``, and ``J L^-1 J`` is upper triangular with a positive diagonal,
    so it is the factor: one Cholesky and one triangular inverse instead of three factorisations.
    ``overwrite``: the factor is written over ``hessian`` (a contiguous fp32 CPU matrix the caller no
    longer needs), saving its fp32 copy."""
    # memory: a down projection's 8192x8192 Hessian is 0.5 GB in fp64, so one fp64 matrix is alive at a
    # time: LAPACK factors and inverts it in place (torch's cholesky and solve_triangular each write a
    # second one), and the reversals are copied a band of rows at a time
    device, hessian = hessian.device, hessian.detach().cpu()  # LAPACK on the CPU; a GPU's memory is not the limit
    n = hessian.shape[0]
    damp = percdamp * float(hessian.diagonal().double().mean().clamp(min=1e-12))
    work = torch.empty(n, n, dtype=torch.float64)
    # the row-major buffer read column-major is its transpose: L L^T = J H J row-major is U^T U
    # column-major with U = L^T, so LAPACK's upper routines on ``work.T`` leave L, then L^-1, in the
    # lower triangle of ``work``
    lapack_view = work.numpy().T
    for attempt in range(4):  # an ill-conditioned Hessian (few tokens) gets more damping
        _reversed_into(work, hessian)
        diagonal = work.diagonal()
        for extra in [damp] + [damp * 10**i for i in range(attempt)]:
            diagonal.add_(extra)  # the damping of each failed attempt added on, as before
        _, info = dpotrf(lapack_view, lower=0, clean=0, overwrite_a=1)
        if info < 0:
            raise RuntimeError(f"LAPACK dpotrf rejected argument {-info}")  # a bug here, not the user's input
        if info == 0:
            _, info = dtrtri(lapack_view, lower=0, unitdiag=0, overwrite_c=1)
            if info != 0:  # a Cholesky factor has a positive diagonal: not singular
                raise RuntimeError(f"LAPACK dtrtri failed with info {info} on a Cholesky factor")
            in_place = overwrite and hessian.dtype == torch.float32 and hessian.is_contiguous() and device.type == "cpu"
            factor = hessian if in_place else torch.empty(n, n, dtype=torch.float32)
            _reversed_into(factor, work)
            return factor.triu_().to(device)  # the other triangle of ``work`` still holds J H J
    raise CalibrationError("the layer's input Hessian is not positive definite even after damping; use more calibration data")


def _reversed_into(out: torch.Tensor, matrix: torch.Tensor, band: int = 256) -> None:
    """``out = J matrix J`` (rows and columns reversed, cast to ``out``'s dtype), ``band`` rows at a
    time so that the temporaries stay small."""
    n = matrix.shape[0]
    for start in range(0, n, band):
        stop = min(start + band, n)
        out[start:stop].copy_(matrix[n - stop : n - start].flip(0, 1))


# A grid's fit: per-group parameters (each ``(out, k)``) of ``groups`` ``(out, k, group)``, which cover
# the original columns ``columns``; its rounding: ``(codes, values)`` of a column ``(out,)`` on one
# group's parameters (each ``(out,)``).
GridFit = Callable[[torch.Tensor, slice], tuple[torch.Tensor, ...]]
GridRound = Callable[[torch.Tensor, tuple[torch.Tensor, ...]], tuple[torch.Tensor, torch.Tensor]]


def grid_sweep(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: Optional[int],
    fit: GridFit,
    nearest: GridRound,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    span: Optional[int] = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """GPTQ onto any per-group grid: the OBS column sweep (:func:`matpress.methods.obs.obs_sweep`) with
    each column rounded by ``nearest`` on its group's parameters from ``fit``. ``span`` (a multiple of the
    group; one group by default) columns are fitted at once where the first of them is reached: a
    K-quant super-block, whose sub-block scales share one quantized factor. Returns the codes
    ``(out, in)`` and the per-group parameters (each ``(out, n_groups)``)."""
    h, w = drop_dead_inputs(hessian, weight)
    out_f, n = w.shape
    group = resolve_group_size(group_size, n)
    n_groups = -(-n // group)
    span = span or group
    # with act-order the columns are visited out of order, so the grids come from the original weight
    # ("static groups") and the result stays a plain grid of the format
    static = act_order or group >= n
    if static:
        params = fit(grouped(w, group), slice(0, n))
    else:
        params = None
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(n)
    group_of = (perm // group).tolist()
    codes = torch.empty(out_f, n)

    def start_column(j: int, current: torch.Tensor) -> None:
        nonlocal params
        if not static and j % span == 0:  # a span starts: its grid from its current (updated) columns
            columns = current[:, j : j + span]
            fitted = fit(columns.reshape(out_f, -1, min(group, columns.shape[1])), slice(j, j + span))
            if params is None:
                params = tuple(torch.empty(out_f, n_groups) for _ in fitted)
            for stored, new in zip(params, fitted):
                stored[:, j // group : j // group + new.shape[1]] = new

    def round_column(j: int, col: torch.Tensor) -> torch.Tensor:
        g = group_of[j]
        codes[:, j], values = nearest(col, tuple(p[:, g] for p in params))
        return values

    if act_order:  # one gather: two (h[perm][:, perm]) held three fp32 Hessians at once
        h = h[perm[:, None], perm]
    hinv = inverse_hessian_factor(h, percdamp, overwrite=True)  # h is this sweep's own copy
    del h
    obs_sweep(w[:, perm], hinv, round_column, blocksize=block_size, start_column=start_column)
    return codes[:, torch.argsort(perm)], params


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: Optional[int],
    symmetric: bool,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip_ratios: Optional[torch.Tensor] = None,
) -> IntFormat:
    """Quantize ``weight`` ``(out, in)`` by GPTQ with input second moment ``hessian`` ``(in, in)``: the
    grid sweep with round-to-nearest on each group's integer grid: its min-max range, or with
    ``clip_ratios`` that range shrunk by the ratio with the least output error of the group
    (:func:`matpress.methods.awq.clipped_parameters`)."""

    def nearest(col: torch.Tensor, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = params
        q = quantize_codes(col, scale, zero, bits)
        return q, (q - zero) * scale

    def fit(groups: torch.Tensor, columns: slice) -> tuple[torch.Tensor, torch.Tensor]:
        if clip_ratios is None:
            return rtn_parameters(groups, bits, symmetric)
        return clipped_parameters(groups, hessian.float()[columns, columns], bits, symmetric, clip_ratios)

    codes, (scale, zero) = grid_sweep(
        weight, hessian, group_size, fit, nearest,
        percdamp, block_size, act_order,
    )
    return IntFormat.from_codes(codes, scale, zero, bits, group_size, symmetric)


def gptq_kquant(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    kquant: str,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> KQuantFormat:
    """GPTQ onto the grid of GGUF K-quant ``kquant``: each super-block's grid (:func:`kquant_grid`) is
    fitted from its current columns where it starts, then its columns are rounded one at a time
    (:func:`kquant_nearest`) with the error fed forward as for any grid."""
    spec = kquant_spec(kquant)

    def nearest(col: torch.Tensor, params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        return kquant_nearest(col, params[0], params[1], spec)

    codes, params = grid_sweep(
        weight, hessian, spec.sub, lambda groups, columns: kquant_grid(groups, spec), nearest,
        percdamp, block_size, act_order, span=SUPER,
    )
    return KQuantFormat.from_grid(codes, KGrid(*params), spec.name)


@register_method("gptq", GPTQParams, needs_calibration=True)
def gptq(weight: torch.Tensor, params: GPTQParams, stats: Optional[LayerStats] = None) -> Format:
    """GPTQ (Frantar et al. 2022): second-order error compensation, optional act-order, rotation, AWQ scales."""
    if stats is None:
        raise CalibrationError("gptq needs calibration statistics of the layer's inputs")
    w = asymmetric_target(weight.float(), stats, params.asymmetric, params.percdamp)
    params = params.for_width(w.shape[1])
    scale = None
    if params.scale_inputs:
        scale = search_input_scale([w], stats, params.bits, params.group_size, params.symmetric)
    transform = None if scale is None and not params.rotate else make_transform(w.shape[1], params.rotate, params.seed, scale)
    if params.kquant is not None:
        return quantize_transformed(w, stats.hessian, transform, lambda w_t, h_t: gptq_kquant(
            w_t, h_t, params.kquant, params.percdamp, params.block_size, params.act_order,
        ))
    return quantize_transformed(w, stats.hessian, transform, lambda w_t, h_t: gptq_quantize(
        w_t, h_t, params.bits, params.group_size, params.symmetric, params.percdamp, params.block_size, params.act_order,
        CLIP_RATIOS if params.clip else None,
    ))
