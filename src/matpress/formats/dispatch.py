"""The matmul dispatch registry: ``x @ W.T`` for any format, through the fastest path that takes it.

:func:`matmul` is the one entry point used by :class:`~matpress.nn.CompressedLinear` and by composite
formats for their children. Kernels (:mod:`matpress.kernels`) register into :data:`KERNELS` for a
format class; formats never import kernels. A registered kernel is tried first; when it declines
(returns None: wrong device, dtype or shape it does not handle) the format's own ``matmul`` runs,
which is always correct.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from matpress.errors import FormatError
from matpress.formats.base import Format

KernelFn = Callable[[Format, torch.Tensor], Optional[torch.Tensor]]

KERNELS: dict[type, list[KernelFn]] = {}


def register_kernel(format_cls: type) -> Callable[[KernelFn], KernelFn]:
    """Decorator: ``fn(fmt, x) -> y or None`` becomes a fast path for ``format_cls``."""

    def wrap(fn: KernelFn) -> KernelFn:
        KERNELS.setdefault(format_cls, []).append(fn)
        return fn

    return wrap


def matmul(fmt: Format, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` by the first registered kernel that takes it, else by the format itself."""
    if x.shape[-1:] != (fmt.in_features,):
        raise FormatError(
            f"matmul: the input's last dimension is {tuple(x.shape[-1:])} but the {fmt.describe()} weight "
            f"({fmt.out_features}x{fmt.in_features}) takes {fmt.in_features} features; check the input shape"
        )
    for fn in KERNELS.get(type(fmt), ()):
        y = fn(fmt, x)
        if y is not None:
            return y
    return fmt.matmul(x)
