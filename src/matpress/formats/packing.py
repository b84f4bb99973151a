"""Bit-packing of unsigned integer codes into bytes.

Each row of codes is packed on its own (rows stay byte-aligned, which kernels rely on). Within a row,
every run of 8 codes of ``bits`` bits becomes ``bits`` bytes, read as one little-endian integer whose
bits ``[bits*i, bits*(i+1))`` hold code ``i``. For 4 bits this is the usual "low nibble first" layout,
for 2 bits four codes per byte, for 3 bits eight codes in three bytes. 8-bit codes are stored as is.
"""

from __future__ import annotations

import torch

from matpress.errors import FormatError


def packed_row_bytes(n_codes: int, bits: int) -> int:
    """Bytes one packed row of ``n_codes`` codes occupies."""
    return ((n_codes + 7) // 8) * bits


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a ``(rows, n)`` tensor of codes in ``[0, 2**bits)`` into ``(rows, packed_row_bytes)`` uint8."""
    if not 1 <= bits <= 8:
        raise FormatError(f"bits must be between 1 and 8, got {bits}")
    if codes.dim() != 2:
        raise FormatError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise FormatError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    rows, n = codes.shape
    pad = (-n) % 8
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).view(rows, -1, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(dim=-1)  # at most 56 bits: fits int64
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.reshape(rows, -1).to(torch.uint8).contiguous()


def unpack_rows(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: ``(rows, packed_row_bytes)`` uint8 -> ``(rows, n_codes)`` uint8."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise FormatError(f"packed codes must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    expected = packed_row_bytes(n_codes, bits) if bits < 8 else n_codes
    if packed.shape[1] != expected:
        raise FormatError(
            f"packed rows hold {packed.shape[1]} bytes, expected {expected} for {n_codes} {bits}-bit codes"
        )
    if bits == 8:
        return packed
    rows = packed.shape[0]
    b = packed.to(torch.int64).view(rows, -1, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(dim=-1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(rows, -1)[:, :n_codes].to(torch.uint8)
