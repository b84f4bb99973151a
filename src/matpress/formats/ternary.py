"""Ternary weights: values in {-1, 0, +1} times an fp16 scale per output channel or per group of input
columns, packed five trits per byte (1.6 bits per weight plus the scales).

BitNet b1.58 (Ma et al. 2024, "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits") and
the MatMul-free LM (Zhu et al. 2024, "Scalable MatMul-free Language Modeling") use such weights: a
product by a ternary matrix needs only additions and subtractions, then one multiply per group.

``W[o, i] = trits[o, i] * group_scales[o, i // group_size]``. When ``in_features`` is not a multiple of
``group_size`` the last group of each row is shorter.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from matpress.errors import FormatError
from matpress.formats.base import Format, check_stored, check_weight, config_values, expect_tensor, fp16_factor
from matpress.formats.integer import resolve_group_size, to_fp16_scale
from matpress.formats.packing import check_trit_bytes, pack_trits, packed_trit_row_bytes, unpack_trits


def group_means(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean of each group of ``group_size`` consecutive columns of ``values`` ``(out, in)`` over its real
    columns (a short last group is averaged over its own length): ``(out, n_groups)``."""
    out_f, in_f = values.shape
    pad = (-in_f) % group_size
    sums = torch.nn.functional.pad(values, (0, pad)).reshape(out_f, -1, group_size).sum(dim=-1)
    counts = torch.full((sums.shape[1],), float(group_size), device=values.device)
    counts[-1] = group_size - pad
    return sums / counts


def expand_groups(per_group: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """``(out, n_groups)`` -> ``(out, in_features)``, each group's value repeated over its columns."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :in_features]


def absmean_trits(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 absmean rounding: ``gamma`` = mean |W| of each group, ``T = clamp(round(W / gamma),
    -1, 1)``, with ``gamma`` rounded up to fp16 first so the trits fit the stored scale. Returns
    ``(trits int8 (out, in), gamma fp32 holding fp16 values (out, n_groups))``."""
    gamma = to_fp16_scale(group_means(weight.abs(), group_size))
    trits = torch.clamp(torch.round(weight / expand_groups(gamma, group_size, weight.shape[1])), -1, 1)
    return trits.to(torch.int8), gamma


class TernaryFormat(Format):
    """Trits packed at 5 per byte with one fp16 scale per (row, group)."""

    name = "ternary"

    def __init__(self, shape: tuple[int, int], group_size: int, packed: torch.Tensor, scales: torch.Tensor):
        super().__init__(shape)
        if not isinstance(group_size, int) or isinstance(group_size, bool) or not 1 <= group_size <= self.in_features:
            raise FormatError(
                f"ternary format: group_size must be an integer from 1 to in_features={self.in_features}, "
                f"got {group_size!r}"
            )
        self.group_size = group_size
        self.n_groups = math.ceil(self.in_features / group_size)
        row_bytes = packed_trit_row_bytes(self.in_features)
        self.packed = expect_tensor({"packed": packed}, "packed", (self.out_features, row_bytes), torch.uint8, self.name)
        check_trit_bytes(self.packed)
        self.scales = expect_tensor(
            {"scales": scales}, "scales", (self.out_features, self.n_groups), torch.float16, self.name
        )

    @classmethod
    def from_trits(cls, trits: torch.Tensor, scales: torch.Tensor, group_size: int) -> "TernaryFormat":
        """Build from trits ``(out, in)`` in {-1, 0, 1} and per-group scales ``(out, n_groups)``."""
        return cls(tuple(trits.shape), group_size, pack_trits(trits), fp16_factor(scales, "ternary format: a scale"))

    @classmethod
    def encode(cls, weight: torch.Tensor, group_size: Optional[int] = None) -> "TernaryFormat":
        """Absmean rounding (BitNet b1.58), one scale per output channel (``group_size=None``) or per
        group of ``group_size`` input columns."""
        check_weight(weight)
        w = weight.detach().float()
        group = resolve_group_size(group_size, w.shape[1])
        trits, gamma = absmean_trits(w, group)
        return cls.from_trits(trits, gamma, group)

    def trits(self) -> torch.Tensor:
        """The ternary values, int8 ``(out, in)`` in {-1, 0, 1}."""
        return unpack_trits(self.packed, self.in_features)

    def group_scales(self) -> torch.Tensor:
        """Per-group scales, fp32 ``(out, n_groups)``."""
        return self.scales.float()

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = expand_groups(self.group_scales(), self.group_size, self.in_features)
        return (self.trits().float() * scale).to(dtype)

    def config(self) -> dict[str, Any]:
        return {"group_size": self.group_size}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scales": self.scales}

    @classmethod
    def from_tensors(
        cls, shape: tuple[int, int], config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> "TernaryFormat":
        (group_size,) = config_values("ternary", config, "group_size")
        check_stored("ternary", tensors, {"packed", "scales"})
        return cls(shape, group_size, tensors.get("packed"), tensors.get("scales"))

    def describe(self) -> str:
        return "ternary " + ("ch" if self.group_size == self.in_features else f"g{self.group_size}")
