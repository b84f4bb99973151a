"""Triton ``x @ W.T`` for the ``int`` (1-8 bits) and ``ternary`` formats on CUDA GPUs.

The kernel reads the formats' stored tensors as they are (no second layout on the GPU): a row of ``int``
codes is a little-endian bit stream (:mod:`matpress.formats.packing`), a row of trits five base-3 digits
per byte. It walks each row in *units* of whole bytes that hold whole codes -- one byte for 1, 2, 4 and
8 bits and for trits (8/bits codes, or 5 trits), ``bits`` bytes for 3, 5, 6 and 7 bits (8 codes) -- and
peels the codes off a unit one slot at a time; slot ``j`` of unit ``u`` is column ``u * codes_per_unit
+ j``, so each slot multiplies a strided slice of the activations. Weights are ``(code - zero) * scale``
in fp32, as :meth:`~matpress.formats.Format.decode` computes them.

Two ways to accumulate, chosen per call by the number of activation rows:

- few rows (decoding): products summed in fp32 on the CUDA cores, exact up to fp32 rounding;
- from ``DOT_ROWS`` rows on: ``tl.dot`` on the tensor cores in the activations' dtype (fp16 / bf16; fp32
  activations as tf32 when ``torch.backends.cuda.matmul.allow_tf32`` is set, else full fp32), with fp32
  accumulation -- the error is the rounding of the weights to that dtype.

The same kernel runs on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``); the tests use it to
check the arithmetic on machines without a GPU.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from matpress.formats import Format, IntFormat, TernaryFormat

# From this many activation rows on, the tensor-core (tl.dot) variant runs (its smallest tile is 16 rows).
DOT_ROWS = 16
# Products the decode variant forms per program and slot (rows x outputs x units): bounds registers.
DECODE_TILE = 4096
# Fused multiply-adds round once where a multiply then an add round twice: never less accurate. Said
# explicitly, as Triton 3.9 warns that its default will change.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


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
    SCALE_PER_UNIT: tl.constexpr,  # GROUP is a multiple of CODES_PER_UNIT: a unit never spans two groups
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
    group_start = rows.to(tl.int64) * n_groups
    x_rows = x_ptr + ms.to(tl.int64)[:, None] * K
    n_units = (K + CODES_PER_UNIT - 1) // CODES_PER_UNIT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for u0 in range(0, n_units, BLOCK_U):
        units = u0 + tl.arange(0, BLOCK_U)
        tile_ok = row_ok[:, None] & (units < n_units)[None, :]
        # the unit's bytes, little-endian, in one integer
        if WIDE_WORD:
            word = tl.zeros((BLOCK_N, BLOCK_U), dtype=tl.int64)
        else:
            word = tl.zeros((BLOCK_N, BLOCK_U), dtype=tl.int32)
        for b in tl.static_range(UNIT_BYTES):
            byte = tl.load(packed_ptr + row_start[:, None] + (units * UNIT_BYTES + b)[None, :], mask=tile_ok, other=0)
            word = word | (byte.to(word.dtype) << (8 * b))
        if SCALE_PER_UNIT:
            scale, zero = _group_params(scales_ptr, zeros_ptr, group_start, units * CODES_PER_UNIT // GROUP, tile_ok, STORED_ZEROS, ZERO)
        for j in tl.static_range(CODES_PER_UNIT):
            cols = units * CODES_PER_UNIT + j
            if BITS == 0:
                code = word % 3
                word = word // 3
            else:
                code = word & ((1 << BITS) - 1)
                word = word >> BITS
            if not SCALE_PER_UNIT:
                col_ok = row_ok[:, None] & (cols < K)[None, :]
                scale, zero = _group_params(scales_ptr, zeros_ptr, group_start, cols // GROUP, col_ok, STORED_ZEROS, ZERO)
            w = (code.to(tl.float32) - zero) * scale  # (BLOCK_N, BLOCK_U); columns past K meet x = 0
            x = tl.load(x_rows + cols[None, :], mask=m_ok[:, None] & (cols < K)[None, :], other=0.0)
            if USE_DOT:
                acc += tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
            else:
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    y = y_ptr + ms.to(tl.int64)[:, None] * N + rows[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])


@triton.jit
def _group_params(scales_ptr, zeros_ptr, group_start, groups, ok, STORED_ZEROS: tl.constexpr, ZERO: tl.constexpr):
    """Scale and zero point of each ``(row, group)`` as fp32 (0 where ``ok`` is false)."""
    at = group_start[:, None] + groups[None, :]
    scale = tl.load(scales_ptr + at, mask=ok, other=0.0).to(tl.float32)
    if STORED_ZEROS:
        zero = tl.load(zeros_ptr + at, mask=ok, other=0.0).to(tl.float32)
    else:
        zero = tl.full(scale.shape, ZERO, tl.float32)
    return scale, zero


def _packing(fmt: Format) -> tuple[int, int, int, int, float]:
    """``(bits, unit_bytes, codes_per_unit, group, fixed zero point)`` of an int or ternary format (a
    trit t is the digit t + 1 with zero point 1; asymmetric int formats store their zero points)."""
    if isinstance(fmt, TernaryFormat):
        return 0, 1, 5, fmt.group_size, 1.0
    if 8 % fmt.bits == 0:
        unit_bytes, per_unit = 1, 8 // fmt.bits
    else:
        unit_bytes, per_unit = fmt.bits, 8
    return fmt.bits, unit_bytes, per_unit, fmt.group, float(1 << (fmt.bits - 1))


def _dot_dtype(dtype: torch.dtype) -> tuple[tl.dtype, str]:
    if dtype == torch.float16:
        return tl.float16, "ieee"
    if dtype == torch.bfloat16:
        return tl.bfloat16, "ieee"
    return tl.float32, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def launch_plan(fmt: IntFormat | TernaryFormat, rows: int, dtype: torch.dtype) -> tuple[tuple[int, int], dict]:
    """The grid and the compile-time constants of the kernel for ``rows`` activation rows of ``dtype``."""
    bits, unit_bytes, per_unit, group, zero = _packing(fmt)
    use_dot = rows >= DOT_ROWS
    if use_dot:
        block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
        block_n, block_u = 64, max(16, 64 // per_unit)
    else:
        block_m = triton.next_power_of_2(rows)
        block_n = 16
        # the largest power of two that keeps rows x outputs x units within DECODE_TILE
        block_u = max(1, 1 << ((DECODE_TILE // (block_m * block_n * per_unit)).bit_length() - 1))
    dot_dtype, precision = _dot_dtype(dtype)
    constants = dict(
        BITS=bits, UNIT_BYTES=unit_bytes, CODES_PER_UNIT=per_unit, GROUP=group,
        STORED_ZEROS=getattr(fmt, "zeros", None) is not None, ZERO=zero,
        SCALE_PER_UNIT=group % per_unit == 0, WIDE_WORD=unit_bytes > 3,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_U=block_u,
        USE_DOT=use_dot, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
    )
    return (triton.cdiv(fmt.out_features, block_n), triton.cdiv(rows, block_m)), constants


def packed_matmul(fmt: IntFormat | TernaryFormat, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` in ``x``'s dtype, from the format's stored tensors, on ``x``'s device."""
    k, n = fmt.in_features, fmt.out_features
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    grid, constants = launch_plan(fmt, m, x.dtype)
    zeros = getattr(fmt, "zeros", None)
    # Triton launches on the current CUDA device: make it x's (a model may live on another GPU)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _packed_matmul[grid](
            x2, y, fmt.packed, fmt.scales, fmt.scales if zeros is None else zeros,  # unread without zeros
            m, n, k, fmt.packed.shape[1], fmt.scales.shape[1],
            **constants, **COMPILE_OPTIONS,
        )
    return y.reshape(*x.shape[:-1], n)
