"""Quantization onto a codebook (a table of non-uniform levels times per-group scales,
:class:`~matpress.formats.CodebookFormat`).

- ``codebook``: round-to-nearest: each weight takes the nearest level given its group's scale, the
  scale chosen per group by a small error search; fixed tables (``nf``, ``nl``, ``iq4nl``) or tables learned from
  the weight (``layer``: one per layer, ``row``: one per output channel) by k-means.
- ``gptq_codebook``: GPTQ's column sweep with error feedback through the inverse Hessian
  (:func:`matpress.methods.gptq.grid_sweep`), each column rounded to its nearest codebook level; a
  learned table is fitted first by k-means weighted by the Hessian diagonal (SqueezeLLM, Kim et al.
  2023, https://arxiv.org/abs/2306.07629, weights its k-means by the Fisher information's diagonal).
  Optional act-order and randomized Hadamard rotation as for ``gptq``.

Learned tables (:func:`learn_table`) minimise ``sum_i h_i (w_i - s_i t[c_i])**2`` (``h_i`` the
importance of weight i's input column, ``s_i`` its group's scale) by alternating exact steps from the
``nl`` table and its searched scales: codes = the nearest levels; each level = the weighted least-
squares fit of the weights assigned to it; codes again; each group's scale = its weighted least-squares
fit. Every step lowers the objective; the rounding as stored (integer levels, fp16 scales) may not, so
the best iterate as stored is kept, never worse than the start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from matpress.errors import quote
from matpress.formats import CodebookFormat, Format
from matpress.formats.codebook import (
    BITS, FIXED_TABLES, FP16_MIN_SUBNORMAL, TABLES, fixed_table, group_weights, integer_levels,
    level_values, nearest_codes, search_scales,
)
from matpress.formats.integer import grouped, resolve_group_size
from matpress.formats.ternary import expand_groups
from matpress.formats.transformed import make_transform, quantize_transformed
from matpress.methods.base import LayerStats, check_int, register_method
from matpress.methods.gptq import GPTQParams, grid_sweep
from matpress.methods.obs import asymmetric_target, live_inputs


@dataclass(frozen=True)
class CodebookParams:
    """bits: 2 to 4 (a table of 2**bits levels). group_size: input columns sharing one scale, or None
    for one per output channel. table: nf, nl or iq4nl (fixed; iq4nl is 4-bit), layer or row (learned
    per layer or per output channel). iterations: k-means rounds of a learned table."""

    bits: int = 4
    group_size: Optional[int] = 32
    table: str = "nl"
    iterations: int = 6

    def __post_init__(self) -> None:
        if self.bits not in BITS or isinstance(self.bits, bool):
            raise ValueError(f"bits must be 2, 3 or 4 for a codebook, got {quote(self.bits)}")
        check_int("group_size", self.group_size, null="per channel")
        if self.table not in TABLES:
            raise ValueError(f"table must be one of {list(TABLES)}, got {quote(self.table)}")
        if self.table == "iq4nl" and self.bits != 4:
            raise ValueError(f"the iq4nl table has 16 levels: it needs bits=4, got bits={self.bits}")
        check_int("iterations", self.iterations, minimum=0)


@dataclass(frozen=True)
class GPTQCodebookParams(CodebookParams):
    """Codebook parameters plus GPTQ's: percdamp, block_size, act_order, rotate, seed, asymmetric (see ``gptq``)."""

    percdamp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    rotate: bool = False
    seed: int = 0
    asymmetric: Union[float, str] = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        # the same checks as gptq's, on the parameters the two share
        GPTQParams(
            percdamp=self.percdamp, block_size=self.block_size, act_order=self.act_order, rotate=self.rotate, seed=self.seed,
            asymmetric=self.asymmetric,
        )


def weighted_error(weight: torch.Tensor, approx: torch.Tensor, importance: torch.Tensor) -> float:
    """``sum_i h_i (w_i - a_i)**2`` with ``h`` the importance of each input column ``(in,)``."""
    return float((((weight - approx) ** 2) * importance).sum())


