"""Checks every format must pass, shared by the tests/test_formats_*.py files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ContextManager, Optional

import torch
from torch import nn

import matpress
from matpress import kernels
from matpress.kernels import build
from matpress.formats import Format, format_class
from matpress.io import read_checkpoint, stored_nbytes
from matpress.nn.layers import CompressedLinear
from matpress.methods import LayerStats, get_method


def assert_within_kernel_bound(y: torch.Tensor, fmt: Format, x: torch.Tensor, group: int) -> None:
    """``y`` equals decode-then-matmul within :func:`kernel_error_bound`, element by element."""
    w = fmt.decode()
    expected = x.double().reshape(-1, fmt.in_features) @ w.double().T
    err = (y.double().reshape(expected.shape) - expected).abs()
    bound = kernel_error_bound(w, x, group)
    assert bool((err <= bound).all()), float((err - bound).max())


def outlier_weight(seed: int, out_features: int, in_features: int) -> torch.Tensor:
    """A random weight whose rows have different scales, with an outlier region far from zero in row 0
    (its groups need a zero point far from the middle): a hard case for kernels' scales and zeros."""
    torch.manual_seed(seed)
    w = torch.randn(out_features, in_features) * torch.rand(out_features, 1)
    w[0, :50] += 2.0
    return w


def kernel_error_bound(w: torch.Tensor, x: torch.Tensor, group: int) -> torch.Tensor:
    """Bound on ``|kernel(x) - x @ w.T|`` ``(tokens, out)`` for a kernel that rounds each activation
    block (never spanning two groups of ``group`` columns) to int8 with step ``a = max|x_block| / 127``
    and sums in fp32: each activation moves by at most ``a / 2``, and fp32 sums of at most
    ``in_features`` terms add at most ``(in_features + 8) * eps`` of ``sum |w| max|x_group|``."""
    w, x = w.double(), x.reshape(-1, w.shape[1]).double()
    n_groups = -(-w.shape[1] // group)
    pad = n_groups * group - w.shape[1]
    amax = torch.nn.functional.pad(x.abs(), (0, pad)).view(x.shape[0], n_groups, group).amax(dim=-1)
    amax = amax.repeat_interleave(group, dim=1)[:, : w.shape[1]]
    per_unit = 1 / 254 + (w.shape[1] + 8) * torch.finfo(torch.float32).eps
    return (amax @ w.abs().T) * per_unit


def kernel_library(march: str):
    """The compiled CPU kernels built with ``-march=march`` instead of ``-march=native`` (cached), to run
    a narrower instruction-set path of ``lowbit.cpp`` on this machine."""
    return build.load_library(tuple(f if f != "-march=native" else f"-march={march}" for f in build.DEFAULT_FLAGS))


def exact_matmul() -> ContextManager:
    """Switch the compiled kernels off for the duration."""
    return build.switched_off()


def run_method(method: str, weight: torch.Tensor, stats: Optional[LayerStats], **params: Any) -> Format:
    """Run compression method ``method`` with recipe-style ``params`` on one weight."""
    m = get_method(method)
    return m.run(weight, m.make_params(params, "test"), stats)


def check_format(fmt: Format, tmp_path: Path, n_tokens: int = 5) -> None:
    """matmul == decode-then-matmul, nbytes == bytes stored, exact save/load through matpress.save/load."""
    torch.manual_seed(1)
    x = torch.randn(n_tokens, fmt.in_features)
    w = fmt.decode()
    assert w.shape == fmt.shape and w.dtype == torch.float32
    expected = x @ w.T
    # fp32 sums of in_features products: relative rounding error a few eps * sqrt(in) of |x| |w|
    tol = 8 * torch.finfo(torch.float32).eps * fmt.in_features * float((x.abs() @ w.abs().T).max())
    with exact_matmul():  # composites call kernels.matmul for their children: the format's own math here
        assert float((fmt.matmul(x) - expected).abs().max()) <= tol
    if type(fmt) in kernels.KERNELS:
        # a fast kernel may round activations to int8 per block (see kernel_error_bound); composites
        # only reach kernels through their children, whose own checks cover them
        kernel_tol = tol + float(kernel_error_bound(w, x, fmt.in_features).max())
        assert float((kernels.matmul(fmt, x) - expected).abs().max()) <= kernel_tol

    rows = torch.tensor([fmt.out_features - 1, 0, fmt.out_features // 2, 0])  # out of order, repeated
    assert torch.equal(fmt.decode_rows(rows), w[rows])
    rebuilt = format_class(fmt.name).from_tensors(fmt.shape, fmt.config(), fmt.to_tensors())
    assert torch.equal(rebuilt.decode(), w) and rebuilt.describe() == fmt.describe()

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(fmt.in_features, fmt.out_features), nn.Tanh())

    model = make()
    model[0] = CompressedLinear(fmt, torch.linspace(-1, 1, fmt.out_features))
    y = model(x)
    directory = matpress.save(model, tmp_path / f"ckpt-{fmt.name}")
    entry = read_checkpoint(directory).manifest["layers"]["0"]
    assert entry["description"] == fmt.describe()
    assert stored_nbytes(entry) == fmt.nbytes
    loaded = matpress.load(directory, model=make())
    assert torch.equal(loaded[0].fmt.decode(), w)
    assert torch.equal(loaded(x), y)
