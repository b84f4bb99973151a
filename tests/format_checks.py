"""Checks every format must pass, shared by the tests/test_formats_*.py files."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import matpress
from matpress import kernels
from matpress.formats import Format, format_class
from matpress.io import read_manifest, stored_nbytes
from matpress.layer import CompressedLinear


def stored_bytes(fmt: Format) -> int:
    return sum(t.numel() * t.element_size() for t in fmt.to_tensors().values())


def check_format(fmt: Format, tmp_path: Path, n_tokens: int = 5) -> None:
    """matmul == decode-then-matmul, nbytes == bytes stored, exact save/load through matpress.save/load."""
    torch.manual_seed(1)
    x = torch.randn(n_tokens, fmt.in_features)
    w = fmt.decode()
    assert w.shape == fmt.shape and w.dtype == torch.float32
    expected = x @ w.T
    # fp32 sums of in_features products: relative rounding error a few eps * sqrt(in) of |x| |w|
    tol = 8 * torch.finfo(torch.float32).eps * fmt.in_features * float((x.abs() @ w.abs().T).max())
    assert float((fmt.matmul(x) - expected).abs().max()) <= tol
    assert float((kernels.matmul(fmt, x) - expected).abs().max()) <= tol
    assert fmt.nbytes == stored_bytes(fmt)

    rebuilt = format_class(fmt.name).from_tensors(fmt.shape, fmt.config(), fmt.to_tensors())
    assert torch.equal(rebuilt.decode(), w) and rebuilt.describe() == fmt.describe()

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(fmt.in_features, fmt.out_features), nn.Tanh())

    model = make()
    model[0] = CompressedLinear(fmt, torch.linspace(-1, 1, fmt.out_features))
    y = model(x)
    directory = matpress.save(model, tmp_path / f"ckpt-{fmt.name}")
    entry = read_manifest(directory)["layers"]["0"]
    assert entry["description"] == fmt.describe()
    assert stored_nbytes(entry) == fmt.nbytes
    loaded = matpress.load(directory, model=make())
    assert torch.equal(loaded[0].fmt.decode(), w)
    assert torch.equal(loaded(x), y)
