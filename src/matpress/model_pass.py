"""The model pass: find a model's linear layers, decide each one's rule, and replace them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from matpress.errors import CalibrationError, FormatError, RecipeError
from matpress.formats import Format
from matpress.layer import CompressedLinear
from matpress.methods import LayerStats, get_method
from matpress.recipe import RecipeLike, Rule, as_recipe

if TYPE_CHECKING:
    from matpress.calibration import CalibrationData

try:  # Hugging Face GPT-2 style layers store the weight transposed (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency, but keep the core usable without it
    Conv1D = None


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``(out_features, in_features)``."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    return module.weight.detach().t()  # Conv1D


def find_linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> layer, for every nn.Linear / Conv1D in ``model``."""
    return {name: m for name, m in model.named_modules() if is_linear(m)}


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def install_format(model: nn.Module, name: str, original: nn.Module, fmt: Format) -> None:
    """Put ``fmt`` in place of linear layer ``name`` (``original``), keeping its bias and device."""
    bias = original.bias.detach() if getattr(original, "bias", None) is not None else None
    set_submodule(model, name, CompressedLinear(fmt, bias).to(linear_weight(original).device))


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    format: str
    bits_per_weight: float
    nbytes: int
    relative_error: float

    @property
    def dense_fp32_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 4


@dataclass
class CompressionReport:
    layers: list[LayerReport]
    # under a budget: (SensitivityTable, chosen candidate per layer, Budget), see matpress.budget
    allocation: Optional[tuple] = None

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
                f"| {r.name} | {r.shape[0]}x{r.shape[1]} | {r.format} | {r.bits_per_weight:.3f} "
                f"| {r.nbytes / 1024:.1f} | {err} |"
            )
        dense = 4 * self.n_weights
        rows.append(
            f"| **total** ({len(self.layers)} layers) | | | {self.bits_per_weight:.3f} "
            f"| {self.nbytes / 1024:.1f} ({100 * self.nbytes / max(dense, 1):.1f}% of fp32) | |"
        )
        return "\n".join(rows)


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float(torch.linalg.norm(weight - approx) / torch.linalg.norm(weight).clamp(min=1e-30))


def report_of(model: nn.Module) -> CompressionReport:
    """Report of the compressed layers found in ``model`` (relative error unknown: NaN)."""
    return CompressionReport(
        [
            LayerReport(name, m.fmt.shape, m.fmt.describe(), m.fmt.bits_per_weight, m.fmt.nbytes, float("nan"))
            for name, m in model.named_modules()
            if isinstance(m, CompressedLinear)
        ]
    )


def compress_layer(
    model: nn.Module, name: str, rule: Rule, layer_stats: Optional[LayerStats] = None
) -> LayerReport:
    """Replace linear layer ``name`` of ``model`` by its compressed form under ``rule``; report it."""
    module = model.get_submodule(name)
    method = get_method(rule.method)
    if method.needs_calibration and layer_stats is None:
        raise RecipeError(f"layer {name}: method '{rule.method}' needs calibration statistics; none were given")
    weight = linear_weight(module).float()
    try:
        fmt = method.run(weight, rule.params, layer_stats)
    except (FormatError, CalibrationError) as e:
        raise type(e)(f"layer {name}: {e}") from None
    install_format(model, name, module, fmt)
    return layer_report(name, weight, fmt)


def layer_report(name: str, weight: torch.Tensor, fmt: Format) -> LayerReport:
    """The report of layer ``name``, whose dense ``weight`` is now stored as ``fmt``."""
    return LayerReport(name, fmt.shape, fmt.describe(), fmt.bits_per_weight, fmt.nbytes, relative_error(weight, fmt.decode()))


def compress(
    model: nn.Module,
    recipe: RecipeLike = None,
    stats: Optional[dict[str, LayerStats]] = None,
    progress: bool = True,
    calibration: Optional["CalibrationData"] = None,
    tokenizer: Any = None,
) -> CompressionReport:
    """Replace the linear layers of ``model`` that ``recipe`` selects with :class:`CompressedLinear`
    layers, in place, and report what each one became.

    ``recipe``: a :class:`~matpress.recipe.Recipe`, a dict, a YAML/JSON path, or None (4-bit RTN,
    g=128). Methods that need calibration (gptq, awq) take ``stats`` (per-layer statistics) when given;
    otherwise the model is compressed block by block on ``calibration`` (a
    :class:`~matpress.calibration.CalibrationData`), or on text drawn with ``tokenizer`` as the recipe's
    ``calibration`` settings say (see :mod:`matpress.calibration`).
    """
    recipe = as_recipe(recipe)
    layers = find_linear_layers(model)
    chosen = {name: rule for name in layers if (rule := recipe.rule_for(name)) is not None}
    if not chosen:
        sample = ", ".join(list(layers)[:5]) or "none"
        raise RecipeError(
            f"the recipe matches no linear layer of this {type(model).__name__}; its linear layers are: "
            f"{sample}{' ...' if len(layers) > 5 else ''}. Check include/exclude and the rule patterns."
        )
    if recipe.budget is not None:
        from matpress.budget import compress_budgeted

        return compress_budgeted(model, recipe, chosen, stats, progress=progress, calibration=calibration, tokenizer=tokenizer)
    if stats is None and any(get_method(rule.method).needs_calibration for rule in chosen.values()):
        from matpress.calibration import compress_sequential

        data = calibration if calibration is not None else recipe.calibration_data(tokenizer, model)
        return CompressionReport(compress_sequential(model, chosen, data, progress=progress))
    reports = [
        compress_layer(model, name, rule, (stats or {}).get(name))
        for name, rule in tqdm(chosen.items(), desc="compressing", unit="layer", disable=not progress)
    ]
    return CompressionReport(reports)
