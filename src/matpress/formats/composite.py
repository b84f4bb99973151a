"""Composite formats: a weight held as child formats (each any format, themselves possibly composite).

:class:`CompositeFormat` holds the nesting logic once: children serialize through
:func:`~matpress.formats.base.child_tensors` and friends, and their products go through
:func:`matpress.formats.dispatch.matmul`, so a fast kernel for a child applies inside any composite.

- :class:`LowRankFormat`: ``W ~ U V`` (rank r), multiplied as two thin products.
- :class:`SumFormat`: ``W ~ A + B`` for any two formats (int + low-rank residual, sparse outliers + int).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch

from matpress.errors import FormatError
from matpress.formats.base import CHILD_SEPARATOR, Format, check_weight, child_config, child_from_tensors, child_tensors
from matpress.formats import dispatch
from matpress.formats.registry import format_class

ChildSpec = Optional[dict[str, Any]]
DEFAULT_CHILD: dict[str, Any] = {"format": "dense", "dtype": "fp16"}


def encode_child(weight: torch.Tensor, spec: ChildSpec, owner: str) -> Format:
    """Encode ``weight`` as the child format ``spec`` names, e.g. ``{"format": "int", "bits": 8}``
    (default: dense fp16)."""
    spec = dict(DEFAULT_CHILD if spec is None else spec)
    if "format" not in spec:
        raise FormatError(f"{owner}: a child format spec needs a 'format' key, got {spec}")
    cls = format_class(spec.pop("format"))
    try:
        return cls.encode(weight, **spec)
    except TypeError as e:
        raise FormatError(f"{owner}: bad parameters {spec} for child format {cls.name!r}: {e}") from None


class CompositeFormat(Format):
    """A format whose storage is named child formats (``slots``) plus, optionally, tensors of its own.

    Subclasses set ``slots``, build ``self.children`` in ``__init__`` and implement
    :meth:`from_parts`, :meth:`own_config` and (if they store any) :meth:`own_tensors`.
    """

    slots: ClassVar[tuple[str, ...]]

    def __init__(self, shape: tuple[int, int], children: dict[str, Format]):
        super().__init__(shape)
        if set(children) != set(self.slots):
            raise FormatError(f"{self.name} format: children must be {self.slots}, got {sorted(children)}")
        for slot, child in children.items():
            if not isinstance(child, Format):
                raise FormatError(f"{self.name} format: child {slot!r} must be a Format, got {type(child).__name__}")
        self.children = dict(children)

    def own_config(self) -> dict[str, Any]:
        return {}

    def own_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_parts(
        cls,
        shape: tuple[int, int],
        config: dict[str, Any],
        own: dict[str, torch.Tensor],
        children: dict[str, Format],
    ) -> "CompositeFormat":
        """Rebuild from the composite's own config and tensors and its rebuilt children."""
        return cls(shape, **children)

    def config(self) -> dict[str, Any]:
        return {**self.own_config(), **{slot: child_config(c) for slot, c in self.children.items()}}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.own_tensors())
        for slot, child in self.children.items():
            tensors.update(child_tensors(slot, child))
        return tensors

    @classmethod
    def from_tensors(
        cls, shape: tuple[int, int], config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> "CompositeFormat":
        children = {slot: child_from_tensors(slot, config, tensors, cls.name) for slot in cls.slots}
        own = {k: t for k, t in tensors.items() if CHILD_SEPARATOR not in k}
        stray = {k for k in tensors if CHILD_SEPARATOR in k and k.split(CHILD_SEPARATOR, 1)[0] not in cls.slots}
        if stray:
            raise FormatError(f"{cls.name} format: stored tensors {sorted(stray)} belong to no child")
        return cls.from_parts(shape, config, own, children)


def balanced_factors(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_r sqrt(S_r), sqrt(S_r) V_r^T)`` from an SVD truncated to ``rank``: the singular values split
    evenly between the factors, which balances their ranges for storage."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


class LowRankFormat(CompositeFormat):
    """``W ~ U V`` with ``U`` ``(out, r)`` and ``V`` ``(r, in)`` held as child formats; ``x @ W.T`` is
    computed as ``(x @ V.T) @ U.T``, ``r (out + in)`` multiply-adds per token instead of ``out * in``."""

    name = "lowrank"
    slots = ("u", "v")

    def __init__(self, shape: tuple[int, int], u: Format, v: Format):
        super().__init__(shape, {"u": u, "v": v})
        rank = u.shape[1]
        if u.shape[0] != self.out_features or v.shape != (rank, self.in_features):
            raise FormatError(
                f"lowrank format: factors of shapes {u.shape} and {v.shape} do not multiply to {self.shape}"
            )
        self.rank = rank
        self.u, self.v = u, v

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, factors: ChildSpec = None) -> "LowRankFormat":
        """Store dense factors ``u`` ``(out, r)`` and ``v`` ``(r, in)`` in the child format ``factors``."""
        return cls(
            (u.shape[0], v.shape[1]),
            encode_child(u, factors, cls.name),
            encode_child(v, factors, cls.name),
        )

    @classmethod
    def encode(cls, weight: torch.Tensor, rank: int = 16, factors: ChildSpec = None) -> "LowRankFormat":
        """Truncated SVD (Eckart-Young): the best rank-``rank`` approximation in Frobenius norm,
        ``U sqrt(S)`` and ``sqrt(S) V^T`` stored in ``factors`` (default dense fp16)."""
        check_weight(weight)
        check_rank(rank, tuple(weight.shape))
        u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        return cls.from_factors(*balanced_factors(u, s, vh, rank), factors)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.u.decode() @ self.v.decode()).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.matmul(self.u, dispatch.matmul(self.v, x))

    def describe(self) -> str:
        u, v = self.u.describe(), self.v.describe()
        stored = u.removeprefix("dense ") if u == v else f"u: {u}, v: {v}"
        return f"lowrank r{self.rank} {stored}"


def check_rank(rank: Any, shape: tuple[int, int]) -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(shape):
        raise FormatError(f"rank must be an integer from 1 to min{tuple(shape)} = {min(shape)}, got {rank!r}")
    return rank


class SumFormat(CompositeFormat):
    """``W ~ A + B`` for any two formats of the same shape; ``x @ W.T = x @ A.T + x @ B.T``."""

    name = "sum"
    slots = ("a", "b")

    def __init__(self, shape: tuple[int, int], a: Format, b: Format):
        super().__init__(shape, {"a": a, "b": b})
        if a.shape != self.shape or b.shape != self.shape:
            raise FormatError(f"sum format: parts of shapes {a.shape} and {b.shape} do not both have shape {self.shape}")
        self.a, self.b = a, b

    @classmethod
    def encode(cls, weight: torch.Tensor, a: ChildSpec = None, b: ChildSpec = None) -> "SumFormat":
        """Encode ``weight`` as format ``a``, then the residual ``weight - A`` as format ``b``."""
        check_weight(weight)
        w = weight.detach().float()
        first = encode_child(w, a if a is not None else {"format": "int", "bits": 3}, cls.name)
        second = encode_child(w - first.decode(), b if b is not None else {"format": "lowrank", "rank": 16}, cls.name)
        return cls(tuple(w.shape), first, second)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.a.decode() + self.b.decode()).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.matmul(self.a, x) + dispatch.matmul(self.b, x)

    def describe(self) -> str:
        return f"sum({self.a.describe()} + {self.b.describe()})"
