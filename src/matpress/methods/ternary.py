"""Ternary weights in {-1, 0, +1} times per-channel or per-group scales.

- ``ternary``: absmean rounding (Ma et al. 2024, BitNet b1.58): scale = mean |w| of the group,
  trit = clamp(round(w / scale), -1, 1).
- ``ternary_calibrated``: minimises the layer-output error ``||X W^T - X T^T||`` by alternating two
  exact steps from the absmean start: trits given the scales by an OBS/GPTQ sweep that rounds each
  column to {-s, 0, s} and feeds its error forward through the inverse Hessian (Frantar et al. 2023),
  and scales given the trits by least squares under ``H = E[x x^T]`` (one small linear system per row).
  The best iterate by the output error is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from matpress.errors import quote
from matpress.formats import TernaryFormat
from matpress.formats.integer import resolve_group_size, to_fp16_scale
from matpress.formats.ternary import absmean_trits, expand_groups
from matpress.methods.base import LayerStats, check_int, register_method
from matpress.methods.gptq import inverse_hessian_factor
from matpress.methods.obs import live_inputs, obs_sweep, output_error


@dataclass(frozen=True)
class TernaryParams:
    """group_size: input columns sharing one scale, or None for one scale per output channel.
    iterations, damping: for ternary_calibrated."""

    group_size: Optional[int] = None
    iterations: int = 3
    damping: float = 0.01

    def __post_init__(self) -> None:
        check_int("group_size", self.group_size, null="per channel")
        check_int("iterations", self.iterations)
        if not 0 < self.damping < 1:
            raise ValueError(f"damping must be a fraction in (0, 1), got {quote(self.damping)}")


@register_method("ternary", TernaryParams)
def ternary(weight: torch.Tensor, params: TernaryParams, stats: Optional[LayerStats] = None) -> TernaryFormat:
    """Ternary absmean rounding (BitNet b1.58), per channel or per group."""
    return TernaryFormat.encode(weight, group_size=params.group_size)


def least_squares_scales(weight: torch.Tensor, trits: torch.Tensor, h: torch.Tensor, group: int) -> torch.Tensor:
    """Per-(row, group) scales ``s`` minimising ``tr((W - T diag(s)) H (W - T diag(s))^T)`` for fixed
    trits: for each row the normal equations ``M s = c`` with ``M[g, k] = t_g^T H t_k`` and
    ``c[g] = t_g^T H w`` (``t_g``: the row's trits restricted to group g)."""
    out_f, in_f = weight.shape
    n_groups = -(-in_f // group)
    pad = n_groups * group - in_f

    def per_group(values: torch.Tensor) -> torch.Tensor:  # (out, in) -> (out, n_groups): sums over groups
        return torch.nn.functional.pad(values, (0, pad)).view(out_f, n_groups, group).sum(-1)

    t = trits.float()
    rhs = per_group(t * (weight @ h))
    normal = torch.empty(out_f, n_groups, n_groups, device=weight.device)
    for g in range(n_groups):
        cols = slice(g * group, min((g + 1) * group, in_f))
        normal[:, g] = per_group((t[:, cols] @ h[cols]) * t)
    # rows or groups with no non-zero trit: a tiny ridge keeps the system solvable (their scale is moot)
    ridge = 1e-8 * normal.diagonal(dim1=1, dim2=2).amax(dim=1).clamp(min=1e-30)
    normal += torch.diag_embed(ridge[:, None].expand(out_f, n_groups))
    return torch.linalg.solve(normal, rhs.unsqueeze(-1)).squeeze(-1)


@register_method("ternary_calibrated", TernaryParams, needs_calibration=True)
def ternary_calibrated(weight: torch.Tensor, params: TernaryParams, stats: Optional[LayerStats] = None) -> TernaryFormat:
    """Calibrated ternary: alternate OBS trit sweeps and least-squares scales to minimise the output error."""
    h, w = live_inputs(stats, weight)
    group = resolve_group_size(params.group_size, w.shape[1])
    hinv = inverse_hessian_factor(h, params.damping)
    trits, scales = absmean_trits(w, group)

    def decoded(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return t.float() * expand_groups(s, group, w.shape[1])

    best = (output_error(w, decoded(trits, scales), h), trits, scales)
    for _ in range(params.iterations):
        element_scales = expand_groups(scales, group, w.shape[1])

        def round_column(j: int, col: torch.Tensor) -> torch.Tensor:
            s = element_scales[:, j]
            return torch.clamp(torch.round(col / s), -1, 1) * s

        swept = obs_sweep(w, hinv, round_column)
        trits = torch.round(swept / element_scales).to(torch.int8)
        # negative least-squares scales flip the trits instead, keeping scales positive
        raw = least_squares_scales(w, trits, h, group)
        signs = torch.where(raw < 0, -1, 1).to(torch.int8)
        trits = trits * expand_groups(signs, group, w.shape[1])
        scales = to_fp16_scale(raw.abs())
        err = output_error(w, decoded(trits, scales), h)
        if err < best[0]:
            best = (err, trits, scales)
    _, trits, scales = best
    return TernaryFormat.from_trits(trits, scales, group)
