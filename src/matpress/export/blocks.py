"""A stored matrix as GGUF blocks: the exact mappings from matpress formats onto ggml's block types.

ggml stores a row of ``n`` weights as ``n / 32`` blocks of 32 (the legacy types) holding an fp16 scale
``d`` (and for the ``_1`` types an fp16 minimum ``m``) and the codes:

- ``Q4_0``: ``w = (q - 8) * d``, ``q`` 4 bits;  ``Q5_0``: ``w = (q - 16) * d``, ``q`` 5 bits;
- ``Q4_1``: ``w = q * d + m``, ``q`` 4 bits;    ``Q5_1``: ``w = q * d + m``, ``q`` 5 bits;
- ``Q8_0``: ``w = q * d``, ``q`` a signed byte.

The ``int`` format stores ``w = (q - z) * s`` with one fp16 scale ``s`` per group of input columns and
the zero ``z = 2**(bits-1)`` when symmetric (else an fp16 zero point per group). So wherever every
block of 32 lies inside one group (``in_features`` and the group a multiple of 32, or one group per row
with ``in_features`` a multiple of 32) a block takes its group's ``d = s`` and the codes as they are:

- symmetric int4 / int5 / int8 onto Q4_0 / Q5_0 / Q8_0 (``q - 128`` as the signed byte) is exact: the
  same integers times the same fp16 scale;
- asymmetric int4 / int5 onto Q4_1 / Q5_1 needs ``m = -z * s``, which fp16 holds only up to its
  rounding: each weight of the block moves by ``|fp16(-z*s) + z*s|`` (at most half an fp16 ulp of
  ``z*s``, i.e. ``2**-11 |z s|``, or ``2**-25`` below fp16's normal range). :func:`q1_minimum_error`
  gives that shift per block.

The ``kquant`` format stores the grid of a K-quant (Q2_K .. Q6_K) as GGUF does, so its blocks are the
same integers rearranged into ggml's ``block_q*_K`` byte layouts (:func:`kquant_blocks`): exact.

``IQ4_NL`` (ggml's ``block_iq4_nl``: an fp16 ``d`` and 16 bytes of 4-bit codes in Q4_0's nibble order)
is ``w = d * kvalues_iq4nl[q]``, a fixed table of 16 integer levels. The ``codebook`` format stores
``w = table[q] * s`` with an fp16 scale ``s`` per group; when it has 4-bit codes, every row's table holds
exactly those levels (:data:`~matpress.formats.codebook.IQ4NL_LEVELS`: the ``iq4nl`` table, or a
learned one that landed on them) and every block of 32 lies inside one group, a block takes its
group's ``d = s`` and the codes as they are (:func:`codebook_blocks`). That is exact bit for bit, the
rounding included: both sides multiply the same fp16 scale by the same integer level of at most 7 bits
in fp32, and an 11-bit significand times a 7-bit integer fits fp32's 24 bits, so neither product is
rounded (subnormal fp16 scales too: they are normal in fp32).

Dense matrices are F32, F16 or BF16 in their stored dtype, bit for bit. Anything else has no GGUF
counterpart here (:class:`NoCounterpart` says why); :mod:`matpress.export.gguf` refuses it or, when
asked, decodes and re-quantizes it. A ``transformed`` format (Hadamard rotation and / or AWQ input
scales applied to the activations at run time) is refused even when its child maps: GGUF has no input
transform, and the rotated weight ``W T^-1`` is not on the child's grid, so the transform cannot be
folded into the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from matpress.errors import FormatError
from matpress.formats import Format
from matpress.formats.codebook import IQ4NL_LEVELS, CodebookFormat, fixed_table
from matpress.formats.dense import DenseFormat
from matpress.formats.integer import IntFormat
from matpress.formats.kquant import SUPER, KQuantFormat
from matpress.formats.packing import unpack_rows
from matpress.formats.transformed import TransformedFormat

BLOCK = 32  # weights per block of the legacy types Q4_0 .. Q8_0
# (bits, symmetric) of an int format -> the GGUF type that holds its grid
INT_TYPES = {(4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (5, False): "Q5_1", (8, True): "Q8_0"}
DENSE_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
CODEBOOK_TYPE = "IQ4_NL"  # the one GGUF type holding a codebook: 4-bit codes on IQ4NL_LEVELS, blocks of 32
CODEBOOK_RECIPE = "--method gptq_codebook (or codebook) --table iq4nl --bits 4 --group 32 (or a multiple of 32)"


class NoCounterpart(FormatError):
    """A stored matrix whose format has no exact GGUF block type."""


@dataclass(frozen=True)
class Blocks:
    """A tensor in GGUF layout: ``data`` is uint8 of the tensor's shape with its last dimension (a row) in
    bytes, of GGUF type ``type_name``."""

    type_name: str
    data: torch.Tensor

    def rows(self, index: torch.Tensor) -> "Blocks":
        """The rows ``index`` in that order (every row is its own blocks, so this is exact)."""
        return Blocks(self.type_name, self.data[index])


def dense_blocks(weight: torch.Tensor) -> Blocks:
    """A dense tensor of one or more dimensions as F32 / F16 / BF16 bytes (its last dimension in bytes)."""
    if weight.dtype not in DENSE_TYPES:
        raise NoCounterpart(f"dtype {weight.dtype} has no GGUF type; GGUF holds {sorted(DENSE_TYPES.values())}")
    w = weight.detach().contiguous()
    raw = w.view(torch.int16) if w.dtype == torch.bfloat16 else w  # numpy has no bf16: move its bits
    return Blocks(DENSE_TYPES[weight.dtype], raw.view(torch.uint8))


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """``(rows, n)`` fp16 values -> ``(rows, n, 2)`` little-endian bytes."""
    return values.to(torch.float16).contiguous().view(torch.uint8).reshape(*values.shape, 2)


def bit_planes(q: torch.Tensor, width: int, chunk: int) -> torch.Tensor:
    """Pack codes of ``width`` bits (``(..., n)``, values below ``2**width``) the way ggml interleaves them:
    runs of ``chunk * 8 / width`` codes become ``chunk`` bytes, byte ``l`` of a run holding code
    ``l + k * chunk`` of the run in its bits ``[k * width, (k + 1) * width)``."""
    per_byte = 8 // width
    runs = q.to(torch.int64).reshape(*q.shape[:-1], -1, per_byte, chunk)
    shifts = (torch.arange(per_byte, dtype=torch.int64) * width).view(per_byte, 1)
    return (runs << shifts).sum(dim=-2).reshape(*q.shape[:-1], -1).to(torch.uint8)


def _low_nibbles(q: torch.Tensor) -> torch.Tensor:
    """``(rows, blocks, 32)`` codes -> the 16 bytes of their low four bits: byte ``j`` holds code ``j`` in
    its low nibble and code ``j + 16`` in its high nibble (ggml's order, not consecutive pairs)."""
    return bit_planes(q & 0x0F, 4, 16)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of the 32 codes of a block as one little-endian 32-bit word (4 bytes), code ``j`` in bit ``j``."""
    return bit_planes((q >> 4) & 1, 1, 1)


def int_type(fmt: IntFormat) -> str:
    """The GGUF type holding ``fmt``'s grid, or :class:`NoCounterpart` saying what does not fit."""
    found = INT_TYPES.get((fmt.bits, fmt.symmetric))
    kind = f"{fmt.bits}-bit {'symmetric' if fmt.symmetric else 'asymmetric'}"
    if found is None:
        held = ", ".join(f"{b}-bit {'symmetric' if s else 'asymmetric'}" for b, s in INT_TYPES)
        raise NoCounterpart(f"{fmt.describe()}: GGUF's block types hold no {kind} grid (only {held})")
    if fmt.in_features % BLOCK or fmt.group % BLOCK:
        raise NoCounterpart(
            f"{fmt.describe()}: GGUF blocks are {BLOCK} weights, so the row length ({fmt.in_features}) and the group "
            f"({fmt.group}) must be multiples of {BLOCK}"
        )
    return found


def per_block(t: torch.Tensor, fmt: Union[IntFormat, CodebookFormat]) -> torch.Tensor:
    """A per-group ``(out, n_groups)`` tensor repeated for each block of 32 in the group: ``(out, in / 32)``."""
    return t.repeat_interleave(fmt.group // BLOCK, dim=1)[:, : fmt.in_features // BLOCK]


def q1_minimum(fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, exact)`` per block ``(out, in / 32)``: the fp16 minimum ``m = fp16(-z * s)`` a Q4_1 / Q5_1
    block stores for an asymmetric ``fmt``, and ``-z * s`` in float64."""
    scale, zero = fmt.scale_zero()
    exact = per_block(-(zero.double() * scale.double()), fmt)
    return exact.to(torch.float16), exact


def q1_minimum_error(fmt: IntFormat) -> torch.Tensor:
    """How far every weight of each block moves when ``fmt`` is stored as Q4_1 / Q5_1: ``|m - (-z s)|``
    per block ``(out, in / 32)``, float64 (zero for the symmetric mappings)."""
    if fmt.symmetric:
        return torch.zeros(fmt.out_features, fmt.in_features // BLOCK, dtype=torch.float64)
    m, exact = q1_minimum(fmt)
    return (m.double() - exact).abs()


def int_blocks(fmt: IntFormat) -> Blocks:
    """``fmt`` as GGUF blocks of its type (:func:`int_type`); see the module docstring for exactness."""
    type_name = int_type(fmt)
    rows = fmt.out_features
    q = fmt.codes().to(torch.int64).reshape(rows, -1, BLOCK)
    scale, _ = fmt.scale_zero()
    parts = [_fp16_bytes(per_block(scale, fmt))]
    if not fmt.symmetric:
        parts.append(_fp16_bytes(q1_minimum(fmt)[0]))
    if fmt.bits == 8:
        parts.append((q - 128).to(torch.int8).view(torch.uint8))
    else:
        if fmt.bits == 5:
            parts.append(_high_bits(q))
        parts.append(_low_nibbles(q))
    return Blocks(type_name, torch.cat(parts, dim=-1).reshape(rows, -1).contiguous())


def _k_scales_6bit(scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K's 12 bytes of eight 6-bit scales and eight 6-bit minimums ``(..., 8)`` each: bytes 0-3
    and 4-7 hold scales and minimums 0-3 in their low six bits and the top two bits of 4-7 in their high
    two; bytes 8-11 hold the low four bits of scale and minimum 4-7."""
    low, high = scale[..., :4], scale[..., 4:]
    mlow, mhigh = minimum[..., :4], minimum[..., 4:]
    return torch.cat(
        [low | ((high >> 4) << 6), mlow | ((mhigh >> 4) << 6), (high & 0x0F) | ((mhigh & 0x0F) << 4)], dim=-1
    ).to(torch.uint8)


def _q3_scales(scale: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 bytes of sixteen 6-bit scales ``(..., 16)``: their low four bits as nibbles (scale ``j``
    and ``j + 8`` in byte ``j``), then their top two bits in four bytes (scale ``j + 4k`` in byte ``8 + j``,
    bits ``2k``)."""
    return torch.cat([bit_planes(scale & 0x0F, 4, 8), bit_planes((scale >> 4) & 0x03, 2, 4)], dim=-1)


def kquant_blocks(fmt: KQuantFormat) -> Blocks:
    """``fmt`` as blocks of its K-quant, byte for byte the layout of ggml's ``block_q*_K``."""
    spec = fmt.spec
    rows, supers = fmt.out_features, fmt.in_features // SUPER
    q = fmt.codes().to(torch.int64).reshape(rows, supers, SUPER)

    def per_super(packed: torch.Tensor) -> torch.Tensor:
        return unpack_rows(packed, spec.scale_bits, fmt.n_sub).to(torch.int64).reshape(rows, supers, spec.per_super)

    scale, d = per_super(fmt.scales), _fp16_bytes(fmt.d)
    if spec.minimum:
        minimum, dmin = per_super(fmt.mins), _fp16_bytes(fmt.dmin)
    if spec.name == "q2_k":
        parts = [(scale | (minimum << 4)).to(torch.uint8), bit_planes(q, 2, 32), d, dmin]
    elif spec.name == "q3_k":
        parts = [bit_planes(q >> 2, 1, 32), bit_planes(q & 0x03, 2, 32), _q3_scales(scale), d]
    elif spec.name == "q4_k":
        parts = [d, dmin, _k_scales_6bit(scale, minimum), bit_planes(q & 0x0F, 4, 32)]
    elif spec.name == "q5_k":
        parts = [d, dmin, _k_scales_6bit(scale, minimum), bit_planes(q >> 4, 1, 32), bit_planes(q & 0x0F, 4, 32)]
    else:  # q6_k: the scales are int8, stored here with the offset 128
        parts = [bit_planes(q & 0x0F, 4, 64), bit_planes(q >> 4, 2, 32), (scale ^ 0x80).to(torch.uint8), d]
    return Blocks(spec.gguf_type, torch.cat(parts, dim=-1).reshape(rows, -1).contiguous())


def has_iq4nl_levels(fmt: CodebookFormat) -> bool:
    """Whether every row's stored table is exactly IQ4_NL's levels (whatever ``table_kind`` says)."""
    levels = fixed_table("iq4nl", 4)
    return fmt.table.shape[1] == levels.numel() and bool((fmt.table.float() == levels).all())


def codebook_blocks(fmt: CodebookFormat) -> Blocks:
    """``fmt`` as IQ4_NL blocks (``d``, then the codes as Q4_0's nibbles), exact bit for bit (see the
    module docstring), or :class:`NoCounterpart` saying what does not fit and what would."""
    misfits = []
    if fmt.bits != 4:
        misfits.append(f"its codes are {fmt.bits}-bit, not 4-bit")
    elif not has_iq4nl_levels(fmt):
        misfits.append(f"its {fmt.table_kind} table's levels are not IQ4_NL's {list(IQ4NL_LEVELS)}")
    if fmt.in_features % BLOCK or fmt.group % BLOCK:
        misfits.append(f"the row length ({fmt.in_features}) and the group ({fmt.group}) must be multiples of {BLOCK}")
    if misfits:
        raise NoCounterpart(
            f"{fmt.describe()}: GGUF holds a codebook only as {CODEBOOK_TYPE} (4-bit codes on llama.cpp's IQ4_NL levels, "
            f"blocks of {BLOCK} inside one scale group), and {'; '.join(misfits)}; compress with {CODEBOOK_RECIPE}"
        )
    rows = fmt.out_features
    q = fmt.codes().to(torch.int64).reshape(rows, -1, BLOCK)
    parts = [_fp16_bytes(per_block(fmt.scales, fmt)), _low_nibbles(q)]
    return Blocks(CODEBOOK_TYPE, torch.cat(parts, dim=-1).reshape(rows, -1).contiguous())


def format_blocks(fmt: Format) -> Blocks:
    """A compressed layer's stored matrix as GGUF blocks, exact up to :func:`q1_minimum_error`; a format
    with no counterpart raises :class:`NoCounterpart`."""
    if isinstance(fmt, DenseFormat):
        return dense_blocks(fmt.weight)
    if isinstance(fmt, IntFormat):
        return int_blocks(fmt)
    if isinstance(fmt, KQuantFormat):
        return kquant_blocks(fmt)
    if isinstance(fmt, CodebookFormat):
        return codebook_blocks(fmt)
    if isinstance(fmt, TransformedFormat):
        parts = [(what, fix) for what, fix, on in (
            ("Hadamard rotation", "without rotate", fmt.transform.signs is not None),
            ("input scales", "with no input scales kept in the layer (gptq: no scale_inputs; awq keeps them where they do not fold into the preceding layer)", fmt.transform.scale is not None),
        ) if on]
        raise NoCounterpart(
            f"{fmt.describe()}: its {' and '.join(w for w, _ in parts)} of the layer's inputs cannot be folded into GGUF "
            f"blocks (GGUF applies no input transform, and the weight with the transform undone is off any GGUF grid); "
            f"compress it {' and '.join(f for _, f in parts)}"
        )
    raise NoCounterpart(f"{fmt.describe()}: the {fmt.name} format has no GGUF block type")
