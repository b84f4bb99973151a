"""The plain pass: every chosen layer compressed on its own, with precomputed statistics or none."""

from __future__ import annotations

from typing import Optional

from torch import nn
from tqdm.auto import tqdm

from matpress.methods import LayerStats
from matpress.passes.layers import LayerReport, compress_streamed_layer
from matpress.recipe import Rule


def compress_plain(
    model: nn.Module, chosen: dict[str, Rule], stats: Optional[dict[str, LayerStats]] = None, progress: bool = True
) -> list[LayerReport]:
    """Compress each layer of ``chosen`` (name -> rule) in place, on its statistics in ``stats`` if any."""
    return [
        compress_streamed_layer(model, name, rule, (stats or {}).get(name))
        for name, rule in tqdm(chosen.items(), desc="compressing", unit="layer", disable=not progress)
    ]
