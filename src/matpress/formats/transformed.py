"""An input transform in front of a child format: per-channel scales (AWQ) and/or a randomized
Hadamard rotation (incoherence processing, QuaRot / QuIP#).

The layer ``y = x W^T`` is stored as ``y = T(x) W'^T`` with ``T(x) = ((x / s) * d) H`` and
``W' = ((W * s) * d) H``, where ``s`` is a positive per-input-channel scale (Lin et al. 2023, AWQ:
https://arxiv.org/abs/2306.00978), ``d`` a random +-1 vector and ``H`` the normalized block-diagonal
Walsh-Hadamard matrix (Ashkboos et al. 2024, QuaRot: https://arxiv.org/abs/2404.00456; Tseng et al. 2024,
QuIP#: https://arxiv.org/abs/2402.04396). ``H`` is symmetric and orthonormal, so ``T`` preserves the
product exactly, while the rotated weight's entries are spread evenly (no outlier columns), which is
what a low-bit grid quantizes best. The child (an ``int`` format) holds ``W'``; the product applies ``T``
to ``x`` online (one product per Hadamard block, :func:`fwht`), then the child's kernel.

``in_features`` need not be a power of two: ``H`` is block diagonal with blocks of the largest power of
two dividing ``in_features`` (384 = 3 x 128, 1536 = 3 x 512). The signs are stored bit-packed and the
scales in fp16, so save/load is exact and both count in ``nbytes``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import torch

from matpress.errors import FormatError
from matpress.formats.base import Format, check_weight, expect_tensor
from matpress.formats.composite import CompositeFormat
from matpress.formats import dispatch
from matpress.formats.registry import format_class
from matpress.formats.packing import pack_rows, packed_row_bytes, unpack_rows


def hadamard_block(n: int) -> int:
    """Size of the Hadamard blocks used for ``n`` columns: the largest power of two dividing ``n``."""
    return n & (-n)


@functools.lru_cache(maxsize=16)
def hadamard_matrix(block: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """The normalized ``block x block`` Walsh-Hadamard matrix in Sylvester's (natural) order,
    ``H[i, j] = (-1)^popcount(i & j) / sqrt(block)`` (``block`` a power of two); cached."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:  # Sylvester: H_2k = [[H_k, H_k], [H_k, -H_k]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(block)).to(dtype=dtype, device=device)


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform of the last dimension of ``x``, in independent blocks of
    ``block`` (a power of two) consecutive entries: ``x @ H`` for the block-diagonal ``H``.
    ``H`` is symmetric and orthonormal, so this is its own inverse.

    Computed as one matrix product per block with the cached :func:`hadamard_matrix`: on CPUs and
    GPUs the BLAS product beats the O(n log n) butterfly written as tensor operations, whose
    ``log2(block)`` passes each copy the whole tensor (about 10x on 1024 x 576 activations)."""
    n = x.shape[-1]
    if block <= 0 or block & (block - 1) or n % block:
        raise FormatError(f"Hadamard block {block} must be a power of two dividing the size {n}")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    h = hadamard_matrix(block, dtype, str(x.device))
    return (x.to(dtype).reshape(-1, block) @ h).reshape(x.shape).to(x.dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """A reproducible random +-1 vector of length ``n`` (fp32)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1


class InputTransform:
    """``T(x) = ((x / scale) * signs) H``: either part may be absent (None)."""

    def __init__(self, n: int, scale: Optional[torch.Tensor] = None, signs: Optional[torch.Tensor] = None):
        if scale is None and signs is None:
            raise FormatError("an input transform needs scales, a rotation, or both")
        self.n = n
        self.scale = scale
        self.signs = signs
        self.block = hadamard_block(n)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``T`` on activations ``(..., n)``."""
        if self.scale is not None:
            x = x / self.scale.to(x)
        if self.signs is not None:
            x = fwht(x * self.signs.to(x), self.block)
        return x

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """``W -> W'`` with ``T(x) W'^T = x W^T``: scale the columns up, then rotate the rows."""
        if self.scale is not None:
            w = w * self.scale.to(w)
        if self.signs is not None:
            w = fwht(w * self.signs.to(w), self.block)
        return w

    def unweight(self, w: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`weight`."""
        if self.signs is not None:
            w = fwht(w, self.block) * self.signs.to(w)
        if self.scale is not None:
            w = w / self.scale.to(w)
        return w

    def hessian(self, h: torch.Tensor) -> torch.Tensor:
        """The second moment of ``T(x)`` from that of ``x``: ``T^T H T`` (``T`` linear)."""
        return self.apply(self.apply(h).T).T


