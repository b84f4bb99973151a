"""What every export target shares: the model's tensors as matpress stores them, and the report of
what was written, tensor by tensor."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

import torch
from torch import nn

from matpress.formats import Format
from matpress.nn.layers import FormatModule, TiedLinear

# how an exported tensor relates to matpress's decode
EXACT, FP16_MINIMUM, REQUANTIZED, DECODED = "exact", "fp16 minimum", "re-quantized", "decoded"


@dataclass(frozen=True)
class ExportedTensor:
    """One exported tensor: its name and type in the target, the model tensor it came from, and how far the
    exported values may lie from what matpress decodes (``max_error``, absolute; ``relative_error``:
    RMS of the change over RMS of the weight)."""

    name: str
    source: str
    type_name: str
    shape: tuple[int, ...]
    how: str  # EXACT, FP16_MINIMUM, REQUANTIZED or DECODED
    max_error: float = 0.0
    relative_error: float = 0.0


@dataclass
class ExportReport:
    """What an export wrote."""

    path: Path
    tensors: list[ExportedTensor]
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = ["| tensor | from | type | shape | mapping | max added error | relative RMS error |", "|---|---|---|---|---|---|---|"]
        for t in self.tensors:
            lines.append(
                f"| {t.name} | {t.source} | {t.type_name} | {'x'.join(map(str, t.shape))} | {t.how} "
                f"| {t.max_error:.3g} | {t.relative_error:.3g} |"
            )
        types = Counter(t.type_name for t in self.tensors)
        lines.append(f"\n{len(self.tensors)} tensors ({', '.join(f'{n} {k}' for k, n in types.most_common())}) in {self.path}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


# -- the model's tensors ----------------------------------------------------------------------------


def model_tensors(model: nn.Module) -> Iterator[tuple[str, Union[Format, torch.Tensor]]]:
    """(name, stored matrix) of every compressed layer, then (name, tensor) of every other parameter once
    (a weight shared by a tied LM head is yielded for the embedding only). A tied compressed head
    stores nothing of its own and is skipped: GGUF reads a missing ``output.weight`` as tied."""
    compressed = {name: m for name, m in model.named_modules() if isinstance(m, FormatModule)}
    for name, module in compressed.items():
        if not isinstance(module, TiedLinear):
            yield f"{name}.weight", module.fmt
    for name, parameter in model.named_parameters():  # a compressed layer's only parameter is its bias
        yield name, parameter.detach()
