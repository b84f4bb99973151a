"""The compression pipeline: find a model's linear layers (and the embeddings a rule names), decide each
one's rule, and run the pass the recipe asks for (:func:`choose_pass`): plain, sequential calibrated or
budgeted; then warn about any big weight left uncompressed."""

from __future__ import annotations

import warnings
from typing import Any, Optional

from torch import nn
from tqdm.auto import tqdm

from matpress.errors import RecipeError
from matpress.methods import LayerStats, get_method
from matpress.nn.experts import SUPPORTED_EXPERTS, unfuse_experts
from matpress.nn.layers import FormatModule
from matpress.nn.layout import find_embeddings, find_linear_layers, tied_heads
from matpress.passes.budget import compress_budgeted
from matpress.passes.context import PassContext
from matpress.passes.layers import CompressionReport, LayerReport, check_embedding_rule, compress_embedding
from matpress.passes.plain import compress_plain
from matpress.passes.sequential import compress_sequential
from matpress.recipe import Recipe, RecipeLike, Rule, as_recipe, name_matches
from matpress.walk.source import materialised
from matpress.walk.data import CalibrationData, calibration_data

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
            stacklevel=4,  # the caller of matpress.compress (through passes.compress)
        )


def compress(
    model: nn.Module,
    recipe: RecipeLike = None,
    stats: Optional[dict[str, LayerStats]] = None,
    progress: bool = True,
    calibration: Optional[CalibrationData] = None,
    tokenizer: Any = None,
) -> CompressionReport:
    """Replace the linear layers of ``model`` that ``recipe`` selects with :class:`CompressedLinear`
    layers, in place, and report what each one became.

    ``recipe``: a :class:`~matpress.recipe.Recipe`, a dict, a YAML/JSON path, or None (4-bit RTN,
    g=128). Methods that need calibration (gptq, awq) take ``stats`` (per-layer statistics) when given;
    otherwise the model is compressed block by block on ``calibration`` (a
    :class:`~matpress.walk.CalibrationData`), or on text drawn with ``tokenizer`` as the recipe's
    ``calibration`` settings say (see :mod:`matpress.recipe.calibration`).

    The fused experts of a mixture-of-experts layer (Mixtral, Qwen-MoE, ...) are first unfused into one
    linear layer per expert matrix, ``<experts>.gate_up_proj.<e>`` and ``<experts>.down_proj.<e>``
    (:mod:`matpress.nn.experts`), and compressed like any other linear layer.

    Embeddings that a rule names become :class:`~matpress.nn.CompressedEmbedding` layers (with a
    calibration-free method), and an LM head tied to one shares its stored format; under a size budget
    they are compressed as their rule says, outside the budget (which counts the linear layers). Afterwards one
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
    report = run_pass(model, recipe, chosen, PassContext(stats, calibration, tokenizer, progress=progress))
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
    reports = []
    for name, rule in tqdm(chosen.items(), desc="compressing embeddings", unit="layer", disable=not progress or not chosen):
        with materialised(model, name):
            reports.append(compress_embedding(model, name, rule, [h for h, e in heads.items() if e == name]))
    return reports


def run_pass(model: nn.Module, recipe: Recipe, chosen: dict[str, Rule], context: PassContext) -> CompressionReport:
    """The linear layers in ``chosen`` by the pass the recipe asks for: budgeted, sequential
    (calibrated methods without precomputed statistics) or plain (layer by layer)."""
    if recipe.budget is not None:
        return compress_budgeted(model, recipe, chosen, context)
    if context.stats is None and any(get_method(rule.method).needs_calibration for rule in chosen.values()):
        data = context.calibration if context.calibration is not None else calibration_data(recipe.calibration, context.tokenizer, model)
        return CompressionReport(compress_sequential(model, chosen, data, context.progress, context.source))
    return CompressionReport(compress_plain(model, chosen, context.stats, context.progress, context.source))
