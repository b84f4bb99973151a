"""Registers the Triton kernels (``kernels/triton_lowbit.py``) for ``int`` and ``ternary`` weights on
CUDA devices. Triton is imported at the first CUDA call, so CPU-only installs never need it. Without
Triton, or when a kernel fails to compile or launch (no C compiler for Triton's launcher, a ptxas or
driver mismatch), the GPU falls back after one warning to the formats' own (decode-then-matmul)
``matmul``; running out of GPU memory is raised as it is.
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType
from typing import Optional

import torch

from matpress.formats import Format, IntFormat, TernaryFormat
from matpress.kernels import kernels_may_take, register_kernel


@functools.lru_cache(maxsize=None)
def triton_kernels() -> Optional[ModuleType]:
    """The Triton kernel module, or None after one warning when Triton cannot be imported."""
    try:
        from matpress.kernels import triton_lowbit
    except ImportError as e:
        warnings.warn(
            f"matpress: Triton is not available ({e}); low-bit layers on the GPU decode their weights "
            "for every matmul. `pip install triton` enables the packed GPU kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return triton_lowbit


def takes(fmt: Format, x: torch.Tensor) -> bool:
    """Whether the Triton kernel handles ``x``: a CUDA input any kernel may take, on the format's device."""
    return x.is_cuda and fmt.packed.device == x.device and kernels_may_take(x)


# The first compile or launch error, after which the Triton path stays off in this process.
_failure: Optional[str] = None


@register_kernel(IntFormat)
@register_kernel(TernaryFormat)
def triton_kernel(fmt: Format, x: torch.Tensor) -> torch.Tensor | None:
    """The registered fast path for ``int`` and ``ternary`` formats on CUDA GPUs."""
    global _failure
    module = triton_kernels() if _failure is None and takes(fmt, x) else None
    if module is None:
        return None
    try:
        return module.packed_matmul(fmt, x)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # Triton's compile and launch errors share no base class
        _failure = f"{type(e).__name__}: {e}"
        warnings.warn(
            f"matpress: the Triton kernel failed on a {fmt.describe()} layer ({_failure[:500]}); low-bit "
            "layers on the GPU now decode their weights for every matmul. Please report this error.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
