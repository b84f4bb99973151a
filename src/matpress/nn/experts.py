"""Fused mixture-of-experts modules, unfused into one linear layer per expert matrix.

transformers 5 stores a MoE layer's experts as 3-D parameters of one module (``MixtralExperts`` and
its kin): ``gate_up_proj`` ``(E, 2I, H)`` and ``down_proj`` ``(E, H, I)``, expert ``e``'s slice an
``nn.Linear``-style ``(out, in)`` weight. :func:`unfuse_experts` replaces such a module by
:class:`UnfusedExperts`, which holds expert ``e``'s matrices as the linear layers
``<module>.gate_up_proj.<e>`` and ``<module>.down_proj.<e>`` and runs the original forward's loop over
the routed tokens through them (routing stays the model's: the module receives the router's choices).
From then on they are ordinary linear layers to the rest of matpress: recipe patterns name them, every
method compresses them (calibrated ones on the statistics of the tokens routed to each expert, see
:func:`expert_rule`), the kernels multiply them and checkpoints store them.

Only classes whose forward is known are unfused (:data:`SUPPORTED_EXPERTS`); other fused modules are
left dense (the uncompressed-parameter warning names them), and a rule naming them is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from matpress.errors import CheckpointError, RecipeError
from matpress.methods import LayerStats, get_method
from matpress.nn.layout import set_submodule
from matpress.recipe import Recipe, Rule

# transformers classes whose forward is the same gated loop (checked in tests/test_moe.py): per expert,
# gate, up = linear(x, gate_up_proj[e]).chunk(2); linear(act_fn(gate) * up, down_proj[e]) * routing weight
# (class name -> its model family in transformers.models)
SUPPORTED_EXPERTS = {
    "MixtralExperts": "mixtral", "Qwen2MoeExperts": "qwen2_moe", "Qwen3MoeExperts": "qwen3_moe", "OlmoeExperts": "olmoe",
    "DeepseekV3Experts": "deepseek_v3", "GraniteMoeExperts": "granitemoe", "PhimoeExperts": "phimoe",
}
PROJECTIONS = ("gate_up_proj", "down_proj")
# An expert routed fewer calibration tokens than this gets the calibration-free counterpart of its
# method: statistics of a handful of tokens would fit the error to them instead of to the distribution.
MIN_EXPERT_TOKENS = 32


def fused_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's own 3-D parameters (one slice per expert)."""
    return {name: p for name, p in module.named_parameters(recurse=False) if p.dim() == 3}


def find_fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module, for every module holding 3-D (per-expert) parameters of its own."""
    return {name: m for name, m in model.named_modules() if fused_parameters(m)}


def expert_names(name: str, module: nn.Module) -> list[str]:
    """The names expert matrices of fused module ``name`` take once unfused: ``<name>.<param>.<e>``."""
    return [f"{name}.{p}.{e}" for p, t in fused_parameters(module).items() for e in range(t.shape[0])]


def unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot be unfused exactly, or None when it can."""
    cls = type(module)
    family = SUPPORTED_EXPERTS.get(cls.__name__)
    if family is None or cls.__module__ != f"transformers.models.{family}.modeling_{family}":
        return f"{cls.__name__} is not a fused-experts class matpress knows ({', '.join(sorted(SUPPORTED_EXPERTS))})"
    layout = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True, "has_post_expert_norm": False}
    for flag, expected in layout.items():
        if getattr(module, flag, expected) != expected:
            return f"{cls.__name__} has {flag}={not expected}, a layout matpress does not unfuse"
    params = fused_parameters(module)
    if set(params) != set(PROJECTIONS):
        return f"{cls.__name__} holds the 3-D parameters {sorted(params)}, not {list(PROJECTIONS)}"
    (e, two_i, h), (e2, h2, i) = params["gate_up_proj"].shape, params["down_proj"].shape
    if (e2, h2, 2 * i) != (e, h, two_i) or e != module.num_experts:
        return f"{cls.__name__}'s gate_up_proj {tuple(params['gate_up_proj'].shape)} and down_proj {(e2, h2, i)} do not fit"
    return None


def _linear(weight: torch.Tensor, requires_grad: bool) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)  # own storage: saved apart
    return layer


