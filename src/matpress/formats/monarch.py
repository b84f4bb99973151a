"""Structured matrices built from block-diagonal factors.

Monarch (Dao et al. 2022, "Monarch: Expressive Structured Matrices for Efficient and Accurate
Training"): ``W = P L P^T R`` with ``R`` and ``L`` block-diagonal and ``P`` a fixed permutation. With the
input split into ``b`` blocks of ``p`` columns and the output into ``q`` blocks of ``s`` rows,
``R`` holds ``b`` blocks ``(q, p)`` and ``L`` holds ``q`` blocks ``(s, b)``; the permutation between them
transposes the ``(b, q)`` grid of intermediate values. Then
``W[(a, t), (j, u)] = L[a, t, j] * R[j, a, u]``: every ``(s, p)`` sub-block of W is rank one, which makes
the projection of a dense matrix onto Monarch matrices closed-form (one rank-1 SVD per sub-block,
Theorem 1 of the paper). Stored: ``q * in + b * out`` fp16 values.

Block-diagonal (``W = diag(B_1, ..., B_b)``, the Monarch factor on its own) is the simplest case.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from matpress.errors import FormatError
from matpress.formats.base import Format, check_weight, expect_tensor, fp16_factor


def check_blocks(nblocks: Any, dim: int, what: str) -> int:
    if not isinstance(nblocks, int) or isinstance(nblocks, bool) or nblocks < 1 or dim % nblocks:
        raise FormatError(f"{what}={nblocks!r} must be a positive integer dividing {dim}")
    return nblocks


def blockdiag_matmul(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ diag(blocks).T`` for ``blocks`` ``(nb, rows, cols)`` and ``x`` ``(..., nb * cols)``."""
    nb, rows, cols = blocks.shape
    y = torch.einsum("...bc,brc->...br", x.reshape(*x.shape[:-1], nb, cols), blocks.to(x.dtype))
    return y.reshape(*x.shape[:-1], nb * rows)


