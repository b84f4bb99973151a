"""CompressedLinear: an ``nn.Linear`` stand-in whose weight is held in a :class:`Format`."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from matpress import kernels
from matpress.formats import Format, format_class


class CompressedLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored in ``fmt``.

    The format's tensors are registered as buffers, so ``.to(device)``, ``state_dict()`` and friends
    see them; their dtypes belong to the format and are never changed by ``.half()`` or ``.to(dtype)``.
    """

    def __init__(self, fmt: Format, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.in_features = fmt.in_features
        self.out_features = fmt.out_features
        self.format_name = fmt.name
        self.format_config: dict[str, Any] = fmt.config()
        self.fmt = fmt
        self._format_keys = []
        for key, t in fmt.to_tensors().items():
            self.register_buffer(key, t)
            self._format_keys.append(key)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone().float(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _apply(self, fn: Callable, recurse: bool = True) -> "CompressedLinear":
        dtypes = {k: getattr(self, k).dtype for k in self._format_keys}
        super()._apply(fn, recurse)
        for k, dtype in dtypes.items():
            t = getattr(self, k)
            if t.dtype != dtype:  # storage dtype is part of the format: undo casts such as .half()
                setattr(self, k, t.to(dtype))
        self.fmt = format_class(self.format_name).from_tensors(
            (self.out_features, self.in_features),
            self.format_config,
            {k: getattr(self, k) for k in self._format_keys},
        )
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.matmul(self.fmt, x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    @property
    def weight_nbytes(self) -> int:
        return self.fmt.nbytes

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.fmt.describe()}, "
            f"bpw={self.fmt.bits_per_weight:.3f}"
        )
