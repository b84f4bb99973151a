import pytest
import torch

from format_checks import check_format
from matpress.errors import FormatError
from matpress.formats import BlockDiagFormat, MonarchFormat


def monarch_matrix(b: int, q: int, p: int, s: int) -> torch.Tensor:
    """A random exact Monarch matrix, built as dense P L P^T R from its definition."""
    torch.manual_seed(b * 7 + q)
    right, left = torch.randn(b, q, p), torch.randn(q, s, b)
    r_dense = torch.block_diag(*right)  # (b*q, b*p)
    l_dense = torch.block_diag(*left)  # (q*s, q*b)
    perm = torch.arange(b * q).view(b, q).t().flatten()  # hidden index (j, a) -> position (a, j)
    return l_dense @ r_dense[perm]


@pytest.mark.parametrize("b,q,p,s", [(4, 4, 4, 4), (2, 6, 5, 3), (3, 1, 4, 8)])
def test_projection_recovers_an_exact_monarch_matrix(b, q, p, s):
    w = monarch_matrix(b, q, p, s)
    fmt = MonarchFormat.encode(w, nblocks=b, out_blocks=q)
    assert fmt.shape == (q * s, b * p)
    # exact up to fp16 storage of the factors
    assert float((fmt.decode() - w).abs().max()) <= 4 * 2**-11 * float(w.abs().max())


def test_projection_error_is_the_sum_of_sub_block_rank1_errors():
    torch.manual_seed(0)
    w = torch.randn(12, 8)
    fmt = MonarchFormat.encode(w, nblocks=2, out_blocks=3)
    sub = w.reshape(3, 4, 2, 4).permute(0, 2, 1, 3)
    sv = torch.linalg.svdvals(sub)
    dropped = float(sv[..., 1:].square().sum().sqrt())
    assert float(torch.linalg.norm(fmt.decode() - w)) == pytest.approx(dropped, rel=2e-3)
    assert fmt.nbytes == 2 * (3 * 8 + 2 * 12)


@pytest.mark.parametrize("b,q", [(2, 2), (4, 3)])
def test_monarch_format_checks(b, q, tmp_path):
    torch.manual_seed(1)
    check_format(MonarchFormat.encode(torch.randn(12, 16), nblocks=b, out_blocks=q), tmp_path)


def test_blockdiag_keeps_the_diagonal_blocks(tmp_path):
    torch.manual_seed(2)
    w = torch.randn(12, 8)
    fmt = BlockDiagFormat.encode(w, nblocks=4)
    expected = torch.block_diag(*[w[3 * i : 3 * i + 3, 2 * i : 2 * i + 2] for i in range(4)])
    assert torch.equal(fmt.decode(), expected.half().float())
    assert fmt.nbytes == 2 * 12 * 8 // 4
    check_format(fmt, tmp_path)


def test_nblocks_must_divide_the_dimensions():
    with pytest.raises(FormatError, match="nblocks=3 must be a positive integer dividing 8"):
        MonarchFormat.encode(torch.randn(12, 8), nblocks=3)
    with pytest.raises(FormatError, match="out_blocks=5 must be a positive integer dividing 12"):
        MonarchFormat.encode(torch.randn(12, 8), nblocks=2, out_blocks=5)
    with pytest.raises(FormatError, match="nblocks=0"):
        BlockDiagFormat.encode(torch.randn(12, 8), nblocks=0)
