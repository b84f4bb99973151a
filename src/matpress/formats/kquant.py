"""The grids of GGUF's K-quants (Q2_K .. Q6_K, llama.cpp's ``k_quants``) as a matpress format.

A row is cut into super-blocks of 256 weights and each super-block into sub-blocks of ``sub`` weights
(32 for Q4_K / Q5_K, 16 for the others). A super-block stores an fp16 scale ``d`` and, for the types
with minimums, an fp16 ``dmin``; a sub-block stores an integer scale ``sc`` (and an integer minimum
``m``) of ``scale_bits`` bits, so its step is quantized too. A weight is a ``bits``-bit code ``q``:

- with minimums (Q2_K, Q4_K, Q5_K): ``w = (d * sc) * q - dmin * m``, ``sc`` and ``m`` unsigned;
- symmetric (Q3_K, Q6_K): ``w = (d * sc) * (q - 2**(bits-1))``, ``sc`` signed (stored as
  ``sc + 2**(scale_bits-1)``).

Each product and the difference are rounded to fp32 in that order, as the ``gguf`` package's reference
dequantizes (and llama.cpp's ``dequantize_row_q*_K``), so the exported blocks decode to exactly
:meth:`KQuantFormat.decode`. Stored: the codes bit-packed, the sub-block scales (and minimums) bit-packed
at ``scale_bits``, ``d`` (and ``dmin``) fp16: exactly GGUF's bytes per super-block (Q4_K 144, 4.5 bits
per weight). Rows must be a multiple of 256 long; for other rows llama.cpp quantizes to a legacy type
(:func:`kquant_fallback`), which the integer methods produce instead.

The grid of a super-block (:func:`kquant_grid`) is fitted before its codes are chosen: each sub-block's
min-max step (and minimum), then ``d`` (``dmin``) from the largest of them and the integer sub-block
scales rounded on it. :func:`kquant_nearest` then rounds weights on that grid, so GPTQ can fit a
super-block's grid where it starts and still round (and feed back the error of) one column at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from matpress.errors import FormatError, quote
from matpress.formats.base import Format, check_stored, check_weight, config_values, expect_tensor, fp16_factor
from matpress.formats.packing import pack_rows, packed_row_bytes, unpack_rows

SUPER = 256  # weights per super-block (ggml's QK_K)
FALLBACK_GROUP = 32  # the block of the legacy types llama.cpp falls back to


@dataclass(frozen=True)
class KQuantSpec:
    """One K-quant grid. ``fallback``: the ``(bits, symmetric)`` int grid in groups of 32 that llama.cpp
    quantizes a row to when its length is not a multiple of 256 (``fallback_type`` in GGUF)."""

    name: str
    bits: int
    sub: int
    scale_bits: int
    minimum: bool
    fallback: tuple[int, bool]
    fallback_type: str

    @property
    def gguf_type(self) -> str:
        return self.name.upper()

    @property
    def per_super(self) -> int:
        return SUPER // self.sub

    @property
    def code_offset(self) -> int:
        return 0 if self.minimum else 1 << (self.bits - 1)

    @property
    def scale_offset(self) -> int:
        return 0 if self.minimum else 1 << (self.scale_bits - 1)


# llama.cpp's tensor_type_fallback: Q2_K, Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0
KQUANTS: dict[str, KQuantSpec] = {
    spec.name: spec
    for spec in (
        KQuantSpec("q2_k", bits=2, sub=16, scale_bits=4, minimum=True, fallback=(4, True), fallback_type="Q4_0"),
        KQuantSpec("q3_k", bits=3, sub=16, scale_bits=6, minimum=False, fallback=(4, True), fallback_type="Q4_0"),
        KQuantSpec("q4_k", bits=4, sub=32, scale_bits=6, minimum=True, fallback=(5, True), fallback_type="Q5_0"),
        KQuantSpec("q5_k", bits=5, sub=32, scale_bits=6, minimum=True, fallback=(5, False), fallback_type="Q5_1"),
        KQuantSpec("q6_k", bits=6, sub=16, scale_bits=8, minimum=False, fallback=(8, True), fallback_type="Q8_0"),
    )
}


def kquant_spec(name: Any) -> KQuantSpec:
    if not isinstance(name, str) or name.lower() not in KQUANTS:
        raise FormatError(f"unknown K-quant {quote(name)}; choose one of {sorted(KQUANTS)}")
    return KQUANTS[name.lower()]


def kquant_fallback(name: str, in_features: int) -> tuple[int, int, bool]:
    """``(bits, group_size, symmetric)`` of the legacy grid llama.cpp quantizes a row of ``in_features``
    weights to instead of K-quant ``name`` (whose super-blocks need a multiple of 256); a FormatError
    when not even that fits (llama.cpp would store the tensor as F16)."""
    spec = kquant_spec(name)
    if in_features % FALLBACK_GROUP:
        raise FormatError(
            f"{spec.gguf_type} needs rows of a multiple of {SUPER} weights, and its fallback {spec.fallback_type} a multiple "
            f"of {FALLBACK_GROUP}, but this layer's rows have {in_features}; compress it without a K-quant target "
            "(a rule without kquant for this layer, e.g. dense fp16)"
        )
    bits, symmetric = spec.fallback
    return bits, FALLBACK_GROUP, symmetric


class KGrid(NamedTuple):
    """A fitted K-quant grid, every field ``(rows, n_sub)`` fp32 (``d`` and ``dmin`` repeated over the
    sub-blocks of their super-block): the sub-block's ``step = d * sc`` and ``shift = dmin * m`` (zero for
    the symmetric types) as decode computes them, its integer ``scale`` and ``minimum`` codes as stored,
    and ``d``, ``dmin``."""

    step: torch.Tensor
    shift: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    d: torch.Tensor
    dmin: torch.Tensor


def _super_scale(values: torch.Tensor, spec: KQuantSpec, levels: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16 super-block factor of ``values`` ``(rows, n_super, per_super)`` (its largest value over
    ``levels``) and the integer codes of ``values`` on it, both ``(rows, n_super, per_super)`` fp32."""
    factor = fp16_factor(values.amax(dim=-1, keepdim=True) / levels, f"a {spec.gguf_type} super-block {what}").float()
    safe = torch.where(factor == 0, torch.ones_like(factor), factor)
    return factor.expand_as(values), torch.round(values / safe).clamp_(0, levels)