def monarch_project(
    weight: torch.Tensor, nblocks: int, out_blocks: int, input_roots: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form projection onto Monarch matrices: the best rank-1 approximation of every ``(s, p)``
    sub-block. With ``input_roots`` ``(b, p, p)`` (lower Cholesky factors ``C_j`` of the blocks of the
    input second moment, ``H_jj = C_j C_j^T``) each sub-block minimises ``||(W_aj - l r^T) C_j||``, the
    layer-output error under the block-diagonal part of the Hessian. Returns ``(R (b, q, p), L (q, s, b))``."""
    out_f, in_f = weight.shape
    b, q = nblocks, out_blocks
    p, s = in_f // b, out_f // q
    sub = weight.float().reshape(q, s, b, p).permute(0, 2, 1, 3)  # (q, b, s, p)
    if input_roots is not None:
        sub = sub @ input_roots.unsqueeze(0)
    u, sv, vh = torch.linalg.svd(sub, full_matrices=False)
    root = sv[..., 0].sqrt()  # (q, b)
    left = u[..., :, 0] * root[..., None]  # (q, b, s)
    right = vh[..., 0, :] * root[..., None]  # (q, b, p)
    if input_roots is not None:  # r^T = v^T C_j^{-1}
        right = torch.linalg.solve_triangular(
            input_roots.unsqueeze(0).transpose(-1, -2), right.unsqueeze(-1), upper=True
        ).squeeze(-1)
    return right.permute(1, 0, 2).contiguous(), left.permute(0, 2, 1).contiguous()


class MonarchFormat(Format):
    """``W = P L P^T R``: ``R`` ``(b, q, p)`` and ``L`` ``(q, s, b)`` block-diagonal factors in fp16."""

    name = "monarch"

    def __init__(self, shape: tuple[int, int], right: torch.Tensor, left: torch.Tensor):
        super().__init__(shape)
        if right.dim() != 3 or left.dim() != 3:
            raise FormatError(f"monarch format: factors must be 3-D, got {tuple(right.shape)} and {tuple(left.shape)}")
        b, q = right.shape[0], left.shape[0]
        check_blocks(b, self.in_features, "monarch format: nblocks")
        check_blocks(q, self.out_features, "monarch format: out_blocks")
        p, s = self.in_features // b, self.out_features // q
        self.right = expect_tensor({"right": right}, "right", (b, q, p), torch.float16, self.name)
        self.left = expect_tensor({"left": left}, "left", (q, s, b), torch.float16, self.name)
        self.nblocks, self.out_blocks = b, q

    @classmethod
    def encode(
        cls, weight: torch.Tensor, nblocks: int = 4, out_blocks: Optional[int] = None,
        input_roots: Optional[torch.Tensor] = None,
    ) -> "MonarchFormat":
        """Closed-form Frobenius projection; ``nblocks`` input blocks, ``out_blocks`` output blocks
        (default ``nblocks``); with ``input_roots`` (Cholesky factors of each input block's Hessian,
        ``(nblocks, p, p)``) the projection is weighted by the inputs (see :func:`monarch_project`)."""
        check_weight(weight)
        q = nblocks if out_blocks is None else out_blocks
        check_blocks(nblocks, weight.shape[1], "monarch: nblocks")
        check_blocks(q, weight.shape[0], "monarch: out_blocks")
        right, left = monarch_project(weight.detach().float(), nblocks, q, input_roots)
        return cls.from_factors(tuple(weight.shape), right, left)

    @classmethod
    def from_factors(cls, shape: tuple[int, int], right: torch.Tensor, left: torch.Tensor) -> "MonarchFormat":
        return cls(shape, fp16_factor(right, "monarch factor R"), fp16_factor(left, "monarch factor L"))

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = torch.einsum("atj,jau->atju", self.left.float(), self.right.float())
        return w.reshape(self.shape).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        h = blockdiag_matmul(x, self.right)  # (..., b * q)
        h = h.reshape(*x.shape[:-1], self.nblocks, self.out_blocks).transpose(-1, -2).reshape(h.shape)
        return blockdiag_matmul(h, self.left)

    def config(self) -> dict[str, Any]:
        return {}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"right": self.right, "left": self.left}

    @classmethod
    def from_tensors(
        cls, shape: tuple[int, int], config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> "MonarchFormat":
        for key in ("right", "left"):
            if tensors.get(key) is None:
                raise FormatError(f"monarch format: stored tensor {key!r} is missing")
        return cls(shape, tensors["right"], tensors["left"])

    def describe(self) -> str:
        return f"monarch b{self.nblocks}x{self.out_blocks} fp16"


class BlockDiagFormat(Format):
    """``W = diag(B_1, ..., B_b)``: ``b`` fp16 blocks ``(out / b, in / b)``, everything else zero."""

    name = "blockdiag"

    def __init__(self, shape: tuple[int, int], blocks: torch.Tensor):
        super().__init__(shape)
        b = blocks.shape[0] if blocks.dim() == 3 else 0
        check_blocks(b, self.in_features, "blockdiag format: nblocks")
        check_blocks(b, self.out_features, "blockdiag format: nblocks")
        expected = (b, self.out_features // b, self.in_features // b)
        self.blocks = expect_tensor({"blocks": blocks}, "blocks", expected, torch.float16, self.name)
        self.nblocks = b

    @classmethod
    def encode(cls, weight: torch.Tensor, nblocks: int = 4) -> "BlockDiagFormat":
        """Keep the diagonal blocks (the Frobenius projection onto block-diagonal matrices)."""
        check_weight(weight)
        out_f, in_f = weight.shape
        check_blocks(nblocks, in_f, "blockdiag: nblocks")
        check_blocks(nblocks, out_f, "blockdiag: nblocks")
        grid = weight.detach().float().reshape(nblocks, out_f // nblocks, nblocks, in_f // nblocks)
        blocks = grid[torch.arange(nblocks), :, torch.arange(nblocks)]
        return cls(tuple(weight.shape), fp16_factor(blocks, "blockdiag blocks"))

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.block_diag(*self.blocks.float()).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return blockdiag_matmul(x, self.blocks)

    def config(self) -> dict[str, Any]:
        return {}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"blocks": self.blocks}

    @classmethod
    def from_tensors(
        cls, shape: tuple[int, int], config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> "BlockDiagFormat":
        if tensors.get("blocks") is None:
            raise FormatError("blockdiag format: stored tensor 'blocks' is missing")
        return cls(shape, tensors["blocks"])

    def describe(self) -> str:
        return f"blockdiag b{self.nblocks} fp16"
