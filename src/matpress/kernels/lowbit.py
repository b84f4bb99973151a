"""Fast CPU ``x @ W.T`` for packed low-bit weights (``int`` 1-8 bits, ``ternary``, ``codebook``).

The weights are repacked once, at first use, into the tiled layout of ``lowbit.cpp`` (cached on the
format object, never saved); activations are quantized to int8 per block on every call and multiplied
by integer dot products (AVX-512 VNNI, else AVX2, else portable C++), the group scales and zero points
applied once per block. A codebook's codes go in as they are and are looked up in registers (one
``vpshufb`` per 64 codes) into the byte ``level + 128`` of their row's table, with the zero point 128:
its levels are integers (:mod:`matpress.formats.codebook`), so ``(level + 128 - 128) * scale`` is the
stored weight exactly and the kernel is the ``int`` kernel's arithmetic plus one shuffle. The kernels are PyTorch custom operators (see ``build.py``), so compressed
layers trace under ``torch.compile`` and ``torch.export``. From ``LARGE_BATCH`` rows on, CPUs with AMX
(and, for small matrices, CPUs with AVX-512 BF16) decode the weights to bf16 and use torch's matmul
instead. See ``docs/kernels.md`` for the layout and the measured speed.

Non-finite values propagate as in ``x @ W.T`` of the decoded weights: the kernel flags activation
blocks that hold a NaN or an infinity (and the layout records whether a scale is one) and recomputes
the outputs they reach in fp32, so those outputs are the same NaN and signed infinities.

Accuracy: the only error beyond fp32 rounding is the activation rounding, at most half a step
``a = max|x_block| / 127`` per element, so ``|y - x @ W.T| <= sum_k |W[n, k]| * a(k) / 2`` (plus fp32
rounding); a block never spans two weight groups, so ``a(k) <= max|x over k's group| / 127``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from matpress.formats import CodebookFormat, Format, IntFormat, TernaryFormat
from matpress.formats.codebook import has_integer_levels
from matpress.kernels import kernels_may_take, register_kernel
from matpress.kernels.build import KernelLibrary, chosen_isa, cpu_flags, load_library

# Widest block of one int8 dot product: 255 * 127 * 256 < 2**24, so block sums convert to fp32 exactly.
MAX_BLOCK = 256
CHUNK = 64  # columns per SIMD chunk
HALF_CHUNK = 32  # columns of a block that shares its chunk with the next
TILE = 4  # weight rows per tile
QUAD = 4  # blocks per step of the kernel's scale arithmetic
# Code widths that have a layout; other widths are held in the next wider one.
LAYOUT_BITS = (2, 3, 4, 8)
LAYOUT_ATTR = "_lowbit_layout"
LOOKUP_ZERO = 128  # a lookup layout stores level + 128 (a byte) with this zero point
LOOKUP_BYTES = 16  # table bytes per row: codes of up to 4 bits
# From this many activation rows on, CPUs with AMX decode the weights to bf16 and use torch's matmul
# (measured crossover on a Sapphire Rapids: see docs/kernels.md). CPUs with AVX-512 BF16 but no AMX
# (AMD Zen 4/5) take it only from BF16_DOT_BATCH rows on: below, the int8 kernel's rearranged batched
# path measured 1.1-2.8x the bf16 path's speed (decode plus matmul) on a Zen 5 EPYC for SmolLM2's and
# Llama-1B's matrices at 128 rows, about level at 512 (SmolLM2 int4 g64 prefill 1.40x / 1.17x faster
# at 128 / 512 tokens), while a MiniLM batch of 2208 rows ran 1.14x faster on the bf16 path.
LARGE_BATCH = 128
BF16_DOT_BATCH = 1024


@dataclass(frozen=True)
class BlockGeometry:
    """How the columns of a row split into kernel blocks: each weight group of ``group`` columns into
    ``sub`` blocks of ``width`` columns (the last possibly shorter), each padded to ``padded`` (32, or a
    multiple of 64). The codes hold ``code_blocks`` blocks (two 32-column blocks share a 64-column
    chunk); scales, zero points and activations ``n_blocks``, padded to whole quads."""

    in_features: int
    group: int
    sub: int
    width: int
    padded: int
    n_blocks: int

    @classmethod
    def of(cls, in_features: int, group: int) -> "BlockGeometry":
        sub = math.ceil(group / MAX_BLOCK)
        width = math.ceil(group / sub)
        # blocks of up to 32 columns (groups of 32: GGUF's Q4_0 / Q8_0 grids) are half chunks, not padded to 64
        padded = HALF_CHUNK if width <= HALF_CHUNK else math.ceil(width / CHUNK) * CHUNK
        # the kernel takes blocks four at a time; the extra blocks are empty
        n_blocks = math.ceil(math.ceil(in_features / group) * sub / QUAD) * QUAD
        return cls(in_features, group, sub, width, padded, n_blocks)

    @property
    def code_blocks(self) -> int:
        return math.ceil(self.in_features / self.group) * self.sub

    @property
    def code_chunks(self) -> int:
        """64-column chunks of codes per row."""
        if self.padded == HALF_CHUNK:
            return math.ceil(self.code_blocks / 2)
        return self.code_blocks * self.padded // CHUNK

    def blocked(self, per_column: torch.Tensor) -> torch.Tensor:
        """``(rows, in_features)`` -> ``(rows, code_blocks, padded)``, zeros in the padding."""
        rows = per_column.shape[0]
        n_groups = math.ceil(self.in_features / self.group)
        t = torch.nn.functional.pad(per_column, (0, n_groups * self.group - self.in_features))
        t = torch.nn.functional.pad(t.view(rows, n_groups, self.group), (0, self.sub * self.width - self.group))
        t = torch.nn.functional.pad(t.view(rows, n_groups, self.sub, self.width), (0, self.padded - self.width))
        return t.reshape(rows, n_groups * self.sub, self.padded)

    def per_block(self, per_group: torch.Tensor) -> torch.Tensor:
        """``(rows, n_groups)`` -> ``(rows, n_blocks)``, zeros for the empty blocks."""
        t = per_group.repeat_interleave(self.sub, dim=1)
        return torch.nn.functional.pad(t, (0, self.n_blocks - t.shape[1]))


@dataclass(frozen=True)
class LowbitLayout:
    """Weights in the kernel's tiled layout (see ``lowbit.cpp``)."""

    bits: int
    out_features: int
    geometry: BlockGeometry
    codes: torch.Tensor  # uint8, (tiles, tile bytes)
    scales: torch.Tensor  # float16, (tiles, n_blocks / QUAD, TILE, QUAD)
    # int16, (tiles, n_blocks / QUAD, TILE, QUAD); where every row and block shares one zero point
    # (symmetric grids, lookup layouts) 16 copies of it, (1, 1, TILE, QUAD): 2 bytes a block less to read
    zeros: torch.Tensor
    scales_finite: bool  # no scale is NaN or infinite (else the kernel recomputes the outputs they reach)
    # a lookup layout's tables (codebooks): uint8 (1 or tiles, TILE * 16), row r's code q standing for
    # byte [r * 16 + q] of its tile's row (one row of the tensor for all tiles when the layer has one table)
    levels: torch.Tensor | None = None

    @functools.cached_property
    def operator_geometry(self) -> tuple[int, ...]:
        """The operators' ``geometry`` argument (``build.GEOMETRY_FIELDS``), built once: a small matrix's
        call costs microseconds, and a dozen attribute reads a call would be a part of them."""
        geo = self.geometry
        return (self.bits, geo.n_blocks, geo.padded, geo.in_features, geo.group, geo.sub, geo.width,
                self.out_features, int(not self.scales_finite))