def kquant_grid(groups: torch.Tensor, spec: KQuantSpec) -> KGrid:
    """Fit the grid of the sub-blocks ``groups`` ``(rows, n_sub, sub)``, ``n_sub`` a multiple of the
    sub-blocks per super-block: min-max steps (and minimums, taking zero into the range), whose
    largest per super-block gives ``d`` (``dmin``) and on which each sub-block's integer scale (minimum)
    is rounded to nearest. For the symmetric types the signed value of largest magnitude of a sub-block
    maps to the lowest code, and the signed step of largest magnitude to the lowest scale code."""
    rows, n_sub, _ = groups.shape
    by_super = (rows, n_sub // spec.per_super, spec.per_super)
    if spec.minimum:
        low = groups.amin(dim=-1).clamp(max=0)
        high = groups.amax(dim=-1)
        steps = ((high - low) / ((1 << spec.bits) - 1)).reshape(by_super)
        levels = (1 << spec.scale_bits) - 1
        d, scale = _super_scale(steps, spec, levels, "scale")
        dmin, minimum = _super_scale((-low).reshape(by_super), spec, levels, "minimum")
        d, scale, dmin, minimum = (t.reshape(rows, n_sub) for t in (d, scale, dmin, minimum))
        return KGrid(d * scale, dmin * minimum, scale, minimum, d, dmin)
    extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
    steps = (extreme / -(1 << (spec.bits - 1))).reshape(by_super)
    top = steps.gather(-1, steps.abs().argmax(dim=-1, keepdim=True))
    d = fp16_factor(top / -(1 << (spec.scale_bits - 1)), f"a {spec.gguf_type} super-block scale").float()
    safe = torch.where(d == 0, torch.ones_like(d), d)
    half = 1 << (spec.scale_bits - 1)
    scale = torch.round(steps / safe).clamp_(-half, half - 1).reshape(rows, n_sub)
    d = d.expand(by_super).reshape(rows, n_sub)
    zero = torch.zeros_like(d)
    return KGrid(d * scale, zero, scale + half, zero, d, zero)


def kquant_nearest(w: torch.Tensor, step: torch.Tensor, shift: torch.Tensor, spec: KQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, values)``: the nearest stored code of each weight of ``w`` on the grid ``step``,
    ``shift`` (broadcast against ``w``) and the value it decodes to, computed as decode computes it."""
    safe = torch.where(step == 0, torch.ones_like(step), step)
    if spec.minimum:
        q = torch.round((w + shift) / safe).clamp_(0, (1 << spec.bits) - 1)
        q = torch.where(step == 0, torch.zeros_like(q), q)
        return q, step * q - shift
    half = 1 << (spec.bits - 1)
    signed = torch.round(w / safe).clamp_(-half, half - 1)
    signed = torch.where(step == 0, torch.zeros_like(signed), signed)
    return signed + half, step * signed


class KQuantFormat(Format):
    """A matrix on the grid of one GGUF K-quant (see the module docstring), stored as GGUF stores it."""

    name = "kquant"

    def __init__(
        self,
        shape: tuple[int, int],
        kquant: str,
        packed: torch.Tensor,
        scales: torch.Tensor,
        mins: torch.Tensor | None,
        d: torch.Tensor,
        dmin: torch.Tensor | None,
    ):
        super().__init__(shape)
        self.spec = spec = kquant_spec(kquant)
        if self.in_features % SUPER:
            raise FormatError(
                f"kquant format: {spec.gguf_type} needs rows of a multiple of {SUPER} weights, got {self.in_features}; "
                f"llama.cpp stores such a row as {spec.fallback_type} (the integer methods do so too with kquant set)"
            )
        self.n_sub = self.in_features // spec.sub
        rows, supers = self.out_features, self.in_features // SUPER
        tensors = {"packed": packed, "scales": scales, "mins": mins, "d": d, "dmin": dmin}
        self.packed = expect_tensor(tensors, "packed", (rows, packed_row_bytes(self.in_features, spec.bits)), torch.uint8, self.name)
        scale_shape = (rows, packed_row_bytes(self.n_sub, spec.scale_bits))
        self.scales = expect_tensor(tensors, "scales", scale_shape, torch.uint8, self.name)
        self.d = expect_tensor(tensors, "d", (rows, supers), torch.float16, self.name)
        if spec.minimum:
            self.mins = expect_tensor(tensors, "mins", scale_shape, torch.uint8, self.name)
            self.dmin = expect_tensor(tensors, "dmin", (rows, supers), torch.float16, self.name)
        elif mins is not None or dmin is not None:
            raise FormatError(f"kquant format: {spec.gguf_type} stores no minimums")
        else:
            self.mins = self.dmin = None
        for what, t in (("d", self.d), ("dmin", self.dmin)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise FormatError(
                    f"kquant format: {int((~torch.isfinite(t)).sum())} super-block scales '{what}' are NaN/Inf; "
                    "the stored tensors are corrupt, compress the layer again"
                )

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def from_grid(cls, codes: torch.Tensor, grid: KGrid, kquant: str) -> "KQuantFormat":
        """Build from codes ``(out, in)`` (as :func:`kquant_nearest` gives them) and their fitted grid."""
        spec = kquant_spec(kquant)

        def per_super(t: torch.Tensor) -> torch.Tensor:  # d and dmin are repeated over a super-block's sub-blocks
            return t[:, :: spec.per_super].to(torch.float16).clone(memory_format=torch.contiguous_format)

        mins = pack_rows(grid.minimum, spec.scale_bits) if spec.minimum else None
        dmin = per_super(grid.dmin) if spec.minimum else None
        return cls(
            tuple(codes.shape), spec.name, pack_rows(codes, spec.bits), pack_rows(grid.scale, spec.scale_bits), mins,
            per_super(grid.d), dmin,
        )

    @classmethod
    def encode(cls, weight: torch.Tensor, kquant: str = "q4_k") -> "KQuantFormat":
        """Round to nearest on the fitted grid of each super-block (:func:`kquant_grid`)."""
        check_weight(weight)
        spec = kquant_spec(kquant)
        w = weight.detach().float()
        if w.shape[1] % SUPER:
            kquant_fallback(spec.name, w.shape[1])  # a clear error when not even the fallback fits
            raise FormatError(
                f"{spec.gguf_type} needs rows of a multiple of {SUPER} weights, got {w.shape[1]}; quantize this layer to "
                f"{spec.fallback_type} (int{spec.fallback[0]} g{FALLBACK_GROUP}), as llama.cpp and the integer methods with kquant do"
            )
        groups = w.reshape(w.shape[0], -1, spec.sub)
        grid = kquant_grid(groups, spec)
        codes, _ = kquant_nearest(groups, grid.step.unsqueeze(-1), grid.shift.unsqueeze(-1), spec)
        return cls.from_grid(codes.reshape(w.shape), grid, spec.name)

    # -- reading --------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Unpacked codes, ``(out, in)`` uint8 (with the offset ``2**(bits-1)`` for the symmetric types)."""
        return unpack_rows(self.packed, self.spec.bits, self.in_features)

    def sub_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The integer sub-block scales (signed) and minimums, ``(out, n_sub)`` fp32."""
        spec = self.spec
        scale = unpack_rows(self.scales, spec.scale_bits, self.n_sub).float() - spec.scale_offset
        if self.mins is None:
            return scale, torch.zeros_like(scale)
        return scale, unpack_rows(self.mins, spec.scale_bits, self.n_sub).float()

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        spec = self.spec
        scale, minimum = self.sub_scales()
        step = (self.d.float().repeat_interleave(spec.per_super, dim=1) * scale).unsqueeze(-1)
        q = self.codes().float().view(self.out_features, self.n_sub, spec.sub)
        if spec.minimum:
            shift = (self.dmin.float().repeat_interleave(spec.per_super, dim=1) * minimum).unsqueeze(-1)
            w = (step * q).sub_(shift)  # rounded as decode in fp32 rounds them: the product, then the difference
        else:
            w = step * q.sub_(spec.code_offset)
        return w.view(self.shape).to(dtype)

    def decode_rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Only the rows looked up: every row is its own super-blocks, so they decode exactly as in :meth:`decode`."""
        index = index.to(self.packed.device)
        pick = {k: v[index] for k, v in self.to_tensors().items()}
        return type(self).from_tensors((index.numel(), self.in_features), self.config(), pick).decode(dtype)

    # -- storage --------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"kquant": self.spec.name}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"packed": self.packed, "scales": self.scales, "d": self.d}
        if self.spec.minimum:
            tensors.update(mins=self.mins, dmin=self.dmin)
        return tensors

    @classmethod
    def from_tensors(cls, shape: tuple[int, int], config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "KQuantFormat":
        (kquant,) = config_values("kquant", config, "kquant")
        stored = ("packed", "scales", "mins", "d", "dmin")
        check_stored("kquant", tensors, set(stored))
        return cls(shape, kquant, *(tensors.get(k) for k in stored))

    def describe(self) -> str:
        return self.spec.gguf_type
