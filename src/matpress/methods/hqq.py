"""HQQ: half-quadratic quantization (Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine
Learning Models", https://mobiusml.github.io/hqq_blog/).

Calibration-free. Instead of the min-max zero point, HQQ fits the zero point (and optionally the scale)
of each group to minimise an ``l_p`` norm of the quantization error with ``p < 1``, which tolerates a few
large errors (outlier weights) in exchange for a closer fit of the rest. The non-convex problem is split
half-quadratically with an auxiliary error variable ``W_e``, then solved by alternating closed forms:

- ``W_e <- shrink_p(W - Q^-1(Q(W)), beta)``: the generalized soft-thresholding
  ``sign(r) relu(|r| - |r|^(p-1) / beta)``, which keeps only the large residuals;
- ``z <- mean(Q(W) - (W - W_e) / s)`` per group (least squares; with ``optimize_scale`` the scale and
  zero are fitted jointly);
- ``beta <- kappa beta``.

Residuals are measured in units of the quantization step, so ``beta`` does not depend on the weight's
magnitude. The result with the lowest ``l_p`` error (the min-max start included) is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from matpress.errors import quote
from matpress.formats import IntFormat
from matpress.formats.integer import (
    FP16_MIN_NORMAL, fake_quantize, grouped, quantize_codes, resolve_group_size, rtn_parameters, ungrouped,
)
from matpress.methods.base import LayerStats, check_flag, check_int, register_method
from matpress.methods.rtn import IntParams, refuse_kquant


@dataclass(frozen=True)
class HQQParams(IntParams):
    """Integer parameters (bits, group_size, symmetric) plus: iters (half-quadratic iterations), lp_norm
    (p of the error norm, in (0, 1]), beta (initial penalty, > 0), kappa (penalty growth per
    iteration, >= 1), optimize_scale (fit the scale too, not only the zero point)."""

    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    optimize_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_kquant(self, "hqq")
        check_int("iters", self.iters)
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if not (number(self.lp_norm) and 0 < self.lp_norm <= 1):
            raise ValueError(f"lp_norm must be a number in (0, 1], got {quote(self.lp_norm)}")
        if not (number(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a positive number, got {quote(self.beta)}")
        if not (number(self.kappa) and self.kappa >= 1):
            raise ValueError(f"kappa must be a number >= 1, got {quote(self.kappa)}")
        check_flag("optimize_scale", self.optimize_scale)
        if self.symmetric and not self.optimize_scale:
            raise ValueError("symmetric HQQ has a fixed zero point: set optimize_scale: true (or symmetric: false)")


def lp_error(weight: torch.Tensor, approx: torch.Tensor, p: float) -> float:
    """``sum |W - approx|^p``, HQQ's objective."""
    return float((weight - approx).abs().pow(p).sum())


def shrink_lp(r: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalized soft-thresholding, the proximal step of ``|.|^p / beta``."""
    return torch.sign(r) * torch.relu(r.abs() - r.abs().clamp(min=1e-8).pow(p - 1) / beta)


def hqq_quantize(weight: torch.Tensor, params: HQQParams) -> IntFormat:
    """Quantize ``weight`` to the ``int`` format with HQQ-optimized zero points (and scales)."""
    w = weight.detach().float()
    n = w.shape[1]
    group = resolve_group_size(params.group_size, n)
    g = grouped(w, group)
    valid = (torch.arange(g.shape[1] * group) < n).view(1, g.shape[1], group).float()  # padded columns: no say
    count = valid.sum(-1)
    bits, p = params.bits, params.lp_norm
    scale, zero = rtn_parameters(g, bits, params.symmetric)

    def decoded(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ungrouped(fake_quantize(g, s, z, bits), n)

    best_err, best = lp_error(w, decoded(scale, zero), p), (scale, zero)
    beta = params.beta
    for _ in range(params.iters):
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        q = quantize_codes(g, s, z, bits)
        x = g / s  # weights in units of the step
        w_e = shrink_lp(x - (q - z), beta, p)
        target = (x - w_e) * s  # what the grid should reproduce, in weight units
        if params.optimize_scale:
            qc = q - (zero.unsqueeze(-1) if params.symmetric else ((q * valid).sum(-1) / count).unsqueeze(-1))
            tc = target - (0 if params.symmetric else ((target * valid).sum(-1) / count).unsqueeze(-1))
            fitted = (qc * tc * valid).sum(-1) / (qc * qc * valid).sum(-1).clamp(min=1e-12)
            scale = torch.where(fitted > 0, fitted, scale).clamp(min=FP16_MIN_NORMAL).half().float()
        if not params.symmetric:
            zero = (((q - target / scale.unsqueeze(-1)) * valid).sum(-1) / count).half().float()
        beta *= params.kappa
        err = lp_error(w, decoded(scale, zero), p)
        if err < best_err:
            best_err, best = err, (scale, zero)
    scale, zero = best
    codes = quantize_codes(g, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return IntFormat.from_codes(ungrouped(codes, n), scale, zero, bits, params.group_size, params.symmetric)


@register_method("hqq", HQQParams)
def hqq(weight: torch.Tensor, params: HQQParams, stats: Optional[LayerStats] = None) -> IntFormat:
    """HQQ (Badri & Shaji 2023): calibration-free lp-optimal zero points (and scales), half-quadratic solver."""
    return hqq_quantize(weight, params)
