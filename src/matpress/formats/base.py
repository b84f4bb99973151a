"""The one interface every stored matrix implements.

A *format* holds a weight matrix W of shape (out_features, in_features) in some compressed form and
knows how to multiply by it. Every format, simple or composite, answers the same questions:

- ``encode(weight, **params)``: the format's own direct encoding of a dense weight (round-to-nearest
  for quantized formats); calibrated algorithms live in :mod:`matpress.methods` and build formats
  through the formats' constructors instead.
- ``decode()``: the dense matrix it represents; ``decode_rows(index)`` only the rows ``index`` of it
  (an embedding's lookup).
- ``matmul(x)``: ``x @ W.T`` (the semantics of ``nn.Linear`` without bias).
- ``nbytes``: exact bytes of what is stored.
- ``to_tensors()`` / ``from_tensors(config, tensors)``: serialization as a flat dict of tensors plus a
  JSON-able ``config()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from matpress.errors import FormatError, quote
from matpress.formats.packing import row_chunks
from matpress.formats.registry import format_class


class Format(ABC):
    """A weight matrix of shape ``(out_features, in_features)`` held in some stored form."""

    name: ClassVar[str]

    def __init__(self, shape: tuple[int, int]):
        self.shape = (int(shape[0]), int(shape[1]))

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @classmethod
    @abstractmethod
    def encode(cls, weight: torch.Tensor, **params: Any) -> "Format":
        """Build this format directly from a dense weight."""

    @abstractmethod
    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the dense ``(out_features, in_features)`` matrix this format represents."""

    def decode_rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``decode(dtype)[index]`` for a 1-D integer ``index`` of rows (in range; repeats and any order
        allowed). This default decodes the whole matrix; formats that can read single rows override it
        with an exact shortcut."""
        weight = self.decode(dtype)
        return weight[index.to(weight.device)]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T``; formats with a cheaper product override this."""
        return torch.nn.functional.linear(x, self.decode(x.dtype).to(x.device))

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serializable parameters needed (with the tensors) to rebuild the format."""

    @abstractmethod
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat dict of the stored tensors; keys are local names without dots."""

    @classmethod
    @abstractmethod
    def from_tensors(
        cls, shape: tuple[int, int], config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> "Format":
        """Rebuild from ``config()`` and ``to_tensors()``; raise FormatError on mismatch."""

    @property
    def nbytes(self) -> int:
        """Exact bytes of the stored tensors."""
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    def to(self, device: torch.device | str) -> "Format":
        """Move the stored tensors to ``device`` (returns a new format)."""
        tensors = {k: v.to(device) for k, v in self.to_tensors().items()}
        return type(self).from_tensors(self.shape, self.config(), tensors)

    def describe(self) -> str:
        """Short human-readable description, e.g. ``int4 g128 asym``."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, {self.describe()}, {self.bits_per_weight:.2f} bpw)"


def expect_tensor(
    tensors: dict[str, torch.Tensor],
    key: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    format_name: str,
) -> torch.Tensor:
    """Fetch one stored tensor and check its shape and dtype, so a tampered file fails loudly."""
    if tensors.get(key) is None:
        raise FormatError(f"{format_name}: stored tensor '{key}' is missing")
    t = tensors[key]
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise FormatError(
            f"{format_name}: stored tensor '{key}' has shape {tuple(t.shape)} and dtype {t.dtype}, "
            f"expected shape {tuple(shape)} and dtype {dtype}"
        )
    return t


def fp16_factor(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` stored as fp16, refused (naming ``what``) where a value would overflow to infinity."""
    if t.numel() and float(t.abs().max()) > torch.finfo(torch.float16).max:
        raise FormatError(f"{what} overflows fp16; the weight's range is too large for this format")
    return t.to(torch.float16).contiguous()


def check_weight(weight: torch.Tensor, what: str = "weight") -> torch.Tensor:
    """Validate a dense weight before encoding: 2-D, floating point, finite."""
    if not isinstance(weight, torch.Tensor):
        raise FormatError(f"{what} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise FormatError(
            f"{what} must be a 2-D matrix (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise FormatError(f"{what} has an empty dimension: shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise FormatError(f"{what} must be floating point, got {weight.dtype}")
    if not all(bool(torch.isfinite(weight[rows]).all()) for rows in row_chunks(*weight.shape)):  # no full-size mask
        bad = (~torch.isfinite(weight)).sum().item()
        raise FormatError(f"{what} contains {bad} NaN/Inf values; fix the model before compressing it")
    return weight


# -- composite formats ------------------------------------------------------------------------------
# A composite format (low-rank factors stored in int8, a sum of two formats, a rotated format, ...)
# holds child formats. Children serialize through these helpers so that every composite nests the
# same way: the child's tensors under "<slot>__<key>", its name, shape and config under config[slot].

CHILD_SEPARATOR = "__"


def child_config(fmt: Format) -> dict[str, Any]:
    """What a composite's ``config()`` records for one child format."""
    return {"format": fmt.name, "shape": list(fmt.shape), "config": fmt.config()}


def child_tensors(slot: str, fmt: Format) -> dict[str, torch.Tensor]:
    """The child's stored tensors, keyed ``<slot>__<key>``."""
    return {f"{slot}{CHILD_SEPARATOR}{k}": t for k, t in fmt.to_tensors().items()}


def child_from_tensors(
    slot: str, config: dict[str, Any], tensors: dict[str, torch.Tensor], owner: str
) -> Format:
    """Rebuild the child stored in ``slot`` of a composite named ``owner``."""
    spec = config.get(slot)
    if not isinstance(spec, dict) or not {"format", "shape", "config"} <= set(spec):
        raise FormatError(f"{owner}: config lacks a valid entry for child {slot!r}")
    shape = spec["shape"]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(is_positive_int(s) for s in shape)):
        raise FormatError(f"{owner}: child {slot!r} needs a shape of two positive integers, got {quote(shape)}")
    if not isinstance(spec["config"], dict):
        raise FormatError(f"{owner}: child {slot!r} needs a config object, got {quote(spec['config'])}")
    prefix = f"{slot}{CHILD_SEPARATOR}"
    mine = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
    return format_class(spec["format"]).from_tensors(tuple(shape), spec["config"], mine)


def config_values(name: str, config: dict[str, Any], *keys: str) -> tuple[Any, ...]:
    """The values of ``keys`` in a stored format ``config``, in order; a missing one is a FormatError
    naming it and the format ``name``."""
    try:
        return tuple(config[k] for k in keys)
    except KeyError as e:
        raise FormatError(f"{name} format: config lacks {e.args[0]!r}") from None


def check_stored(name: str, tensors: dict[str, torch.Tensor], allowed: set[str]) -> None:
    """Refuse stored tensors the format ``name`` does not store (a checkpoint of another format or version)."""
    extra = set(tensors) - allowed
    if extra:
        raise FormatError(f"{name} format: unexpected stored tensors {sorted(extra)}")


def is_positive_int(value: Any) -> bool:
    """An ``int`` (not a bool) above zero, as sizes read from a config must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
