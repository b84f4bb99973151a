import pytest
import torch

from format_checks import check_format
from matpress.errors import FormatError
from matpress.formats import IntFormat, NMSparseFormat, SparseFormat, SumFormat
from matpress.formats.packing import packed_row_bytes


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9, 0.97])
def test_unstructured_keeps_the_largest_and_picks_the_smaller_layout(sparsity):
    torch.manual_seed(0)
    w = torch.randn(40, 100)
    fmt = SparseFormat.encode(w, sparsity=sparsity)
    kept = round((1 - sparsity) * w.numel())
    assert fmt.nnz == kept
    decoded = fmt.decode()
    mask = fmt.mask()
    # kept values are exact up to fp16 rounding; every dropped weight is no larger than any kept one
    assert float((decoded - w)[mask].abs().max()) <= 2**-11 * float(w.abs().max())
    assert float(w[~mask].abs().max()) <= float(w[mask].abs().min())
    bitmask = 40 * 13
    csr = kept * 2 + 4 * 41
    assert fmt.layout == ("csr" if csr < bitmask else "bitmask")
    assert fmt.nbytes == min(bitmask, csr) + 2 * kept


@pytest.mark.parametrize("layout", ["bitmask", "csr"])
def test_sparse_format_checks(layout, tmp_path):
    torch.manual_seed(1)
    check_format(SparseFormat.encode(torch.randn(12, 37), sparsity=0.6, layout=layout), tmp_path)


def test_sparse_with_quantized_values(tmp_path):
    torch.manual_seed(2)
    w = torch.randn(16, 64)
    fmt = SparseFormat.encode(w, sparsity=0.5, values={"format": "int", "bits": 4, "group_size": 32})
    assert isinstance(fmt.values, IntFormat) and fmt.describe() == "sparse 50% bitmask int4 g32 asym"
    mask = fmt.mask()
    scale, _ = fmt.values.scale_zero()
    assert float((fmt.decode() - w)[mask].abs().max()) <= float(scale.max()) / 2 * (1 + 1e-5)
    assert fmt.bits_per_weight == pytest.approx(1 + 0.5 * (4 + 32 / 32))
    check_format(fmt, tmp_path)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_keeps_exactly_n_of_every_m(n, m, tmp_path):
    torch.manual_seed(n * m)
    w = torch.randn(8, 48)
    fmt = NMSparseFormat.encode(w, n=n, m=m)
    decoded = fmt.decode()
    assert bool(((decoded != 0).reshape(8, -1, m).sum(-1) == n).all())
    # the kept ones are the n largest of each group
    groups = w.abs().reshape(8, -1, m)
    kept = (decoded != 0).reshape(8, -1, m)
    assert bool((groups.masked_fill(~kept, float("inf")).amin(-1) >= groups.masked_fill(kept, -1).amax(-1)).all())
    index_bits = {4: 2, 8: 3}[m]
    kept = 48 * n // m
    assert fmt.nbytes == 8 * (2 * kept + packed_row_bytes(kept, index_bits))
    check_format(fmt, tmp_path)


def test_two_four_costs_nine_bits_per_weight_with_fp16_values():
    fmt = NMSparseFormat.encode(torch.randn(4, 64), n=2, m=4)
    assert fmt.bits_per_weight == pytest.approx(0.5 * (16 + 2))


def test_sparse_outliers_plus_int_round_trips(tmp_path):
    torch.manual_seed(3)
    w = torch.randn(16, 256)
    fmt = SumFormat.encode(w, a={"format": "sparse", "sparsity": 0.97}, b={"format": "int", "bits": 3, "group_size": 16})
    assert fmt.describe() == "sum(sparse 97% csr fp16 + int3 g16 asym)"
    check_format(fmt, tmp_path)


def test_bad_sparse_input_fails_clearly():
    w = torch.randn(4, 12)
    with pytest.raises(FormatError, match="1 <= n <= m"):
        NMSparseFormat.encode(w, n=5, m=4)
    with pytest.raises(FormatError, match="not a multiple of m=8"):
        NMSparseFormat.encode(w, n=2, m=8)
    with pytest.raises(FormatError, match="sparsity must be a fraction"):
        SparseFormat.encode(w, sparsity=1.0)
    with pytest.raises(FormatError, match="layout"):
        SparseFormat.encode(w, layout="coo")
