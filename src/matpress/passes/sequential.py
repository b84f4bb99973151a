"""The sequential calibrated pass: what :func:`matpress.compress` runs for calibrated methods.

It finds the model's repeated transformer blocks, catches the first block's inputs, then per block
collects statistics of its linear layers in execution order (the layers sharing an input, such as
q/k/v, together), compresses them, and runs the compressed block to make the next block's inputs.
Later layers thus see the errors of earlier ones and compensate for them, as in GPTQ, and only one
block's activations are held at a time.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch
from torch import nn
from tqdm.auto import tqdm

from matpress.methods import get_method
from matpress.methods.awq import search_input_scale
from matpress.nn.layout import is_linear, linear_weight, scale_inputs, scale_rows
from matpress.passes.layers import LayerReport, compress_layer, compress_streamed_layer
from matpress.recipe import Rule
from matpress.walk.blocks import BlockInput, Call, block_stats, capture_block_inputs, execution_stages, find_blocks, stage_stats, trace_block
from matpress.walk.data import CalibrationData
from matpress.walk.source import BlockStream, materialised
from matpress.walk.stats import collect_stats

@torch.inference_mode()
def fold_awq_scales(
    model: nn.Module, block: nn.Module, head: str, stages: list[list[str]], chosen: dict[str, Rule],
    inputs: list[BlockInput], calls: list[Call],
) -> dict[str, Rule]:
    """AWQ with folding (Lin et al. 2023): for each stage of ``awq`` layers sharing an input, search one
    scale ``s`` on the uncompressed block, multiply the layers' input columns by ``s`` and divide the
    producer of their input by ``s``: a norm whose output they read, or else the nearest earlier linear
    layer of the block with that many outputs (v_proj for o_proj, up_proj for down_proj). A fold is kept
    only if the block's output stays the same (so a norm also feeding a residual, or a linear followed
    by a nonlinearity, is left alone). Returns the rules of the folded layers from now on: their scale
    lives in the producer, so their own AWQ pass searches none (``grid=0``)."""
    by_name = {call.name: call for call in calls}
    candidates: dict[int, tuple[list[str], list[nn.Module]]] = {}
    for k, stage in enumerate(stages):
        rules = {chosen[n] for n in stage}
        first = by_name.get(stage[0][len(head):])
        if first is None or len(rules) != 1 or not all(r.method == "awq" and r.params.fold for r in rules):
            continue
        n = first.input.shape[-1]
        position = calls.index(first)
        modules = [model.get_submodule(name) for name in stage]
        producers = [  # a norm whose output the stage reads, then earlier linear layers, nearest first
            c.module for c in calls[:position]
            if c.output is first.input and getattr(c.module, "weight", None) is not None
            and c.module.weight.dim() == 1 and c.module.weight.numel() == n
        ] + [
            c.module for c in reversed(calls[:position])
            if is_linear(c.module) and c.module not in modules and linear_weight(c.module).shape[0] == n
        ]
        if producers:
            candidates[k] = (stage, modules, producers)
    if not candidates:
        return {}
    stats = block_stats(block, head, [stage[0] for stage, _, _ in candidates.values()], inputs)
    reference = inputs[0].run(block)
    folded: dict[str, Rule] = {}
    for stage, modules, producers in candidates.values():
        rule = chosen[stage[0]]
        params = rule.params
        weights = [linear_weight(m).float() for m in modules]
        s = search_input_scale(weights, stats[stage[0]], params.bits, params.group_size, params.symmetric, params.grid)
        if s is None:
            continue

        def fold(producer: nn.Module, factor: torch.Tensor) -> None:
            scale_rows(producer, factor)
            for m in modules:
                scale_inputs(m, factor)

        for producer in producers:
            fold(producer, s)
            out = inputs[0].run(block)
            if float((out - reference).norm()) <= 1e-4 * float(reference.norm()):
                after = dataclasses.replace(rule, params=dataclasses.replace(params, grid=0))
                folded.update({name: after for name in stage})
                break
            fold(producer, 1 / s)  # undo: the block computes something else now
    return folded


def compress_sequential(
    model: nn.Module, chosen: dict[str, Rule], data: CalibrationData, progress: bool = True
) -> list[LayerReport]:
    """Compress the layers in ``chosen`` (name -> rule) block by block on ``data``: see the module doc."""
    prefix, blocks = find_blocks(model)
    reports: dict[str, LayerReport] = {}
    stream = BlockStream(model)
    with materialised(model, "", skip=prefix):  # a streamed model: what runs before the first block
        inputs = capture_block_inputs(model, blocks[0], data, progress)
    for i, block in enumerate(tqdm(blocks, desc="compressing blocks", unit="block", disable=not progress)):
        head = f"{prefix}.{i}." if prefix else f"{i}."
        names = {n[len(head):]: n for n in chosen if n.startswith(head)}
        stream.materialise(head[:-1])
        if names:
            calls = trace_block(block, inputs[0])
            stages = execution_stages(calls, names)
            folded = fold_awq_scales(model, block, head, stages, chosen, inputs, calls)
            called = Counter(head + call.name for call in calls)
            del calls
            for stage in stages:
                stats = stage_stats(block, head, [n for n in stage if get_method(chosen[n].method).needs_calibration], inputs, called)
                for name in stage:
                    reports[name] = compress_layer(model, name, folded.get(name, chosen[name]), stats.get(name))
        if i + 1 < len(blocks):
            with torch.inference_mode():
                for inp in inputs:  # in place: the previous block's activations are dropped as we go
                    inp.hidden = inp.run(block)
        stream.release(head[:-1])
    del inputs
    rest = [n for n in chosen if n not in reports]
    calibrated = [n for n in rest if get_method(chosen[n].method).needs_calibration]
    if calibrated:
        with materialised(model, ""):
            stats = collect_stats(model, data, calibrated, progress=False)
    else:
        stats = {}
    for name in rest:  # layers outside the blocks (e.g. a pooler or an included lm_head), on the compressed model
        reports[name] = compress_streamed_layer(model, name, chosen[name], stats.get(name))
    return [reports[n] for n in chosen]
