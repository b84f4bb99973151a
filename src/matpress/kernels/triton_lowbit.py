"""Triton ``x @ W.T`` for the ``int`` (1-8 bits) and ``ternary`` formats on CUDA GPUs.

The kernel reads the formats' stored tensors as they are (no second layout on the GPU): a row of ``int``
codes is a little-endian bit stream (:mod:`matpress.formats.packing`), a row of trits five base-3 digits
per byte. It walks each row in *units* of whole bytes that hold whole codes -- one byte for 1, 2, 4 and
8 bits and for trits (8/bits codes, or 5 trits), ``bits`` bytes for 3, 5, 6 and 7 bits (8 codes) -- and
peels the codes off a unit one slot at a time; slot ``j`` of unit ``u`` is column ``u * codes_per_unit
+ j``, so each slot multiplies a strided slice of the activations. Weights are ``(code - zero) * scale``
in fp32, as :meth:`~matpress.formats.Format.decode` computes them.

Two ways to accumulate, chosen per call by the number of activation rows:

- few rows (decoding): products accumulated elementwise in fp32 on the CUDA cores and summed once after
  the loop, exact up to fp32 rounding;
- from ``DOT_ROWS`` rows on: ``tl.dot`` in the activations' dtype with fp32 accumulation -- tensor cores
  for fp16 / bf16 (the error is the rounding of the weights to that dtype) and for fp32 as tf32 when
  ``torch.backends.cuda.matmul.allow_tf32`` is set; otherwise fp32 multiply-adds at full precision.

The same kernel runs on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``); the tests use it to
check the arithmetic on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
from types import MappingProxyType

import torch
import triton
import triton.language as tl

from matpress.formats import Format, IntFormat, TernaryFormat

# From this many activation rows on, the tl.dot variant runs (its smallest tile is 16 rows).
DOT_ROWS = 16
# The decode variant takes at most this many activation rows per program (more rows: more programs).
DECODE_ROWS = 8
# Products the decode variant forms per program and loop step, over all slots of a unit
# (rows x outputs x units x codes per unit): bounds its registers.
DECODE_TILE = 8192
# Fused multiply-adds round once where a multiply then an add round twice: never less accurate. Said
# explicitly, as Triton 3.9 warns that its default will change.
COMPILE_OPTIONS = {"enable_fp_fusion": True}
# Where the kernel reads scales and zero points: once per loop step (a step's columns lie in one group),
# once per unit (a unit's codes lie in one group), or per column.
PER_STEP, PER_UNIT, PER_COLUMN = 2, 1, 0


@triton.jit
def _packed_matmul(
    x_ptr, y_ptr, packed_ptr, scales_ptr, zeros_ptr,
    M, N, K, row_bytes, n_groups,
    BITS: tl.constexpr,  # code width; 0 for trits
    UNIT_BYTES: tl.constexpr,
    CODES_PER_UNIT: tl.constexpr,
    GROUP: tl.constexpr,
    STORED_ZEROS: tl.constexpr,  # one zero point per group in zeros_ptr, else the fixed ZERO
    ZERO: tl.constexpr,
    SCALES_AT: tl.constexpr,  # PER_STEP, PER_UNIT or PER_COLUMN
    EVEN_UNITS: tl.constexpr,  # every loop step is whole: no mask along the units (vector loads)
    WIDE_WORD: tl.constexpr,  # units of 4 bytes or more need 64-bit words (int32 keeps 31 value bits)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_U: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    m_ok = ms < M
    row_start = rows.to(tl.int64) * row_bytes
    group_start = rows.to(tl.int64)[:, None] * n_groups
    x_rows = x_ptr + ms.to(tl.int64)[:, None] * K
    n_units = (K + CODES_PER_UNIT - 1) // CODES_PER_UNIT
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        # summed over the units once, after the loop: no reduction inside it
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_U), dtype=tl.float32)
    for u0 in range(0, n_units, BLOCK_U):
        units = u0 + tl.arange(0, BLOCK_U)
        if EVEN_UNITS:
            tile_ok = row_ok[:, None]
        else:
            tile_ok = row_ok[:, None] & (units < n_units)[None, :]
        # the unit's bytes, little-endian, in one integer
        if WIDE_WORD:
            word = tl.zeros((BLOCK_N, BLOCK_U), dtype=tl.int64)
        else:
            word = tl.zeros((BLOCK_N, BLOCK_U), dtype=tl.int32)
        for b in tl.static_range(UNIT_BYTES):
            byte = tl.load(packed_ptr + row_start[:, None] + (units * UNIT_BYTES + b)[None, :], mask=tile_ok, other=0)
            word = word | (byte.to(word.dtype) << (8 * b))
        if SCALES_AT == 2:  # PER_STEP
            scale, zero = _group_params(scales_ptr, zeros_ptr, group_start + u0 * CODES_PER_UNIT // GROUP, row_ok[:, None], STORED_ZEROS, ZERO)
        elif SCALES_AT == 1:  # PER_UNIT
            scale, zero = _group_params(scales_ptr, zeros_ptr, group_start + (units * CODES_PER_UNIT // GROUP)[None, :], tile_ok, STORED_ZEROS, ZERO)
        for j in tl.static_range(CODES_PER_UNIT):
            cols = units * CODES_PER_UNIT + j
            if BITS == 0:
                code = word % 3
                word = word // 3
            else:
                code = word & ((1 << BITS) - 1)
                word = word >> BITS
            if SCALES_AT == 0:  # PER_COLUMN
                col_ok = row_ok[:, None] & (cols < K)[None, :]
                scale, zero = _group_params(scales_ptr, zeros_ptr, group_start + (cols // GROUP)[None, :], col_ok, STORED_ZEROS, ZERO)
            w = (code.to(tl.float32) - zero) * scale  # (BLOCK_N, BLOCK_U); columns past K meet x = 0
            x = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & (cols < K)[None, :], other=0.0)
            if USE_DOT:
                acc += tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
            else:
                acc += x.to(tl.float32)[:, None, :] * w[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc, axis=2)
    y = y_ptr + ms.to(tl.int64)[:, None] * N + rows[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])


@triton.jit
def _group_params(scales_ptr, zeros_ptr, at, ok, STORED_ZEROS: tl.constexpr, ZERO: tl.constexpr):
    """Scale and zero point at offsets ``at`` of the ``(rows, groups)`` tables, as fp32 (0 where not
    ``ok``)."""
    scale = tl.load(scales_ptr + at, mask=ok, other=0.0).to(tl.float32)
    if STORED_ZEROS:
        zero = tl.load(zeros_ptr + at, mask=ok, other=0.0).to(tl.float32)
    else:
        zero = tl.full(scale.shape, ZERO, tl.float32)
    return scale, zero


def _packing(fmt: Format) -> tuple[int, int, int, int, float, bool]:
    """``(bits, unit_bytes, codes_per_unit, group, fixed zero point, stores zeros)`` of an int or
    ternary format (a trit t is the digit t + 1 with zero point 1)."""
    if isinstance(fmt, TernaryFormat):
        return 0, 1, 5, fmt.group_size, 1.0, False
    if 8 % fmt.bits == 0:
        unit_bytes, per_unit = 1, 8 // fmt.bits
    else:
        unit_bytes, per_unit = fmt.bits, 8
    return fmt.bits, unit_bytes, per_unit, fmt.group, float(1 << (fmt.bits - 1)), fmt.zeros is not None


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


@functools.lru_cache(maxsize=1024)
def _constants(
    packing: tuple, in_features: int, block_m: int, dtype: torch.dtype, tf32: bool
) -> MappingProxyType:
    bits, unit_bytes, per_unit, group, zero, stored_zeros = packing
    use_dot = block_m >= DOT_ROWS
    if use_dot:
        block_n, block_u = 64, max(16, 64 // per_unit)
        dot_dtype, precision = {torch.float16: (tl.float16, "ieee"), torch.bfloat16: (tl.bfloat16, "ieee")}.get(
            dtype, (tl.float32, "tf32" if tf32 else "ieee"))
    else:
        block_n = 16
        budget = _power_of_two_at_most(DECODE_TILE // (block_m * block_n * per_unit))
        # a step of up to 4x fewer units whose columns lie in one group reads one scale per row and step
        shorter = [budget >> i for i in range(3) if budget >> i]
        block_u = next((u for u in shorter if group % (u * per_unit) == 0), budget)
        dot_dtype, precision = tl.float32, "ieee"  # unused: fixed, so that no setting recompiles this variant
    if group % (block_u * per_unit) == 0:
        scales_at = PER_STEP
    else:
        scales_at = PER_UNIT if group % per_unit == 0 else PER_COLUMN
    n_units = -(-in_features // per_unit)
    return MappingProxyType(dict(  # cached: read-only
        BITS=bits, UNIT_BYTES=unit_bytes, CODES_PER_UNIT=per_unit, GROUP=group,
        STORED_ZEROS=stored_zeros, ZERO=zero, SCALES_AT=scales_at, EVEN_UNITS=n_units % block_u == 0,
        WIDE_WORD=unit_bytes > 3, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_U=block_u,
        USE_DOT=use_dot, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
    ))


def launch_plan(
    fmt: IntFormat | TernaryFormat, rows: int, dtype: torch.dtype
) -> tuple[tuple[int, int], MappingProxyType]:
    """The grid and the compile-time constants of the kernel for ``rows`` activation rows of ``dtype``."""
    if rows >= DOT_ROWS:
        block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    else:
        block_m = min(triton.next_power_of_2(rows), DECODE_ROWS)
    constants = _constants(_packing(fmt), fmt.in_features, block_m, dtype, torch.backends.cuda.matmul.allow_tf32)
    return (triton.cdiv(fmt.out_features, constants["BLOCK_N"]), triton.cdiv(rows, block_m)), constants


def packed_matmul(fmt: IntFormat | TernaryFormat, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` in ``x``'s dtype, from the format's stored tensors, on ``x``'s device."""
    k, n = fmt.in_features, fmt.out_features
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    grid, constants = launch_plan(fmt, m, x.dtype)
    # The kernel reads rows at a stride of their length: contiguous tensors (a no-op when they are).
    packed, scales = fmt.packed.contiguous(), fmt.scales.contiguous()
    zeros = scales if getattr(fmt, "zeros", None) is None else fmt.zeros.contiguous()  # unread then
    # Triton launches on the current CUDA device: make it x's (a model may live on another GPU)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _packed_matmul[grid](
            x2, y, packed, scales, zeros, m, n, k, packed.shape[1], scales.shape[1],
            **constants, **COMPILE_OPTIONS,
        )
    return y.reshape(*x.shape[:-1], n)