class TransformedFormat(CompositeFormat):
    """``x -> child(T(x))``: a child format (usually ``int``) holding the transformed weight, plus the
    transform's own tensors (fp16 scales, bit-packed signs)."""

    name = "transformed"
    slots = ("child",)

    def __init__(self, child: Format, transform: InputTransform):
        super().__init__(child.shape, {"child": child})
        if transform.n != child.in_features:
            raise FormatError(f"transformed: transform size {transform.n} != child in_features {child.in_features}")
        self.child = child
        self.transform = transform

    @classmethod
    def encode(
        cls, weight: torch.Tensor, rotate: bool = True, seed: int = 0, scale: Optional[torch.Tensor] = None,
        child: str = "int", **child_params: Any,
    ) -> "TransformedFormat":
        """Transform ``weight`` (rotation with signs from ``seed``, and/or the given input scales) and
        encode the result directly in format ``child`` (round-to-nearest for ``int``)."""
        check_weight(weight)
        transform = make_transform(weight.shape[1], rotate, seed, scale)
        return cls(format_class(child).encode(transform.weight(weight.float()), **child_params), transform)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.transform.unweight(self.child.decode(torch.float32)).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.matmul(self.child, self.transform.apply(x))

    def own_config(self) -> dict[str, Any]:
        return {"scaled": self.transform.scale is not None, "rotated": self.transform.signs is not None}

    def own_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        if self.transform.scale is not None:
            tensors["scale"] = self.transform.scale.to(torch.float16)
        if self.transform.signs is not None:
            tensors["signs"] = pack_rows((self.transform.signs > 0).long().unsqueeze(0), 1)
        return tensors

    @classmethod
    def from_parts(
        cls, shape: tuple[int, int], config: dict[str, Any], own: dict[str, torch.Tensor], children: dict[str, Format]
    ) -> "TransformedFormat":
        child, n = children["child"], shape[1]
        if tuple(child.shape) != tuple(shape):
            raise FormatError(f"transformed: child shape {child.shape} differs from the layer's {tuple(shape)}")
        scale = signs = None
        if config.get("scaled"):
            scale = expect_tensor(own, "scale", (n,), torch.float16, cls.name).float()
        if config.get("rotated"):
            packed = expect_tensor(own, "signs", (1, packed_row_bytes(n, 1)), torch.uint8, cls.name)
            signs = unpack_rows(packed, 1, n)[0].float() * 2 - 1
        return cls(child, InputTransform(n, scale, signs))

    def describe(self) -> str:
        parts = [p for p, on in (("scaled", self.transform.scale is not None), ("rotated", self.transform.signs is not None)) if on]
        return f"{'+'.join(parts)} {self.child.describe()}"


def quantize_transformed(
    weight: torch.Tensor, hessian: torch.Tensor, transform: Optional[InputTransform],
    quantize: Callable[[torch.Tensor, torch.Tensor], Format],
) -> Format:
    """``quantize(W', H')`` on the transformed weight and input Hessian, wrapped with the transform;
    plain ``quantize(W, H)`` when there is no transform."""
    if transform is None:
        return quantize(weight, hessian)
    return TransformedFormat(quantize(transform.weight(weight), transform.hessian(hessian)), transform)


def make_transform(n: int, rotate: bool, seed: int, scale: Optional[torch.Tensor]) -> InputTransform:
    """The transform of an ``n``-column weight; scales are rounded to fp16 first, as they are stored."""
    if scale is not None:
        if scale.shape != (n,) or not bool((scale > 0).all()) or not bool(torch.isfinite(scale).all()):
            raise FormatError(f"input scales must be {n} positive finite values")
        scale = scale.float().clamp(1e-4, 1e4).half().float()
    return InputTransform(n, scale, random_signs(n, seed) if rotate else None)
