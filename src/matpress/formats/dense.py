"""Dense passthrough: the weight as is, in fp32, fp16 or bf16."""

from __future__ import annotations

from typing import Any

import torch

from matpress.errors import FormatError
from matpress.formats.base import Format, check_weight, expect_tensor

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise FormatError(f"dense format: unsupported dtype {dtype}; use one of {sorted(DTYPES)}")


class DenseFormat(Format):
    """The weight stored uncompressed (optionally cast to fp16/bf16)."""

    name = "dense"

    def __init__(self, weight: torch.Tensor):
        super().__init__(tuple(weight.shape))
        dtype_name(weight.dtype)
        self.weight = weight

    @classmethod
    def encode(cls, weight: torch.Tensor, dtype: str = "fp32") -> "DenseFormat":
        check_weight(weight)
        if dtype not in DTYPES:
            raise FormatError(f"dense format: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        w = weight.detach().to(DTYPES[dtype]).contiguous()
        if not torch.isfinite(w).all():
            raise FormatError(f"dense format: the weight overflows {dtype}; keep it in fp32")
        return cls(w)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)

    def decode_rows(self, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight[index.to(self.weight.device)].to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return torch.nn.functional.linear(x, w)

    def config(self) -> dict[str, Any]:
        return {"dtype": dtype_name(self.weight.dtype)}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

    @classmethod
    def from_tensors(
        cls, shape: tuple[int, int], config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> "DenseFormat":
        dtype = config.get("dtype")
        if dtype not in DTYPES:
            raise FormatError(f"dense format: config dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return cls(expect_tensor(tensors, "weight", shape, DTYPES[dtype], cls.name))

    def describe(self) -> str:
        return f"dense {dtype_name(self.weight.dtype)}"