class UnfusedExperts(nn.Module):
    """A fused experts module with each expert's matrices as linear layers ``gate_up_proj[e]``
    ``(2I, H)`` and ``down_proj[e]`` ``(H, I)``; ``forward`` is the original's loop over the experts the
    router chose, through those layers (an ``nn.Linear`` or a compressed one)."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.fused_class = type(fused).__name__
        self.num_experts = fused.num_experts
        self.act_fn = fused.act_fn
        for projection in PROJECTIONS:
            stacked = getattr(fused, projection)
            setattr(self, projection, nn.ModuleList(_linear(w, stacked.requires_grad) for w in stacked))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():  # (expert, top-k slot, token): which tokens chose which expert
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for hit in expert_hit:
            e = int(hit[0])
            if e == self.num_experts:  # the sentinel of expert parallelism: no local expert
                continue
            top_k_pos, token_idx = torch.where(expert_mask[e])
            gate, up = self.gate_up_proj[e](hidden_states[token_idx]).chunk(2, dim=-1)
            out = self.down_proj[e](self.act_fn(gate) * up) * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, out.to(final_hidden_states.dtype))
        return final_hidden_states

    def extra_repr(self) -> str:
        return f"unfused {self.fused_class}, num_experts={self.num_experts}"


def unfuse_experts(model: nn.Module, recipe: Recipe) -> list[str]:
    """Unfuse, in place, every fused experts module of ``model`` with an expert matrix ``recipe``
    selects; return their names. A module of an unknown class is left fused (and dense) when only the
    default rule would reach it, and refused when a rule names one of its experts."""
    unfused = []
    for name, module in find_fused_experts(model).items():
        names = [n for n in expert_names(name, module) if recipe.rule_for(n) is not None]
        if not names:
            continue
        reason = unsupported_reason(module)
        if reason is not None:
            named = [n for n in names if recipe.pinned_rule(n) is not None]
            if named:
                raise RecipeError(
                    f"fused experts {name}: {reason}, so its expert matrices (e.g. {named[0]}) cannot be "
                    f"compressed yet; drop the rule naming them, or exclude them with exclude: ['{name}.*']"
                )
            continue
        set_submodule(model, name, UnfusedExperts(module))
        unfused.append(name)
    return unfused


def unfused_experts(model: nn.Module) -> dict[str, str]:
    """Name -> original class of every :class:`UnfusedExperts` in ``model`` (what a checkpoint records)."""
    return {name: m.fused_class for name, m in model.named_modules() if isinstance(m, UnfusedExperts)}


def unfuse_recorded(model: nn.Module, recorded: object, where: str) -> None:
    """Unfuse the experts modules a checkpoint recorded (name -> class) in the freshly built ``model``,
    so that its expert layers and tensors line up with the file's."""
    if not isinstance(recorded, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()):
        raise CheckpointError(f"{where}: 'experts' must map module names to class names, got {recorded!r}")
    fused = find_fused_experts(model)
    for name, cls in recorded.items():
        module = fused.get(name)
        if module is None or type(module).__name__ != cls or unsupported_reason(module) is not None:
            raise CheckpointError(f"{where}: the model has no fused {cls} experts module {name} that matpress can unfuse")
        set_submodule(model, name, UnfusedExperts(module))


def is_expert(model: nn.Module, name: str) -> bool:
    """Whether linear layer ``name`` is an expert matrix of an :class:`UnfusedExperts`."""
    parent = name.rsplit(".", 2)[0]
    return parent != name and isinstance(model.get_submodule(parent), UnfusedExperts)


# The calibration-free method each calibrated one falls back to for a starved expert, keeping the
# parameters they share; eora (a quantized weight plus a low-rank correction fit to the statistics) has none.
CALIBRATION_FREE = {
    "gptq": "rtn", "awq": "rtn", "wanda": "magnitude", "sparsegpt": "magnitude", "svd_llm": "svd",
    "monarch_aw": "monarch", "ternary_calibrated": "ternary", "gptq_codebook": "codebook",
}


def calibration_free_counterpart(rule: Rule) -> Optional[Rule]:
    """``rule`` under the calibration-free counterpart of its method (:data:`CALIBRATION_FREE`) with the
    parameters the two share, or None when it has none."""
    fallback = CALIBRATION_FREE.get(rule.method)
    if fallback is None:
        return None
    method = get_method(fallback)
    shared = {f.name: getattr(rule.params, f.name) for f in dataclasses.fields(method.params_type) if hasattr(rule.params, f.name)}
    return Rule(fallback, method.make_params(shared, f"fallback of {rule.method}"), rule.pattern)


def expert_rule(model: nn.Module, name: str, rule: Rule, stats: Optional[LayerStats]) -> tuple[Rule, str]:
    """The rule layer ``name`` is compressed with, and a note for the report: see :func:`starved_rule`
    for an expert; other layers keep ``rule`` (and no note)."""
    return starved_rule(name, rule, stats) if is_expert(model, name) else (rule, "")


def starved_rule(name: str, rule: Rule, stats: Optional[LayerStats]) -> tuple[Rule, str]:
    """The rule expert ``name`` is compressed with, and a note for the report: routed fewer than
    :data:`MIN_EXPERT_TOKENS` calibration tokens, it falls back from a calibrated method to the method's
    calibration-free counterpart."""
    n_tokens = 0 if stats is None else stats.n_tokens
    if not get_method(rule.method).needs_calibration or n_tokens >= MIN_EXPERT_TOKENS:
        return rule, ""
    fallback = calibration_free_counterpart(rule)
    if fallback is None:
        raise RecipeError(
            f"expert {name} was routed {n_tokens} calibration tokens (fewer than {MIN_EXPERT_TOKENS}), and method "
            f"'{rule.method}' has no calibration-free counterpart to fall back to; use more calibration samples "
            "or a calibration-free method (rtn, hqq, ...) for the experts"
        )
    return fallback, f"{fallback.method} fallback: {n_tokens} calibration tokens routed"
