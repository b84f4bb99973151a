"""Kernels: the fast ``x @ W.T`` for each format and device.

Each kernel registers into the dispatch registry of :mod:`matpress.formats.dispatch` (whose
:func:`matmul` this package re-exports): formats call the dispatch and never import kernels. A kernel
declines (returns None) an input it does not handle, and the format's own ``matmul`` runs.
"""

from __future__ import annotations

import torch

from matpress.formats.dispatch import KERNELS, matmul, register_kernel
from matpress.kernels.build import disabled


def kernels_may_take(x: torch.Tensor) -> bool:
    """What every fast kernel asks of its input, on any device: fp32, bf16 or fp16, no gradient to
    track (kernels have no backward), and kernels not switched off by ``MATPRESS_KERNELS=0``."""
    return (
        x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and not (x.requires_grad and torch.is_grad_enabled())
        and not disabled()
    )


# Register the compiled CPU kernels (kernels/lowbit.py) and the Triton GPU kernels (kernels/gpu.py)
# for the int and ternary formats; each declines inputs on the other's device.
from matpress.kernels import gpu, lowbit  # noqa: E402,F401

__all__ = ["KERNELS", "kernels_may_take", "matmul", "register_kernel"]
