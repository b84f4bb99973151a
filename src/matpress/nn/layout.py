"""The one place that knows how a model's weight matrices are laid out: ``nn.Linear`` stores
``(out, in)``, Hugging Face's GPT-2 style ``Conv1D`` the transpose; embeddings, tied LM heads, and how to
put a module in another's place. (Fused MoE experts: :mod:`matpress.nn.experts`.)"""

from __future__ import annotations

import torch
from torch import nn

from matpress.formats import Format
from matpress.nn.layers import CompressedLinear, TiedLinear

try:  # Hugging Face GPT-2 style layers store the weight transposed (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency, but keep the core usable without it
    Conv1D = None

ENCODER = "encoder"
CAUSAL_LM = "causal-lm"


def model_kind(model: nn.Module) -> str:
    """CAUSAL_LM for models with a language-modelling head, else ENCODER."""
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    if type(model).__name__.endswith("ForCausalLM") or any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return CAUSAL_LM
    return ENCODER


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


def tied_to(model: nn.Module) -> dict[str, list[str]]:
    """Compressed embedding name -> the names of the LM heads tied to it."""
    names = {id(m): name for name, m in model.named_modules()}
    heads: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, TiedLinear):
            heads.setdefault(names[id(m.source)], []).append(name)
    return heads


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def install_format(model: nn.Module, name: str, original: nn.Module, fmt: Format) -> None:
    """Put ``fmt`` in place of linear layer ``name`` (``original``), keeping its bias and device."""
    bias = original.bias.detach() if getattr(original, "bias", None) is not None else None
    set_submodule(model, name, CompressedLinear(fmt, bias).to(linear_weight(original).device))


def scale_rows(module: nn.Module, s: torch.Tensor) -> None:
    """Divide a module's output channels by ``s`` (a norm's weight vector, or a linear layer's rows)."""
    if is_linear(module) and not isinstance(module, nn.Linear):  # Conv1D stores (in, out)
        module.weight.data /= s
    else:
        module.weight.data /= s.view(-1, *[1] * (module.weight.dim() - 1))
    if getattr(module, "bias", None) is not None:
        module.bias.data /= s


def scale_inputs(module: nn.Module, s: torch.Tensor) -> None:
    """Multiply a linear layer's input columns by ``s``."""
    if isinstance(module, nn.Linear):
        module.weight.data *= s
    else:
        module.weight.data *= s.unsqueeze(1)
