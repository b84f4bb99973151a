"""The sequential calibrated pass: what :func:`matpress.compress` runs for calibrated methods, a walk
with propagation (:func:`matpress.walk.walk`): per block, the statistics of each stage of layers
sharing an input, then those layers compressed; the compressed block makes the next block's inputs.
Later layers thus see the errors of earlier ones and compensate for them, as in GPTQ, and only one
block's activations are held at a time.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from matpress.methods import get_method
from matpress.passes.layers import LayerReport, compress_streamed_layer
from matpress.recipe import Rule
from matpress.walk import BlockSource, CalibrationData, walk


def compress_sequential(
    model: nn.Module, chosen: dict[str, Rule], data: CalibrationData, progress: bool = True,
    source: Optional[BlockSource] = None, block_hooks: bool = True,
) -> list[LayerReport]:
    """Compress the layers in ``chosen`` (name -> rule) block by block on ``data``: see the module doc.
    ``block_hooks``: run the block-level steps of the rules' methods (AWQ folding its scales). Rules
    asking for the asymmetric target (gptq's ``asymmetric``) make the walk track the uncompressed model
    too, for the cross terms of their statistics."""
    reports: dict[str, LayerReport] = {}
    reference = any(getattr(rule.params, "asymmetric", 0) for rule in chosen.values())
    walked = walk(model, list(chosen), data, rules=chosen if block_hooks else None, source=source, progress=progress, reference=reference)
    for block in walked:
        for stage in block.stages:
            stats = block.stats(n for n in stage if get_method(chosen[n].method).needs_calibration)
            for name in stage:
                reports[name] = compress_streamed_layer(model, name, block.changed.get(name, chosen[name]), stats.get(name))
    return [reports[n] for n in chosen]
