"""Sparse weights: only the kept values are stored, with their positions.

- :class:`SparseFormat`, unstructured: positions as a bitmask (1 bit per weight) or as CSR column
  indices (16 or 32 bits per kept value plus row pointers), whichever is smaller at the layer's density.
- :class:`NMSparseFormat`, semi-structured n:m (2:4, 4:8; Mishra et al. 2021, "Accelerating Sparse Deep
  Neural Networks"): exactly n kept values in every m consecutive columns of a row, each kept value's
  position within its group stored in ceil(log2 m) bits, bit-packed (2 bits for 2:4).

The kept values are a child format (dense fp16 by default, or int for sparse + quantized weights): a
``(1, nnz)`` row in row-major order for unstructured sparsity, an ``(out, in * n / m)`` matrix for n:m.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from matpress.errors import FormatError
from matpress.formats.base import Format, check_weight, expect_tensor
from matpress.formats.composite import ChildSpec, CompositeFormat, encode_child
from matpress.formats.packing import pack_rows, packed_row_bytes, unpack_rows

LAYOUTS = ("bitmask", "csr")


def csr_index_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32


def layout_nbytes(layout: str, shape: tuple[int, int], nnz: int) -> int:
    """Bytes the positions take in ``layout``."""
    if layout == "bitmask":
        return shape[0] * packed_row_bytes(shape[1], 1)
    return nnz * torch.empty(0, dtype=csr_index_dtype(shape[1])).element_size() + 4 * (shape[0] + 1)


def magnitude_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``1 - sparsity`` fraction of entries with the largest ``scores`` (whole matrix)."""
    check_sparsity(sparsity)
    n_pruned = int(round(sparsity * scores.numel()))
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.argsort(scores.flatten())[:n_pruned]] = False
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest ``scores`` in every group of ``m`` consecutive columns of each row."""
    check_nm(n, m, scores.shape[1])
    groups = scores.reshape(scores.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.view_as(scores)


def check_sparsity(sparsity: Any) -> float:
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0 <= sparsity < 1:
        raise FormatError(f"sparsity must be a fraction in [0, 1), got {sparsity!r}")
    return float(sparsity)


def check_nm(n: Any, m: Any, in_features: int) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)) or not 1 <= n <= m:
        raise FormatError(f"n:m sparsity needs integers 1 <= n <= m, got n={n!r}, m={m!r}")
    if m > 128:  # positions must fit the 7-bit packing
        raise FormatError(f"n:m sparsity supports groups of at most 128 columns, got m={m}")
    if in_features % m:
        raise FormatError(f"n:m sparsity: in_features={in_features} is not a multiple of m={m}")


def check_csr(row_ptr: torch.Tensor, col_idx: torch.Tensor, in_features: int) -> None:
    """CSR positions that describe exactly ``len(col_idx)`` distinct entries of an ``in_features``-wide
    matrix: row pointers rising from 0 to that count by at most ``in_features`` per row, column
    indices in range and increasing within each row. Checked without building the mask, so a
    tampered pointer cannot make it allocate."""
    ptr, cols = row_ptr.long(), col_idx.long()
    nnz, counts = cols.numel(), ptr.diff()
    if int(ptr[0]) != 0 or int(ptr[-1]) != nnz or bool((counts < 0).any()) or bool((counts > in_features).any()):
        raise FormatError(
            f"sparse format: row pointers must rise from 0 to the {nnz} kept values, by at most {in_features} per row"
        )
    if nnz and (int(cols.min()) < 0 or int(cols.max()) >= in_features):
        raise FormatError(f"sparse format: column indices must lie in [0, {in_features})")
    row_start = torch.zeros(nnz, dtype=torch.bool, device=cols.device)
    row_start[ptr[:-1][counts > 0]] = True
    if not bool((cols.diff() > 0).logical_or(row_start[1:]).all()):
        raise FormatError("sparse format: column indices must increase within each row (no position twice)")


def nm_index_bits(m: int) -> int:
    """Bits of one kept entry's position within its group of ``m`` columns."""
    return max(1, math.ceil(math.log2(m)))


