"""The plain pass: a walk without data, every chosen layer compressed on its own, on the statistics
given for it if any."""

from __future__ import annotations

from typing import Optional

from torch import nn

from matpress.methods import LayerStats
from matpress.passes.layers import LayerReport, compress_streamed_layer
from matpress.recipe import Rule
from matpress.walk import BlockSource, walk


def compress_plain(
    model: nn.Module, chosen: dict[str, Rule], stats: Optional[dict[str, LayerStats]] = None, progress: bool = True,
    source: Optional[BlockSource] = None,
) -> list[LayerReport]:
    """Compress each layer of ``chosen`` (name -> rule) in place, on its statistics in ``stats`` if any."""
    reports: dict[str, LayerReport] = {}
    for block in walk(model, list(chosen), stats=stats or {}, source=source, progress=progress, desc="compressing"):
        for stage in block.stages:
            given = block.stats(stage)
            for name in stage:
                reports[name] = compress_streamed_layer(model, name, chosen[name], given.get(name))
    return [reports[n] for n in chosen]
