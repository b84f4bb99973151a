"""Affine integer quantization, 1 to 8 bits, per output channel or per group of input columns.

Each group of ``group_size`` consecutive input columns of a row has its own fp16 scale ``s`` (and, when
asymmetric, an fp16 zero point ``z``); a weight is stored as a ``bits``-bit code ``q`` and represents
``(q - z) * s``. Symmetric quantization uses the fixed zero ``2**(bits-1)`` and stores no zeros.
Codes are bit-packed (see :mod:`matpress.formats.packing`), so 4-bit weights take half a byte.

When ``in_features`` is not a multiple of ``group_size`` the last group of each row is shorter; its
parameters come from its real columns only.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from matpress.errors import FormatError, quote
from matpress.formats.base import Format, check_stored, check_weight, config_values, expect_tensor, is_positive_int
from matpress.formats.packing import pack_rows, packed_row_bytes, unpack_rows

FP16_MIN_NORMAL = 2.0**-14
FP16_MAX = 65504.0
# Largest integer zero point fp16 holds exactly.
FP16_EXACT_INT = 2048


def resolve_group_size(group_size: int | None, in_features: int) -> int:
    """Columns per group; ``None`` (or -1) means one group per output channel."""
    if group_size is None or group_size == -1:
        return in_features
    if not is_positive_int(group_size):
        raise FormatError(f"group_size must be a positive integer or None (per channel), got {group_size!r}")
    return min(group_size, in_features)


def check_bits(bits: Any) -> int:
    if not is_positive_int(bits) or bits > 8:
        raise FormatError(f"int format: bits must be an integer from 1 to 8, got {quote(bits)}")
    return bits


def grouped(weight: torch.Tensor, group: int) -> torch.Tensor:
    """View ``(out, in)`` as ``(out, n_groups, group)``, padding a short last group by repeating its
    last real column (which leaves the group's min and max unchanged)."""
    out_f, in_f = weight.shape
    pad = (-in_f) % group
    if pad:
        weight = torch.cat([weight, weight[:, -1:].expand(out_f, pad)], dim=1)
    return weight.reshape(out_f, -1, group)


def ungrouped(w: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`grouped`: ``(out, n_groups, group)`` -> ``(out, in_features)``."""
    return w.reshape(w.shape[0], -1)[:, :in_features]


def to_fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round scales *up* to fp16-representable values, so the quantization grid still covers the group
    (rounding down would clip the extremes by more than half a step)."""
    scale = scale.float().clamp(min=FP16_MIN_NORMAL)
    if float(scale.max()) * (1 + 2**-10) > FP16_MAX:
        raise FormatError(
            f"a quantization scale of {float(scale.max()):.3g} overflows fp16; the weight's range is too "
            "large for fp16 scales (check the layer for exploding weights)"
        )
    # fp16 keeps 11 significant bits: rounding (1 + 2^-10) * s to nearest never lands below s.
    return (scale * (1 + 2**-10)).half().float()


def rtn_parameters(
    groups: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point of each group of ``groups`` (``(..., group)``), in fp32 holding
    fp16-exact values. Returns ``(scale, zero)`` shaped ``groups.shape[:-1]``."""
    levels = (1 << bits) - 1
    if symmetric:
        absmax = groups.abs().amax(dim=-1)
        scale = to_fp16_scale(2 * absmax / levels)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
        return scale, zero
    wmin = groups.amin(dim=-1)
    wmax = groups.amax(dim=-1)
    far = (wmin / torch.clamp((wmax - wmin) / levels, min=FP16_MIN_NORMAL)).abs() > FP16_EXACT_INT - levels
    if far.any():  # groups far from zero: take zero into the range so the zero point stays fp16-exact
        wmin = torch.where(far, wmin.clamp(max=0), wmin)
        wmax = torch.where(far, wmax.clamp(min=0), wmax)
    scale = to_fp16_scale((wmax - wmin) / levels)
    zero = torch.round(-wmin / scale)
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Nearest code of ``w`` on the grid ``(q - zero) * scale``, ``q`` in ``[0, 2**bits)``; broadcasts
    (``zero`` no wider than ``w / scale``). One temporary the size of ``w``: the steps work in place."""
    return torch.div(w, scale).add_(zero).round_().clamp_(0, (1 << bits) - 1)


def fake_quantize(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``(q - zero) * scale`` for the nearest codes ``q`` of ``groups`` ``(..., group)`` on the grid of
    the per-group ``scale`` and ``zero`` ``(...)``: what the ``int`` format would decode, without packing."""
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return (quantize_codes(groups, s, z, bits) - z) * s


class IntFormat(Format):
    """Grouped affine integer quantization with real bit-packing and fp16 scales/zeros."""

    name = "int"

    def __init__(
        self,
        shape: tuple[int, int],
        bits: int,
        group_size: int | None,
        symmetric: bool,
        packed: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
    ):
        super().__init__(shape)
        self.bits = check_bits(bits)
        self.group_size = group_size
        self.group = resolve_group_size(group_size, self.in_features)
        self.symmetric = bool(symmetric)
        self.n_groups = math.ceil(self.in_features / self.group)
        row_bytes = packed_row_bytes(self.in_features, bits) if bits < 8 else self.in_features
        self.packed = expect_tensor({"packed": packed}, "packed", (self.out_features, row_bytes), torch.uint8, self.name)
        grid = (self.out_features, self.n_groups)
        self.scales = expect_tensor({"scales": scales}, "scales", grid, torch.float16, self.name)
        if self.symmetric:
            if zeros is not None:
                raise FormatError("int format: symmetric quantization stores no zero points")
            self.zeros = None
        else:
            self.zeros = expect_tensor({"zeros": zeros}, "zeros", grid, torch.float16, self.name)

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int,
        group_size: int | None,
        symmetric: bool,
    ) -> "IntFormat":
        """Build from unpacked codes ``(out, in)`` and per-group ``scale``/``zero`` ``(out, n_groups)``."""
        packed = pack_rows(codes, bits)
        zeros = None if symmetric else zero.to(torch.float16)
        return cls(tuple(codes.shape), bits, group_size, symmetric, packed, scale.to(torch.float16), zeros)

    @classmethod
    def encode(
        cls,
        weight: torch.Tensor,
        bits: int = 4,
        group_size: int | None = 128,
        symmetric: bool = False,
    ) -> "IntFormat":
        """Round-to-nearest quantization with min-max scales."""
        check_weight(weight)
        check_bits(bits)
        w = weight.detach().float()
        group = resolve_group_size(group_size, w.shape[1])
        g = grouped(w, group)
        scale, zero = rtn_parameters(g, bits, symmetric)
        codes = quantize_codes(g, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
        return cls.from_codes(ungrouped(codes, w.shape[1]), scale, zero, bits, group_size, symmetric)

    # -- reading --------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Unpacked codes, ``(out, in)`` uint8."""
        return unpack_rows(self.packed, self.bits, self.in_features)

    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group scale and zero point as fp32 ``(out, n_groups)``."""
        scale = self.scales.float()
        if self.symmetric:
            zero = torch.full_like(scale, float(1 << (self.bits - 1)))
        else:
            zero = self.zeros.float()
        return scale, zero

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale, zero = self.scale_zero()
        q = grouped(self.codes().float(), self.group)
        w = q.sub_(zero.unsqueeze(-1)).mul_(scale.unsqueeze(-1))  # in place: one fp32 copy of the matrix
        return ungrouped(w, self.in_features).to(dtype)

    def decode_rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Unpack only the rows looked up: each row's codes, scales and zeros are its own, so the rows
        decode to exactly the values of :meth:`decode`."""
        index = index.to(self.packed.device)
        if index.numel() == 0:
            return torch.empty(0, self.in_features, dtype=dtype, device=self.packed.device)
        zeros = None if self.zeros is None else self.zeros[index]
        rows = IntFormat(
            (index.numel(), self.in_features), self.bits, self.group_size, self.symmetric,
            self.packed[index], self.scales[index], zeros,
        )
        return rows.decode(dtype)

    # -- storage --------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"packed": self.packed, "scales": self.scales}
        if self.zeros is not None:
            tensors["zeros"] = self.zeros
        return tensors

    @classmethod
    def from_tensors(
        cls, shape: tuple[int, int], config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> "IntFormat":
        bits, group_size, symmetric = config_values("int", config, "bits", "group_size", "symmetric")
        check_stored("int", tensors, {"packed", "scales", "zeros"})
        return cls(shape, bits, group_size, symmetric, tensors.get("packed"), tensors.get("scales"), tensors.get("zeros"))

    def describe(self) -> str:
        g = "ch" if self.group == self.in_features and self.group_size in (None, -1) else f"g{self.group_size}"
        return f"int{self.bits} {g} {'sym' if self.symmetric else 'asym'}"
