import math

import pytest
import torch

from format_checks import check_format
from matpress.errors import FormatError
from matpress.formats import IntFormat, LowRankFormat, SumFormat


@pytest.mark.parametrize("rank", [1, 5, 12])
def test_svd_error_is_the_dropped_singular_values(rank):
    torch.manual_seed(rank)
    w = torch.randn(20, 12) @ torch.diag(torch.logspace(0, -2, 12)) @ torch.randn(12, 12)
    fmt = LowRankFormat.encode(w, rank=rank, factors={"format": "dense", "dtype": "fp32"})
    s = torch.linalg.svdvals(w)
    dropped = float(s[rank:].square().sum().sqrt())
    err = float(torch.linalg.norm(w - fmt.decode()))
    # Eckart-Young: exactly the dropped energy, up to fp32 SVD round-off relative to ||W||
    assert err == pytest.approx(dropped, abs=1e-5 * float(s[0]) * math.sqrt(12))
    assert fmt.rank == rank and fmt.describe() == f"lowrank r{rank} fp32"


def test_fp16_factors_add_only_fp16_rounding():
    torch.manual_seed(0)
    w = torch.randn(32, 24)
    fmt = LowRankFormat.encode(w, rank=8)
    exact = LowRankFormat.encode(w, rank=8, factors={"format": "dense", "dtype": "fp32"})
    # each factor entry moves by at most 2^-11 relative; the product by at most ~2 * 2^-11 * |U||V|
    bound = 2 * 2**-11 * float((exact.u.decode().abs() @ exact.v.decode().abs()).max()) * 1.01
    assert float((fmt.decode() - exact.decode()).abs().max()) <= bound
    assert fmt.nbytes == 2 * 8 * (32 + 24)


def test_lowrank_with_int8_factors(tmp_path):
    torch.manual_seed(1)
    fmt = LowRankFormat.encode(torch.randn(16, 40), rank=6, factors={"format": "int", "bits": 8, "group_size": 8})
    assert isinstance(fmt.u, IntFormat) and fmt.describe() == "lowrank r6 int8 g8 asym"
    check_format(fmt, tmp_path)


def test_lowrank_format_checks(tmp_path):
    torch.manual_seed(2)
    check_format(LowRankFormat.encode(torch.randn(10, 30), rank=4), tmp_path)


@pytest.mark.parametrize("rank", [0, -1, 11, 2.0])
def test_bad_rank_fails_clearly(rank):
    with pytest.raises(FormatError, match="rank must be an integer from 1 to"):
        LowRankFormat.encode(torch.randn(10, 30), rank=rank)


def test_sum_of_int_and_lowrank_residual(tmp_path):
    torch.manual_seed(3)
    w = torch.randn(24, 64)
    fmt = SumFormat.encode(w, a={"format": "int", "bits": 3, "group_size": 32}, b={"format": "lowrank", "rank": 8})
    assert fmt.describe() == "sum(int3 g32 asym + lowrank r8 fp16)"
    residual = w - fmt.a.decode()
    # the residual's best rank-8 error, plus fp16 rounding of the factors
    dropped = float(torch.linalg.svdvals(residual)[8:].square().sum().sqrt())
    assert float(torch.linalg.norm(w - fmt.decode())) <= dropped * (1 + 1e-2)
    assert fmt.nbytes == fmt.a.nbytes + fmt.b.nbytes
    check_format(fmt, tmp_path)


def test_sum_parts_must_share_the_shape():
    with pytest.raises(FormatError, match="do not both have shape"):
        SumFormat((4, 8), IntFormat.encode(torch.randn(4, 8)), IntFormat.encode(torch.randn(4, 16)))
