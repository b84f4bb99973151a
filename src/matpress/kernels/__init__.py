"""Kernels: the fast ``x @ W.T`` for each format and device.

:func:`matmul` is the one entry point used by :class:`~matpress.layer.CompressedLinear` and by
composite formats for their children. A kernel registered for a format class is tried first; when it
declines (returns None: wrong device, dtype or shape it does not handle) the format's own
``matmul`` runs, which is always correct.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from matpress.errors import FormatError
from matpress.formats import Format
from matpress.kernels.build import disabled

KernelFn = Callable[[Format, torch.Tensor], Optional[torch.Tensor]]

KERNELS: dict[type, list[KernelFn]] = {}


def register_kernel(format_cls: type) -> Callable[[KernelFn], KernelFn]:
    """Decorator: ``fn(fmt, x) -> y or None`` becomes a fast path for ``format_cls``."""

    def wrap(fn: KernelFn) -> KernelFn:
        KERNELS.setdefault(format_cls, []).append(fn)
        return fn

    return wrap


def kernels_may_take(x: torch.Tensor) -> bool:
    """What every fast kernel asks of its input, on any device: fp32, bf16 or fp16, no gradient to
    track (kernels have no backward), and kernels not switched off by ``MATPRESS_KERNELS=0``."""
    return (
        x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and not (x.requires_grad and torch.is_grad_enabled())
        and not disabled()
    )


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


# Register the compiled CPU kernels (kernels/lowbit.py) and the Triton GPU kernels (kernels/gpu.py)
# for the int and ternary formats; each declines inputs on the other's device.
from matpress.kernels import gpu, lowbit  # noqa: E402,F401

__all__ = ["KERNELS", "kernels_may_take", "matmul", "register_kernel"]
