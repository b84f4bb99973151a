"""AWQ: activation-aware weight quantization (Lin et al. 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", https://arxiv.org/abs/2306.00978).

Input channels that carry large activations matter most to the output. AWQ scales each input column of
``W`` up by ``s_j = mean|x_j|^alpha`` before quantizing (so salient columns get a relatively finer grid)
and divides the activations by ``s``, which leaves the product unchanged. ``alpha`` is found by a grid
search over ``[0, 1]`` minimising the layer's output error ``||X W^T - X Q^T||^2 = tr(E H E^T)``
(``E = W - Q``, ``H = E[x x^T]``), computed exactly from the calibration statistics. Then, as in the
paper, each group's clipping range is shrunk by the ratio that minimises that group's output error.

Where the architecture allows, the calibration pass folds ``1/s`` into the operation producing the
layer's input (a LayerNorm/RMSNorm before q/k/v or gate/up, v_proj before o_proj, up_proj before
down_proj), with one scale searched jointly for the layers sharing that input, and checks that the
block's output is unchanged (:func:`fold_scales`, the method's block hook); those layers are then
stored as plain ``int``. Elsewhere ``1/s`` stays in front of the layer, stored (fp16) in a
``transformed`` format around the ``int`` child. ``alpha = 0`` (no scaling) gives the plain ``int``
format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from matpress.errors import CalibrationError
from matpress.formats import Format, IntFormat
from matpress.formats.integer import fake_quantize, grouped, quantize_codes, resolve_group_size, rtn_parameters, ungrouped
from matpress.formats.transformed import make_transform, quantize_transformed
from matpress.methods.base import BlockView, LayerStats, check_flag, check_int, register_block_hook, register_method
from matpress.methods.obs import output_error
from matpress.methods.rtn import IntParams, refuse_kquant
from matpress.recipe import Rule


@dataclass(frozen=True)
class AWQParams(IntParams):
    """Integer parameters (bits, group_size, symmetric) plus: grid (alpha values tried: grid + 1 points
    from 0 to 1; 0 means no input scaling), clip (search each group's clipping ratio), fold (fold the
    scales into the preceding operation where the architecture allows)."""

    grid: int = 20
    clip: bool = True
    fold: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_kquant(self, "awq")
        check_int("grid", self.grid, minimum=0)
        check_flag("clip", self.clip)
        check_flag("fold", self.fold)


def rtn_decode(weight: torch.Tensor, bits: int, group_size: Optional[int], symmetric: bool) -> torch.Tensor:
    """``IntFormat.encode(weight, ...).decode()`` without packing the codes (the scale search runs it
    ``grid + 1`` times per layer)."""
    g = grouped(weight, resolve_group_size(group_size, weight.shape[1]))
    return ungrouped(fake_quantize(g, *rtn_parameters(g, bits, symmetric), bits), weight.shape[1])


def search_input_scale(
    weights: Sequence[torch.Tensor], stats: LayerStats, bits: int, group_size: Optional[int], symmetric: bool,
    grid: int = 20,
) -> Optional[torch.Tensor]:
    """AWQ's per-input-channel scale ``mean|x|^alpha`` (normalised, fp16-exact) with the ``alpha`` that
    minimises the summed output error of round-to-nearest over ``weights`` (layers reading the same
    input); None when ``alpha = 0`` (no scaling) wins."""
    if stats.mean_abs is None:
        raise CalibrationError("AWQ input scales need the mean |x| per input channel (LayerStats.abs_sum)")
    if grid == 0:  # no scale to try (e.g. a layer whose scale was folded into its input's producer)
        return None
    hessian = stats.hessian
    magnitude = stats.mean_abs.float().clamp(min=1e-6)
    best_err = sum(output_error(w, rtn_decode(w, bits, group_size, symmetric), hessian) for w in weights)
    best = None
    for k in range(1, grid + 1):
        s = magnitude ** (k / grid)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales on 1 in log space, as the paper does
        transform = make_transform(hessian.shape[0], False, 0, s)
        err = sum(
            output_error(w, transform.unweight(rtn_decode(transform.weight(w), bits, group_size, symmetric)), hessian)
            for w in weights
        )
        if err < best_err:
            best_err, best = err, transform.scale
    return best


def clipped_parameters(
    groups: torch.Tensor, hessian: torch.Tensor, bits: int, symmetric: bool, ratios: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each group of ``groups`` ``(out, n_groups, group)``: the min-max grid of
    the group's range shrunk by the ratio in ``ratios`` that minimises the group's output error
    ``e_g H_gg e_g^T`` (AWQ's weight clipping), ``H_gg`` the group's diagonal block of ``hessian``
    (``(n, n)``, ``n <= n_groups * group``; padded columns get zero weight in the error)."""
    out_f, n_groups, group = groups.shape
    pad = n_groups * group - hessian.shape[0]
    h = torch.nn.functional.pad(hessian, (0, pad, 0, pad))
    blocks = torch.stack([h[k * group : (k + 1) * group, k * group : (k + 1) * group] for k in range(n_groups)])
    best_err = torch.full((out_f, n_groups), float("inf"))
    best_scale = torch.empty(out_f, n_groups)
    best_zero = torch.empty(out_f, n_groups)
    for r in ratios.tolist():
        scale, zero = rtn_parameters(groups * r, bits, symmetric)
        e = groups - fake_quantize(groups, scale, zero, bits)
        err = torch.einsum("okg,kgh,okh->ok", e, blocks, e)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def clipped_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: Optional[int], symmetric: bool,
    ratios: torch.Tensor,
) -> IntFormat:
    """Per-group quantization on the clipped grids of :func:`clipped_parameters`."""
    n = weight.shape[1]
    g = grouped(weight, resolve_group_size(group_size, n))
    scale, zero = clipped_parameters(g, hessian, bits, symmetric, ratios)
    codes = quantize_codes(g, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return IntFormat.from_codes(ungrouped(codes, n), scale, zero, bits, group_size, symmetric)


CLIP_RATIOS = torch.linspace(1.0, 0.5, 11)


@register_method("awq", AWQParams, needs_calibration=True)
def awq(weight: torch.Tensor, params: AWQParams, stats: Optional[LayerStats] = None) -> Format:
    """AWQ (Lin et al. 2023): activation-aware input scales and clipping searched on the output error."""
    if stats is None:
        raise CalibrationError("awq needs calibration statistics of the layer's inputs")
    w = weight.float()
    scale = search_input_scale([w], stats, params.bits, params.group_size, params.symmetric, params.grid)
    transform = None if scale is None else make_transform(w.shape[1], False, 0, scale)
    ratios = CLIP_RATIOS if params.clip else torch.ones(1)
    return quantize_transformed(w, stats.hessian, transform, lambda w_t, h_t: clipped_quantize(
        w_t, h_t, params.bits, params.group_size, params.symmetric, ratios
    ))


@torch.inference_mode()
def fold_scales(block: BlockView, rules: dict[str, Rule]) -> dict[str, Rule]:
    """AWQ with folding, AWQ's block hook: for each stage of ``awq`` layers sharing an input, search one
    scale ``s`` on the uncompressed block, multiply the layers' input columns by ``s`` and divide the
    producer of their input by ``s``: a norm whose output they read, or else the nearest earlier linear
    layer of the block with that many outputs (v_proj for o_proj, up_proj for down_proj). A fold is kept
    only if the block's output stays the same (so a norm also feeding a residual, or a linear followed
    by a nonlinearity, is left alone). Returns the rules of the folded layers from now on: their scale
    lives in the producer, so their own AWQ pass searches none (``grid=0``)."""
    calls = block.calls
    candidates: dict[int, tuple[list[str], list[torch.nn.Module], list[torch.nn.Module]]] = {}
    for k, stage in enumerate(block.stages):
        stage_rules = {rules[n] for n in stage}
        first = block.call_of(stage[0])
        if first is None or len(stage_rules) != 1 or not all(r.method == "awq" and r.params.fold for r in stage_rules):
            continue
        n = first.input.shape[-1]
        position = calls.index(first)
        modules = [block.layer(name) for name in stage]
        producers = [  # a norm whose output the stage reads, then earlier linear layers, nearest first
            c.module for c in calls[:position]
            if c.output is first.input and getattr(c.module, "weight", None) is not None
            and c.module.weight.dim() == 1 and c.module.weight.numel() == n
        ] + [
            c.module for c in reversed(calls[:position])
            if block.is_linear(c.module) and c.module not in modules and block.weight(c.module).shape[0] == n
        ]
        if producers:
            candidates[k] = (stage, modules, producers)
    if not candidates:
        return {}
    stats = block.stats([stage[0] for stage, _, _ in candidates.values()])
    reference = block.run()
    folded: dict[str, Rule] = {}
    for stage, modules, producers in candidates.values():
        rule = rules[stage[0]]
        params = rule.params
        weights = [block.weight(m).float() for m in modules]
        s = search_input_scale(weights, stats[stage[0]], params.bits, params.group_size, params.symmetric, params.grid)
        if s is None:
            continue

        def fold(producer: torch.nn.Module, factor: torch.Tensor) -> None:
            block.scale_rows(producer, factor)
            for m in modules:
                block.scale_inputs(m, factor)

        for producer in producers:
            fold(producer, s)
            out = block.run()
            if float((out - reference).norm()) <= 1e-4 * float(reference.norm()):
                after = dataclasses.replace(rule, params=dataclasses.replace(params, grid=0))
                folded.update({name: after for name in stage})
                break
            fold(producer, 1 / s)  # undo: the block computes something else now
    return folded


register_block_hook("awq", fold_scales)
