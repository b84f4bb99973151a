"""The model pass: find a model's linear layers (and the embeddings a rule names), decide each one's
rule, and replace them; then warn about any big weight left uncompressed."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from matpress.errors import CalibrationError, FormatError, RecipeError
from matpress.experts import SUPPORTED_EXPERTS, expert_rule, unfuse_experts
from matpress.formats import Format
from matpress.layer import CompressedEmbedding, CompressedLinear, FormatModule, TiedLinear, check_plain_embedding
from matpress.methods import LayerStats, get_method
from matpress.recipe import Recipe, RecipeLike, Rule, as_recipe, name_matches

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


def find_embeddings(model: nn.Module) -> dict[str, nn.Embedding]:
    """Qualified name -> layer, for every nn.Embedding in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Embedding)}


def tied_heads(linears: dict[str, nn.Module], embeddings: dict[str, nn.Embedding]) -> dict[str, str]:
    """Linear layer name -> name of the embedding whose very weight it multiplies by (a tied LM head)."""
    owner = {id(m.weight): name for name, m in embeddings.items()}
    return {name: owner[id(m.weight)] for name, m in linears.items() if id(m.weight) in owner}


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
    return float(torch.linalg.norm(weight - approx) / torch.linalg.norm(weight).clamp(min=1e-30))


def tied_to(model: nn.Module) -> dict[str, list[str]]:
    """Compressed embedding name -> the names of the LM heads tied to it."""
    names = {id(m): name for name, m in model.named_modules()}
    heads: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, TiedLinear):
            heads.setdefault(names[id(m.source)], []).append(name)
    return heads


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
    of calibration tokens under its fallback, see :func:`matpress.experts.expert_rule`); report it."""
    module = model.get_submodule(name)
    weight = linear_weight(module).float()
    rule, note = expert_rule(model, name, rule, layer_stats)
    fmt = run_method(name, rule, weight, layer_stats)
    install_format(model, name, module, fmt)
    report = layer_report(name, weight, fmt)
    report.note = note
    return report


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


UNCOMPRESSED_SHARE = 0.01  # parameters at least this share of the model's weights are named when left dense


def uncompressed_weights(model: nn.Module, share: float = UNCOMPRESSED_SHARE) -> list[tuple[str, tuple[int, ...], float]]:
    """(names, shape, share of the model's weights) of every parameter holding at least ``share`` of them
    that is still dense; tied names are joined with ' = '. Compressed layers count once each."""
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    stored = {id(m.fmt): m.fmt.shape for m in model.modules() if isinstance(m, FormatModule)}
    total = sum(p.numel() for p in params.values()) + sum(rows * cols for rows, cols in stored.values())
    return [
        (" = ".join(names[key]), tuple(p.shape), p.numel() / total)
        for key, p in params.items()
        if total and p.numel() >= share * total
    ]


def warn_uncompressed(model: nn.Module) -> None:
    """One warning listing the big parameters left uncompressed, so nothing is skipped silently."""
    left = uncompressed_weights(model)
    if left:
        listed = "; ".join(f"{name} {'x'.join(map(str, shape))} ({100 * part:.1f}%)" for name, shape, part in left)
        warnings.warn(
            f"left uncompressed (each at least {100 * UNCOMPRESSED_SHARE:g}% of the model's weights): {listed}. "
            "Embeddings and LM heads are compressed only when a rule names them; other layers only when "
            "matpress knows their kind (nn.Linear, Conv1D, nn.Embedding, the fused experts of "
            f"{', '.join(sorted(SUPPORTED_EXPERTS))}).",
            stacklevel=3,
        )


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

    The fused experts of a mixture-of-experts layer (Mixtral, Qwen-MoE, ...) are first unfused into one
    linear layer per expert matrix, ``<experts>.gate_up_proj.<e>`` and ``<experts>.down_proj.<e>``
    (:mod:`matpress.experts`), and compressed like any other linear layer.

    Embeddings that a rule names become :class:`~matpress.layer.CompressedEmbedding` layers (with a
    calibration-free method), and an LM head tied to one shares its stored format. Afterwards one
    warning lists every parameter of at least 1 % of the model's weights that is still dense.
    """
    recipe = as_recipe(recipe)
    unfuse_experts(model, recipe)
    embedded = compress_embeddings(model, recipe, progress)
    layers = find_linear_layers(model)
    heads = tied_heads(layers, find_embeddings(model))
    chosen = {name: rule for name in layers if name not in heads and (rule := recipe.rule_for(name)) is not None}
    if not chosen and not embedded:
        sample = ", ".join(list(layers)[:5]) or "none"
        raise RecipeError(
            f"the recipe matches no linear layer of this {type(model).__name__}; its linear layers are: "
            f"{sample}{' ...' if len(layers) > 5 else ''}. Check include/exclude and the rule patterns."
        )
    report = _compress_linears(model, recipe, chosen, stats, progress, calibration, tokenizer)
    report.layers[:0] = embedded
    warn_uncompressed(model)
    return report


def compress_embeddings(model: nn.Module, recipe: Recipe, progress: bool = True) -> list[LayerReport]:
    """Compress the embeddings that a rule of ``recipe`` names (the default rule never applies to
    them), each with the LM heads tied to it; check first that every rule names some layer."""
    embeddings = find_embeddings(model)
    layers = find_linear_layers(model)
    names = list(embeddings) + list(layers)
    for rule in recipe.rules:
        if not any(name_matches(rule.pattern, n) for n in names):
            sample = ", ".join(names[:8])
            raise RecipeError(
                f"rule {rule.pattern!r} matches no layer of this {type(model).__name__}; its layers are: {sample}"
                f"{' ...' if len(names) > 8 else ''}. Fix the pattern or drop the rule."
            )
    heads = tied_heads(layers, embeddings)
    chosen = {name: rule for name in embeddings if (rule := recipe.rule_for(name, use_default=False)) is not None}
    for head, embedding in heads.items():
        rule = recipe.rule_for(head, use_default=False)
        if rule is not None and chosen.get(embedding) != rule:
            raise RecipeError(
                f"layer {head} is tied to the embedding {embedding} (one shared weight), so it is stored as the "
                f"embedding is: name {embedding} in the rule instead of {head}; the head then shares its stored format"
            )
    for name, rule in chosen.items():
        check_embedding_rule(embeddings[name], name, rule)
    if chosen and recipe.budget is not None:
        raise RecipeError(
            f"a size budget does not cover embeddings yet, and a rule names {sorted(chosen)}: drop that rule "
            "under a budget, or compress without one"
        )
    return [
        compress_embedding(model, name, rule, [h for h, e in heads.items() if e == name])
        for name, rule in tqdm(chosen.items(), desc="compressing embeddings", unit="layer", disable=not progress or not chosen)
    ]


def _compress_linears(
    model: nn.Module,
    recipe: Recipe,
    chosen: dict[str, Rule],
    stats: Optional[dict[str, LayerStats]],
    progress: bool,
    calibration: Optional["CalibrationData"],
    tokenizer: Any,
) -> CompressionReport:
    """The linear layers in ``chosen`` by the pipeline the recipe asks for: budgeted, sequential
    (calibrated methods without precomputed ``stats``) or layer by layer."""
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
