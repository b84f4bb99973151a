"""One layer at a time: run a rule's method on a layer's weight, put the format in the layer's place,
and report it; the report of a compressed model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from matpress.errors import CalibrationError, FormatError, RecipeError
from matpress.formats import Format
from matpress.formats.packing import row_chunks
from matpress.methods import LayerStats, get_method
from matpress.nn.experts import expert_rule
from matpress.nn.layers import CompressedEmbedding, FormatModule, TiedLinear, check_plain_embedding
from matpress.nn.layout import install_format, linear_weight, set_submodule, tied_to
from matpress.recipe import Rule
from matpress.walk.source import materialised

if TYPE_CHECKING:
    from matpress.passes.budget.measurement import Allocation

@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    format: str
    bits_per_weight: float
    nbytes: int
    relative_error: float
    shared_with: tuple[str, ...] = ()  # layers using this one's stored matrix (a tied LM head)
    note: str = ""  # e.g. an expert's fallback to a calibration-free method

    @property
    def label(self) -> str:
        return f"{self.name} (shared with {', '.join(self.shared_with)})" if self.shared_with else self.name

    @property
    def dense_fp32_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 4


@dataclass
class CompressionReport:
    layers: list[LayerReport]
    allocation: Optional["Allocation"] = None  # under a budget: the table, the choice and the budget

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def n_weights(self) -> int:
        return sum(layer.shape[0] * layer.shape[1] for layer in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(self.n_weights, 1)

    def table(self) -> str:
        """Markdown table, one row per compressed layer, and a total."""
        rows = ["| layer | shape | format | bits/weight | KiB | rel. error |", "|---|---|---|---|---|---|"]
        for r in self.layers:
            err = "" if r.relative_error != r.relative_error else f"{r.relative_error:.4f}"
            rows.append(
                f"| {r.label} | {r.shape[0]}x{r.shape[1]} | {r.format}{f' ({r.note})' if r.note else ''} | {r.bits_per_weight:.3f} "
                f"| {r.nbytes / 1024:.1f} | {err} |"
            )
        dense = 4 * self.n_weights
        rows.append(
            f"| **total** ({len(self.layers)} layers) | | | {self.bits_per_weight:.3f} "
            f"| {self.nbytes / 1024:.1f} ({100 * self.nbytes / max(dense, 1):.1f}% of fp32) | |"
        )
        return "\n".join(rows)


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||weight - approx|| / ||weight||``, the difference taken a few rows at a time (not a third copy
    of a big matrix)."""
    squared = sum(float(torch.linalg.vector_norm(weight[rows] - approx[rows])) ** 2 for rows in row_chunks(*weight.shape))
    return squared**0.5 / max(float(torch.linalg.vector_norm(weight)), 1e-30)


def report_of(model: nn.Module) -> CompressionReport:
    """Report of the compressed layers found in ``model`` (relative error unknown: NaN)."""
    heads = tied_to(model)
    return CompressionReport(
        [
            LayerReport(
                name, m.fmt.shape, m.fmt.describe(), m.fmt.bits_per_weight, m.fmt.nbytes, float("nan"),
                tuple(heads.get(name, ())),
            )
            for name, m in model.named_modules()
            if isinstance(m, FormatModule) and not isinstance(m, TiedLinear)
        ]
    )


def run_method(name: str, rule: Rule, weight: torch.Tensor, layer_stats: Optional[LayerStats]) -> Format:
    """``rule``'s method on layer ``name``'s dense ``weight``, errors naming the layer."""
    method = get_method(rule.method)
    if method.needs_calibration and layer_stats is None:
        raise RecipeError(f"layer {name}: method '{rule.method}' needs calibration statistics; none were given")
    try:
        return method.run(weight, rule.params, layer_stats)
    except (FormatError, CalibrationError) as e:
        raise type(e)(f"layer {name}: {e}") from None


def compress_layer(
    model: nn.Module, name: str, rule: Rule, layer_stats: Optional[LayerStats] = None
) -> LayerReport:
    """Replace linear layer ``name`` of ``model`` by its compressed form under ``rule`` (an expert short
    of calibration tokens under its fallback, see :func:`matpress.nn.experts.expert_rule`); report it."""
    module = model.get_submodule(name)
    weight = linear_weight(module).float()
    rule, note = expert_rule(model, name, rule, layer_stats)
    fmt = run_method(name, rule, weight, layer_stats)
    install_format(model, name, module, fmt)
    report = layer_report(name, weight, fmt)
    if getattr(rule.params, "asymmetric", 0) and layer_stats is not None and layer_stats.cross is None:
        # (an expert's routed tokens, or statistics given rather than collected by the sequential pass)
        note = "; ".join(filter(None, [note, "asymmetric target not applied: no reference inputs"]))
    report.note = note
    return report


def compress_streamed_layer(model: nn.Module, name: str, rule: Rule, layer_stats: Optional[LayerStats] = None) -> LayerReport:
    """:func:`compress_layer` with the layer's weights read first on a streamed model (:mod:`matpress.walk.source`)."""
    with materialised(model, name):
        return compress_layer(model, name, rule, layer_stats)


def check_embedding_rule(module: nn.Module, name: str, rule: Rule) -> None:
    """Refuse an embedding that cannot be compressed exactly, or a method that needs input statistics."""
    check_plain_embedding(module, name)
    if get_method(rule.method).needs_calibration:
        raise RecipeError(
            f"embedding {name}: method '{rule.method}' needs calibration statistics of the layer's inputs, which "
            "an embedding (a row lookup by token id) does not have; use a calibration-free method for it, "
            "such as rtn, hqq or dense"
        )


def compress_embedding(model: nn.Module, name: str, rule: Rule, heads: list[str]) -> LayerReport:
    """Replace embedding ``name`` of ``model`` by a :class:`CompressedEmbedding` under ``rule`` (checked
    with :func:`check_embedding_rule`), and the LM ``heads`` tied to it by :class:`TiedLinear` layers
    sharing its one stored format; report it."""
    module = model.get_submodule(name)
    weight = module.weight.detach().float()
    fmt = run_method(name, rule, weight, None)
    embedding = CompressedEmbedding(fmt, module.padding_idx).to(module.weight.device)
    set_submodule(model, name, embedding)
    for head in heads:
        bias = getattr(model.get_submodule(head), "bias", None)
        set_submodule(model, head, TiedLinear(embedding, bias))
    return layer_report(name, weight, fmt, tuple(heads))


def layer_report(name: str, weight: torch.Tensor, fmt: Format, shared_with: tuple[str, ...] = ()) -> LayerReport:
    """The report of layer ``name``, whose dense ``weight`` is now stored as ``fmt``."""
    return LayerReport(
        name, fmt.shape, fmt.describe(), fmt.bits_per_weight, fmt.nbytes, relative_error(weight, fmt.decode()), shared_with
    )


