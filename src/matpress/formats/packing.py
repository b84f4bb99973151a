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


# Codes converted to int64 at once when packing or unpacking: the rows go through in chunks of about this
# many codes, so the temporaries stay a few tens of MB whatever the matrix (a 14336x4096 layer's int64
# codes alone would be 470 MB, several times its packed size).
CHUNK_CODES = 1 << 21


def row_chunks(rows: int, row_length: int) -> list[slice]:
    """Consecutive row ranges covering ``rows`` rows of ``row_length`` values, about ``CHUNK_CODES`` values each."""
    step = max(1, CHUNK_CODES // max(row_length, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a ``(rows, n)`` tensor of codes in ``[0, 2**bits)`` (any integer or integral float dtype) into
    ``(rows, packed_row_bytes)`` uint8."""
    if not 1 <= bits <= 8:
        raise FormatError(f"bits must be between 1 and 8, got {bits}")
    if codes.dim() != 2:
        raise FormatError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise FormatError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    rows, n = codes.shape
    out = torch.empty(rows, packed_row_bytes(n, bits), dtype=torch.uint8, device=codes.device)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    for part in row_chunks(rows, n):
        chunk = codes[part]
        c = torch.nn.functional.pad(chunk.to(torch.int64), (0, (-n) % 8)).view(chunk.shape[0], out.shape[1] // bits, 8)
        word = (c << shifts).sum(dim=-1)  # at most 56 bits: fits int64
        out[part] = ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).reshape(c.shape[0], -1)
    return out


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
    out = torch.empty(rows, n_codes, dtype=torch.uint8, device=packed.device)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    for part in row_chunks(rows, packed.shape[1] * 8 // bits):
        chunk = packed[part]
        b = chunk.to(torch.int64).view(chunk.shape[0], packed.shape[1] // bits, bits)
        word = (b << byte_shifts).sum(dim=-1)
        codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        out[part] = codes.reshape(b.shape[0], -1)[:, :n_codes]
    return out


# -- base-3 packing of ternary values --------------------------------------------------------------
# Five trits fit in one byte (3**5 = 243 <= 256): 1.6 bits per value. A row of trits t_i in {-1, 0, 1}
# is cut into runs of 5; byte j holds sum_k (t_{5j+k} + 1) * 3**k. Rows stay byte-aligned.

TRITS_PER_BYTE = 5
_TRIT_POWERS = (1, 3, 9, 27, 81)


def packed_trit_row_bytes(n_trits: int) -> int:
    """Bytes one packed row of ``n_trits`` ternary values occupies."""
    return (n_trits + TRITS_PER_BYTE - 1) // TRITS_PER_BYTE


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """Pack a ``(rows, n)`` tensor of values in {-1, 0, 1} into ``(rows, ceil(n / 5))`` uint8."""
    if trits.dim() != 2:
        raise FormatError(f"trits must be 2-D, got shape {tuple(trits.shape)}")
    if trits.numel() and (int(trits.min()) < -1 or int(trits.max()) > 1):
        raise FormatError("trits must lie in {-1, 0, 1}")
    rows, n = trits.shape
    pad = (-n) % TRITS_PER_BYTE
    digits = torch.nn.functional.pad(trits.to(torch.int64) + 1, (0, pad)).view(rows, -1, TRITS_PER_BYTE)
    powers = torch.tensor(_TRIT_POWERS, device=trits.device, dtype=torch.int64)
    return (digits * powers).sum(dim=-1).to(torch.uint8).contiguous()


def check_trit_bytes(packed: torch.Tensor) -> None:
    """Refuse bytes no five trits pack to (above 3**5 - 1)."""
    if packed.numel() and int(packed.max()) >= 3**TRITS_PER_BYTE:
        raise FormatError(f"packed trits hold a byte above {3**TRITS_PER_BYTE - 1}: the data is corrupt")


def unpack_trits(packed: torch.Tensor, n_trits: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: ``(rows, ceil(n / 5))`` uint8 -> ``(rows, n)`` int8 in {-1, 0, 1}."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise FormatError(f"packed trits must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_trit_row_bytes(n_trits):
        raise FormatError(
            f"packed trit rows hold {packed.shape[1]} bytes, expected {packed_trit_row_bytes(n_trits)} "
            f"for {n_trits} trits"
        )
    check_trit_bytes(packed)
    powers = torch.tensor(_TRIT_POWERS, device=packed.device, dtype=torch.int64)
    digits = (packed.to(torch.int64).unsqueeze(-1) // powers) % 3
    return (digits.reshape(packed.shape[0], -1)[:, :n_trits] - 1).to(torch.int8)