def rounded_weight(weight: torch.Tensor, table: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """The weight rounded to its nearest levels on ``table`` given ``scales``: what the format decodes."""
    s = expand_groups(scales, group, weight.shape[1])
    return level_values(nearest_codes(weight / s, table), table) * s


def _sums(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    return torch.zeros(size, dtype=values.dtype).index_add_(0, index.reshape(-1), values.reshape(-1))


def learn_table(
    weight: torch.Tensor, bits: int, group: int, per_row: bool, importance: torch.Tensor, iterations: int
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Weighted k-means of a codebook (see the module docstring): the table ``(1 or out, 2**bits)``
    ascending and the scales ``(out, n_groups)``, both fp32 holding fp16 values, and the objective of
    the start and of each iterate as stored (the result is the least of them)."""
    out_f, n = weight.shape
    n_levels = 1 << bits
    n_tables = out_f if per_row else 1
    table = fixed_table("nl", bits).unsqueeze(0).expand(n_tables, -1).contiguous()
    scales = search_scales(grouped(weight, group), table, group_weights(importance, n, group))
    h = importance.float().expand(out_f, n)
    history = [weighted_error(weight, rounded_weight(weight, table, scales, group), importance)]
    best = (history[0], table, scales)
    rows = torch.arange(out_f).unsqueeze(1) if per_row else torch.zeros(out_f, 1, dtype=torch.long)
    for _ in range(iterations):
        s = expand_groups(scales, group, n)
        codes = nearest_codes(weight / s, table)
        # each level: sum h s w / sum h s^2 over the weights it holds (an empty level keeps its value)
        index = rows * n_levels + codes
        num = _sums(h * s * weight, index, n_tables * n_levels).view(n_tables, n_levels)
        den = _sums(h * s * s, index, n_tables * n_levels).view(n_tables, n_levels)
        fitted = torch.where(den > 0, num / den.clamp(min=1e-30), table)
        table = integer_levels(fitted.sort(dim=1).values)
        # each group's scale: sum h t w / sum h t^2 over its weights, for the codes nearest the new table
        t = level_values(nearest_codes(weight / s, table), table)
        imp = group_weights(importance, n, group)
        num = (grouped(t * weight, group) * imp).sum(-1)
        den = (grouped(t * t, group) * imp).sum(-1)
        scales = torch.where(den > 0, num / den.clamp(min=1e-30), scales).clamp(min=FP16_MIN_SUBNORMAL).half().float()
        err = weighted_error(weight, rounded_weight(weight, table, scales, group), importance)
        history.append(err)
        if err < best[0]:
            best = (err, table, scales)
    return best[1], best[2], history


def codebook_table(
    weight: torch.Tensor, params: CodebookParams, importance: torch.Tensor
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The table of ``params`` for ``weight`` ``(1 or out, 2**bits)``, and the scales k-means found with
    a learned one (None for a fixed table)."""
    if params.table in FIXED_TABLES:
        return fixed_table(params.table, params.bits).unsqueeze(0), None
    group = resolve_group_size(params.group_size, weight.shape[1])
    table, scales, _ = learn_table(weight, params.bits, group, params.table == "row", importance, params.iterations)
    return table, scales


@register_method("codebook", CodebookParams)
def codebook(weight: torch.Tensor, params: CodebookParams, stats: Optional[LayerStats] = None) -> CodebookFormat:
    """Round-to-nearest onto a codebook (fixed nf / nl / iq4nl table, or learned per layer or per row by k-means)."""
    w = weight.detach().float()
    table, scales = codebook_table(w, params, torch.ones(w.shape[1]))
    if scales is None:
        return CodebookFormat.encode(w, bits=params.bits, group_size=params.group_size, table=params.table)
    return CodebookFormat.from_scales(w, scales, table, params.bits, params.group_size, params.table)


def gptq_codebook_quantize(weight: torch.Tensor, hessian: torch.Tensor, params: GPTQCodebookParams) -> CodebookFormat:
    """GPTQ onto the codebook of ``params``: the table first (learned with the Hessian diagonal as the
    importance), then the sweep, each group's scale searched on the table where the group starts."""
    importance = hessian.diagonal().float().clamp(min=0)
    table, _ = codebook_table(weight, params, importance)
    group = resolve_group_size(params.group_size, weight.shape[1])

    def fit(groups: torch.Tensor, columns: slice) -> tuple[torch.Tensor, ...]:
        covered = importance[columns]  # all columns (static groups) or the one group starting here
        weights = group_weights(covered, covered.numel(), groups.shape[-1])
        return (search_scales(groups, table, weights),)

    def nearest(col: torch.Tensor, scale: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        s = scale[0]
        codes = nearest_codes(col / s, table)
        return codes, level_values(codes, table) * s

    codes, (scales,) = grid_sweep(
        weight, hessian, params.group_size, fit, nearest, params.percdamp, params.block_size, params.act_order
    )
    return CodebookFormat.from_codes(codes, scales, table, params.bits, params.group_size, params.table)


@register_method("gptq_codebook", GPTQCodebookParams, needs_calibration=True)
def gptq_codebook(weight: torch.Tensor, params: GPTQCodebookParams, stats: Optional[LayerStats] = None) -> Format:
    """GPTQ onto a codebook grid (fixed or learned table), optional act-order and rotation."""
    h, w = live_inputs(stats, asymmetric_target(weight.float(), stats, params.asymmetric, params.percdamp) if stats is not None else weight)
    transform = make_transform(w.shape[1], True, params.seed, None) if params.rotate else None
    return quantize_transformed(w, h, transform, lambda w_t, h_t: gptq_codebook_quantize(w_t, h_t, params))