def _interleave(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(tiles, TILE, chunks, CHUNK)`` codes -> the byte stream of each tile, ``(tiles, bytes)``."""
    t, _, nb, padded = codes.shape
    # steps[t, b, c, s, r, i]: code of row r, column 64 c + 16 s + i of block b
    steps = codes.view(t, TILE, nb, padded // CHUNK, 4, 16).permute(0, 2, 3, 4, 1, 5)
    if bits == 8:
        out = steps
    elif bits == 4:
        out = steps[:, :, :, 0::2] | (steps[:, :, :, 1::2] << 4)
    else:
        low = steps & 3
        out = low[:, :, :, 0] | (low[:, :, :, 1] << 2) | (low[:, :, :, 2] << 4) | (low[:, :, :, 3] << 6)
        if bits == 3:
            high = ((steps >> 2) & 1).reshape(t, nb, padded // CHUNK, 4, 8, 8)
            weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
            masks = (high * weights).sum(dim=-1, dtype=torch.uint8)  # little-endian 64-bit masks
            out = torch.cat([out.reshape(t, nb, -1, 64), masks.reshape(t, nb, -1, 32)], dim=-1)
    return out.reshape(t, -1).contiguous()


def pack_layout(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, bits: int,
    levels: torch.Tensor | None = None,
) -> LowbitLayout:
    """Repack ``(out, in)`` unsigned codes with per-group fp16-exact ``scale`` and int16 ``zero``
    ``(out, n_groups)`` (weight ``(q - zero) * scale``, or ``(levels[q] - zero) * scale`` for a lookup
    layout's tables ``levels``, see :class:`LowbitLayout`) into the kernel layout."""
    layout_bits = next(b for b in LAYOUT_BITS if b >= bits)
    out_f, in_f = codes.shape
    geo = BlockGeometry.of(in_f, group)
    tiles = math.ceil(out_f / TILE)
    pad_rows = tiles * TILE - out_f

    def tiled(per_group: torch.Tensor) -> torch.Tensor:  # (out, n_groups) -> (tiles, quads, TILE, QUAD)
        t = torch.nn.functional.pad(geo.per_block(per_group), (0, 0, 0, pad_rows))
        return t.view(tiles, TILE, geo.n_blocks // QUAD, QUAD).transpose(1, 2).contiguous()

    blocked = torch.nn.functional.pad(geo.blocked(codes.to(torch.uint8)), (0, 0, 0, 0, 0, pad_rows))
    if geo.padded == HALF_CHUNK:  # pairs of 32-column blocks side by side in one chunk (an odd last one padded)
        blocked = torch.nn.functional.pad(blocked, (0, 0, 0, 2 * geo.code_chunks - geo.code_blocks))
    packed = _interleave(blocked.reshape(tiles, TILE, geo.code_chunks, CHUNK), layout_bits)
    scales = tiled(scale.half())
    zero = zero.to(torch.int16)
    shared = zero.numel() > 0 and bool((zero == zero.flatten()[0]).all())
    return LowbitLayout(
        bits=layout_bits,
        out_features=out_f,
        geometry=geo,
        codes=packed,
        scales=scales,
        zeros=shared_zeros(int(zero.flatten()[0])) if shared else tiled(zero),
        scales_finite=bool(torch.isfinite(scales).all()),
        levels=levels,
    )


SHARED_ZEROS_SHAPE = (1, 1, TILE, QUAD)  # one quad's 16 zeros, read for every quad of every tile


def shared_zeros(zero: int) -> torch.Tensor:
    """The zeros of a layout whose every row and block has zero point ``zero``."""
    return torch.full(SHARED_ZEROS_SHAPE, zero, dtype=torch.int16)


def block_zeros(layout: LowbitLayout) -> torch.Tensor:
    """The layout's zero points per tile row and block (shared ones expanded)."""
    if layout.zeros.shape == layout.scales.shape:
        return layout.zeros
    return layout.zeros.expand(layout.scales.shape).contiguous()


def stacked_zeros(layouts: list[LowbitLayout]) -> torch.Tensor:
    """The zeros of the stack of ``layouts``: one shared zero point if all share the same one."""
    if all(lay.zeros.shape == SHARED_ZEROS_SHAPE for lay in layouts):
        if torch.cat([lay.zeros.flatten() for lay in layouts]).unique().numel() == 1:
            return layouts[0].zeros
    return torch.cat([block_zeros(lay) for lay in layouts])


def identity_levels() -> torch.Tensor:
    """The table under which a lookup layout's codes stand for themselves (an ``int`` layout's meaning)."""
    return torch.arange(LOOKUP_BYTES, dtype=torch.uint8).repeat(TILE).unsqueeze(0)


def tile_levels(layout: LowbitLayout) -> torch.Tensor:
    """The layout's tables as one row per tile (identity for a layout without tables)."""
    tiles = layout.codes.shape[0]
    levels = identity_levels() if layout.levels is None else layout.levels
    return levels.expand(tiles, -1) if levels.shape[0] == 1 else levels


def stacked_levels(layouts: list[LowbitLayout]) -> torch.Tensor | None:
    """The tables of the stack of ``layouts``: none if none has any, the one shared table if all share
    it, else one per tile (identity tables for the ``int`` layouts among them)."""
    if all(lay.levels is None for lay in layouts):
        return None
    first = layouts[0].levels
    if first is not None and first.shape[0] == 1 and all(lay.levels is not None and torch.equal(lay.levels, first) for lay in layouts):
        return first
    return torch.cat([tile_levels(lay) for lay in layouts])


def stack_layouts(layouts: list[LowbitLayout]) -> LowbitLayout | None:
    """One layout holding the rows of ``layouts`` one after another (``x @ [W1; W2; ...].T`` in one
    call, each output computed as by its own layout), or None when they differ in width or block
    geometry, or a layout other than the last has a partial tile."""
    first = layouts[0]
    if any(lay.bits != first.bits or lay.geometry != first.geometry for lay in layouts) or any(
        lay.out_features % TILE for lay in layouts[:-1]
    ):
        return None
    return LowbitLayout(
        bits=first.bits,
        out_features=sum(lay.out_features for lay in layouts),
        geometry=first.geometry,
        codes=torch.cat([lay.codes for lay in layouts]),
        scales=torch.cat([lay.scales for lay in layouts]),
        zeros=stacked_zeros(layouts),
        scales_finite=all(lay.scales_finite for lay in layouts),
        levels=stacked_levels(layouts),
    )


def lowbit_matmul(layout: LowbitLayout, x: torch.Tensor, lib: KernelLibrary | None = None) -> torch.Tensor:
    """``x @ W.T`` (in ``x``'s dtype) with the compiled kernels ``lib`` (default: the native build)."""
    return (lib or load_library()).matmul(layout.codes, layout.scales, layout.zeros, layout.levels, x,
                                          layout.operator_geometry)


def decode_bf16(layout: LowbitLayout, lib: KernelLibrary | None = None) -> torch.Tensor:
    """The layout's weights as a dense bf16 ``(out, in)`` matrix (``(q - z) * s``, or ``(levels[q] - z) * s``
    for a lookup layout, rounded to nearest)."""
    return (lib or load_library()).decode_bf16(layout.codes, layout.scales, layout.zeros, layout.levels,
                                               layout.operator_geometry)


@functools.lru_cache(maxsize=None)
def bf16_matmul_is_fast() -> bool:
    """Whether torch's bf16 matmul runs on AMX tiles here (oneDNN uses them when the CPU has them), and
    the kernels are built for this CPU (not as another CPU runs them, see ``build.ISA_VARIABLE``)."""
    return "amx_bf16" in cpu_flags().split() and chosen_isa() == "native"


@functools.lru_cache(maxsize=None)
def bf16_dot_is_fast() -> bool:
    """Whether torch's bf16 matmul has the AVX-512 BF16 dot product here (and the kernels are built for
    this CPU), which pays for the decode from ``BF16_DOT_BATCH`` rows on."""
    return "avx512_bf16" in cpu_flags().split() and chosen_isa() == "native"


def takes_bf16_path(layout: "LowbitLayout", x: torch.Tensor) -> bool:
    """Whether ``x @ W.T`` is faster as torch's bf16 matmul of the decoded weights than in the integer
    kernel: ``LARGE_BATCH`` rows and more on AMX, ``BF16_DOT_BATCH`` and more on AVX-512 BF16."""
    rows = x.numel() // layout.geometry.in_features
    return (rows >= LARGE_BATCH and bf16_matmul_is_fast()) or (rows >= BF16_DOT_BATCH and bf16_dot_is_fast())


def int_layout(fmt: IntFormat) -> LowbitLayout | None:
    """The kernel layout of an ``int`` format; None when a zero point is not an int16 integer (e.g.
    HQQ's fractional zeros). Scales are stored as fp16, as the layout keeps them."""
    scale, zero = fmt.scale_zero()
    if not torch.equal(zero, zero.round().clamp(-(2**15), 2**15 - 1)):
        return None
    return pack_layout(fmt.codes(), scale, zero, fmt.group, fmt.bits)


def ternary_layout(fmt: TernaryFormat) -> LowbitLayout:
    """The kernel layout of a ``ternary`` format: a trit t is the 2-bit code t + 1 with zero point 1."""
    scale = fmt.group_scales()
    codes = (fmt.trits() + 1).to(torch.uint8)
    return pack_layout(codes, scale, torch.ones_like(scale), fmt.group_size, 2)


def codebook_layout(fmt: CodebookFormat) -> LowbitLayout | None:
    """The lookup layout of a ``codebook`` format: its codes, its scales, the zero point
    :data:`LOOKUP_ZERO` and its tables as bytes ``level + 128``; None for a table that is not integer
    (a file from before tables were, decoded by the dense path instead)."""
    if not has_integer_levels(fmt.table):
        return None
    values = (fmt.table.float() + LOOKUP_ZERO).to(torch.uint8)
    values = torch.nn.functional.pad(values, (0, LOOKUP_BYTES - values.shape[1]))  # 2 and 3 bits: unused entries
    if values.shape[0] == 1:
        levels = values.repeat(1, TILE)
    else:
        tiles = math.ceil(fmt.out_features / TILE)
        levels = torch.nn.functional.pad(values, (0, 0, 0, tiles * TILE - fmt.out_features)).reshape(tiles, TILE * LOOKUP_BYTES)
    scale = fmt.scales.float()
    return pack_layout(fmt.codes(), scale, torch.full_like(scale, LOOKUP_ZERO), fmt.group, fmt.bits, levels.contiguous())


def layout_of(fmt: Format) -> LowbitLayout | None:
    """The format's kernel layout, built at first use and kept on the format object; None when its
    zero points do not fit the layout (then the format's own matmul runs)."""
    if LAYOUT_ATTR not in fmt.__dict__:
        setattr(fmt, LAYOUT_ATTR, new_layout(fmt))
    return fmt.__dict__[LAYOUT_ATTR]


def new_layout(fmt: Format) -> LowbitLayout | None:
    """The kernel layout of an ``int``, ``ternary`` or ``codebook`` format, built now (:func:`layout_of`
    keeps it)."""
    if isinstance(fmt, IntFormat):
        return int_layout(fmt)
    return codebook_layout(fmt) if isinstance(fmt, CodebookFormat) else ternary_layout(fmt)


def has_kernel_format(fmt: Format) -> bool:
    """Whether ``fmt`` is of a kind these kernels multiply (``int``, ``ternary`` or ``codebook``; an
    ``int`` format's zero points or a codebook's table may still rule out a layout, :func:`layout_of`)."""
    return isinstance(fmt, (IntFormat, TernaryFormat, CodebookFormat))


def stacked_layout(fmts: list[Format]) -> LowbitLayout | None:
    """One layout for several ``int`` / ``ternary`` formats of the same input (:func:`stack_layouts`),
    or None when one has no layout or they do not stack. Layouts not built yet are built for the stack
    only (not kept on their formats), so the stacked copy is the only one held."""
    if not all(has_kernel_format(f) for f in fmts):
        return None
    layouts = [f.__dict__[LAYOUT_ATTR] if LAYOUT_ATTR in f.__dict__ else new_layout(f) for f in fmts]
    return None if any(lay is None for lay in layouts) else stack_layouts(layouts)


@dataclass(frozen=True)
class LlamaBlock:
    """What the one-call decode step needs of a Llama block: its four projections' layouts (stacked
    q/k/v, o, stacked gate/up, down), its input and post-attention RMS norm weights (fp32) and its key
    and value caches ``(kv_heads, positions, head_dim)``, which the step writes."""

    layouts: tuple[LowbitLayout, LowbitLayout, LowbitLayout, LowbitLayout]
    norms: tuple[torch.Tensor, torch.Tensor]
    keys: torch.Tensor
    values: torch.Tensor


def decode_plan(blocks: list[LlamaBlock], eps: float, heads: int, scale: float) -> Any:
    """The decode steps of ``blocks`` in order, prepared once (``torch.classes.matpress.DecodePlan``):
    ``plan.step(h, cos, sin, position)`` takes one token's hidden state ``h`` ``(hidden,)`` (fp32) and its
    rotary ``cos``, ``sin`` ``(head_dim,)`` through every block in one call and returns the last block's
    output, writing each block's key and value at ``position``. The same arithmetic as the blocks' modules
    up to fp32 rounding, with the projections' activations rounded to int8 per block as in
    :func:`lowbit_matmul`; ``eps`` is the norms' epsilon, ``scale`` attention's."""
    codes, scales, zeros, levels, geometry, norms = [], [], [], [], [], []
    for block in blocks:
        for lay in block.layouts:
            codes.append(lay.codes)
            scales.append(lay.scales)
            zeros.append(lay.zeros)
            levels.append(torch.empty(0, dtype=torch.uint8) if lay.levels is None else lay.levels)
            geometry += lay.operator_geometry
        norms += block.norms
    keys, values = [b.keys for b in blocks], [b.values for b in blocks]
    return load_library().decode_plan(codes, scales, zeros, levels, geometry, norms, eps, keys, values, heads, scale)


def layout_matmul(layout: LowbitLayout, x: torch.Tensor, lib: KernelLibrary | None = None) -> torch.Tensor:
    """``x @ W.T`` for a CPU input the kernels ``lib`` (default: the native build) take
    (:func:`library_for`): the integer kernel, or from ``LARGE_BATCH`` rows on, where the CPU's bf16
    matmul is fast (:func:`takes_bf16_path`), torch's bf16 matmul of the decoded weights."""
    if takes_bf16_path(layout, x):
        # many rows: the matmul is compute bound, and bf16 on AMX outruns the int8 kernel many times over
        return torch.nn.functional.linear(x.to(torch.bfloat16), decode_bf16(layout, lib)).to(x.dtype)
    return lowbit_matmul(layout, x, lib)


def library_for(x: torch.Tensor) -> KernelLibrary | None:
    """The compiled kernels if they handle ``x`` (a CPU input any kernel may take, kernels built), else None."""
    return load_library() if x.is_cpu and kernels_may_take(x) else None


@register_kernel(IntFormat)
@register_kernel(TernaryFormat)
@register_kernel(CodebookFormat)
def lowbit_kernel(fmt: Format, x: torch.Tensor) -> torch.Tensor | None:
    """The registered fast path for ``int``, ``ternary`` and ``codebook`` formats on the CPU."""
    lib = library_for(x)
    layout = layout_of(fmt) if lib is not None else None
    return None if layout is None else layout_matmul(layout, x, lib)