class SparseFormat(CompositeFormat):
    """Unstructured sparsity: kept values (child format, ``(1, nnz)``) and their positions."""

    name = "sparse"
    slots = ("values",)

    def __init__(self, shape: tuple[int, int], layout: str, positions: dict[str, torch.Tensor], values: Format):
        super().__init__(shape, {"values": values})
        if layout not in LAYOUTS:
            raise FormatError(f"sparse format: layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.values = values
        self.nnz = values.shape[1]
        if values.shape[0] != 1:
            raise FormatError(f"sparse format: kept values must be one row (1, nnz), got shape {values.shape}")
        out_f, in_f = self.shape
        if layout == "bitmask":
            self.positions = {
                "mask": expect_tensor(positions, "mask", (out_f, packed_row_bytes(in_f, 1)), torch.uint8, self.name)
            }
            kept = int(self.mask().sum())
            if kept != self.nnz:
                raise FormatError(f"sparse format: positions hold {kept} entries but {self.nnz} values")
        else:
            self.positions = {
                "col_idx": expect_tensor(positions, "col_idx", (self.nnz,), csr_index_dtype(in_f), self.name),
                "row_ptr": expect_tensor(positions, "row_ptr", (out_f + 1,), torch.int32, self.name),
            }
            check_csr(self.positions["row_ptr"], self.positions["col_idx"], in_f)

    @classmethod
    def from_mask(
        cls, weight: torch.Tensor, mask: torch.Tensor, values: ChildSpec | Format = None, layout: str = "auto"
    ) -> "SparseFormat":
        """Keep ``weight[mask]``; ``values`` is a child spec (default dense fp16) or an already built
        ``(1, nnz)`` format; ``layout`` 'auto' takes the smaller of bitmask and CSR."""
        nnz = int(mask.sum())
        if nnz == 0:
            raise FormatError("sparse format: the mask keeps no weight; lower the sparsity")
        if layout == "auto":
            layout = min(LAYOUTS, key=lambda lay: layout_nbytes(lay, tuple(mask.shape), nnz))
        if layout == "bitmask":
            positions = {"mask": pack_rows(mask.to(torch.int64), 1)}
        elif layout == "csr":
            cols = mask.nonzero()[:, 1]
            row_ptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
            row_ptr[1:] = mask.sum(dim=1).cumsum(0)
            positions = {"col_idx": cols.to(csr_index_dtype(mask.shape[1])), "row_ptr": row_ptr.to(torch.int32)}
        else:
            raise FormatError(f"sparse format: layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
        if not isinstance(values, Format):
            values = encode_child(weight.detach().float()[mask].view(1, -1), values, cls.name)
        return cls(tuple(mask.shape), layout, positions, values)

    @classmethod
    def encode(
        cls, weight: torch.Tensor, sparsity: float = 0.5, values: ChildSpec = None, layout: str = "auto"
    ) -> "SparseFormat":
        """Magnitude pruning: drop the ``sparsity`` fraction of weights smallest in absolute value."""
        check_weight(weight)
        return cls.from_mask(weight, magnitude_mask(weight.detach().abs(), sparsity), values, layout)

    def mask(self) -> torch.Tensor:
        """Boolean ``(out, in)``: True where a value is kept."""
        if self.layout == "bitmask":
            return unpack_rows(self.positions["mask"], 1, self.in_features).bool()
        row_ptr = self.positions["row_ptr"].long()
        rows = torch.repeat_interleave(torch.arange(self.out_features, device=row_ptr.device), row_ptr.diff())
        mask = torch.zeros(self.shape, dtype=torch.bool, device=row_ptr.device)
        mask[rows, self.positions["col_idx"].long()] = True
        return mask

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        mask = self.mask()
        w = torch.zeros(self.shape, dtype=torch.float32, device=mask.device)
        w[mask] = self.values.decode().flatten()
        return w.to(dtype)

    @property
    def density(self) -> float:
        return self.nnz / (self.out_features * self.in_features)

    def own_config(self) -> dict[str, Any]:
        return {"layout": self.layout}

    def own_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.positions)

    @classmethod
    def from_parts(
        cls, shape: tuple[int, int], config: dict[str, Any], own: dict[str, torch.Tensor], children: dict[str, Format]
    ) -> "SparseFormat":
        return cls(shape, config.get("layout"), own, children["values"])

    def describe(self) -> str:
        return f"sparse {100 * (1 - self.density):.0f}% {self.layout} {self.values.describe().removeprefix('dense ')}"


class NMSparseFormat(CompositeFormat):
    """n:m semi-structured sparsity: kept values ``(out, in * n / m)`` (child format) and each one's
    position in its group of m columns, packed in ceil(log2 m) bits."""

    name = "nm_sparse"
    slots = ("values",)

    def __init__(self, shape: tuple[int, int], n: int, m: int, indices: torch.Tensor, values: Format):
        super().__init__(shape, {"values": values})
        check_nm(n, m, self.in_features)
        self.n, self.m = n, m
        self.index_bits = nm_index_bits(m)
        kept = self.in_features // m * n
        if values.shape != (self.out_features, kept):
            raise FormatError(f"nm_sparse format: kept values have shape {values.shape}, expected {(self.out_features, kept)}")
        self.values = values
        self.indices = expect_tensor(
            {"indices": indices}, "indices", (self.out_features, packed_row_bytes(kept, self.index_bits)), torch.uint8, self.name
        )
        pos = self.positions_in_group()
        if int(pos.max()) >= m or (n > 1 and bool((pos.diff(dim=-1) <= 0).any())):
            raise FormatError(f"nm_sparse format: stored positions are not {n} increasing indices below {m} per group")

    @classmethod
    def from_mask(
        cls, weight: torch.Tensor, mask: torch.Tensor, n: int, m: int, values: ChildSpec | Format = None
    ) -> "NMSparseFormat":
        """Keep ``weight[mask]``, where ``mask`` keeps exactly ``n`` of every ``m`` columns per row."""
        check_nm(n, m, mask.shape[1])
        out_f, in_f = mask.shape
        groups = mask.reshape(out_f, -1, m)
        if not bool((groups.sum(dim=-1) == n).all()):
            raise FormatError(f"nm_sparse format: the mask does not keep exactly {n} of every {m} columns")
        # positions of the kept entries within each group, in increasing order
        order = torch.arange(m, device=mask.device).expand_as(groups)
        pos = order[groups].view(out_f, -1)
        indices = pack_rows(pos.to(torch.int64), nm_index_bits(m))
        if not isinstance(values, Format):
            values = encode_child(weight.detach().float()[mask].view(out_f, -1), values, cls.name)
        return cls((out_f, in_f), n, m, indices, values)

    @classmethod
    def encode(cls, weight: torch.Tensor, n: int = 2, m: int = 4, values: ChildSpec = None) -> "NMSparseFormat":
        """Magnitude n:m pruning: keep the n largest |w| of every m consecutive columns."""
        check_weight(weight)
        return cls.from_mask(weight, nm_mask(weight.detach().abs(), n, m), n, m, values)

    def positions_in_group(self) -> torch.Tensor:
        """``(out, in / m, n)`` int64: the kept columns of each group, relative to the group start."""
        kept = self.in_features // self.m * self.n
        return unpack_rows(self.indices, self.index_bits, kept).long().view(self.out_features, -1, self.n)

    def mask(self) -> torch.Tensor:
        pos = self.positions_in_group()
        groups = torch.zeros(pos.shape[0], pos.shape[1], self.m, dtype=torch.bool, device=pos.device)
        groups.scatter_(-1, pos, True)
        return groups.view(self.shape)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        pos = self.positions_in_group()
        groups = torch.zeros(pos.shape[0], pos.shape[1], self.m, device=pos.device)
        groups.scatter_(-1, pos, self.values.decode().view_as(pos.float()))
        return groups.view(self.shape).to(dtype)

    def own_config(self) -> dict[str, Any]:
        return {"n": self.n, "m": self.m}

    def own_tensors(self) -> dict[str, torch.Tensor]:
        return {"indices": self.indices}

    @classmethod
    def from_parts(
        cls, shape: tuple[int, int], config: dict[str, Any], own: dict[str, torch.Tensor], children: dict[str, Format]
    ) -> "NMSparseFormat":
        return cls(shape, config.get("n"), config.get("m"), own.get("indices"), children["values"])

    def describe(self) -> str:
        return f"sparse {self.n}:{self.m} {self.values.describe().removeprefix('dense ')}"
