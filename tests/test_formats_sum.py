import pytest
import torch

from format_checks import check_format
from matpress.formats import SumFormat

CHILDREN = {
    "int": {"format": "int", "bits": 3, "group_size": 16},
    "ternary": {"format": "ternary", "group_size": 16},
    "lowrank": {"format": "lowrank", "rank": 3},
    "lowrank-int8": {"format": "lowrank", "rank": 3, "factors": {"format": "int", "bits": 8}},
    "sparse": {"format": "sparse", "sparsity": 0.9},
    "nm": {"format": "nm_sparse", "n": 2, "m": 4},
    "monarch": {"format": "monarch", "nblocks": 4},
    "blockdiag": {"format": "blockdiag", "nblocks": 4},
    "dense": {"format": "dense", "dtype": "fp16"},
    "sum": {"format": "sum", "a": {"format": "ternary"}, "b": {"format": "sparse", "sparsity": 0.95}},
}
PAIRS = [
    ("int", "lowrank"), ("ternary", "lowrank-int8"), ("sparse", "int"), ("nm", "monarch"), ("monarch", "sparse"),
    ("blockdiag", "lowrank"), ("lowrank", "ternary"), ("sum", "int"), ("dense", "nm"),
]


@pytest.mark.parametrize("a,b", PAIRS)
def test_sum_of_any_two_formats_round_trips(a, b, tmp_path):
    torch.manual_seed(len(a) * 7 + len(b))
    w = torch.randn(16, 32)
    fmt = SumFormat.encode(w, a=CHILDREN[a], b=CHILDREN[b])
    assert fmt.describe() == f"sum({fmt.a.describe()} + {fmt.b.describe()})"
    assert fmt.nbytes == fmt.a.nbytes + fmt.b.nbytes
    assert torch.equal(fmt.decode(), fmt.a.decode() + fmt.b.decode())
    # B fits the residual of A, so the sum is no worse than A alone (B's encoding keeps or shrinks it)
    assert float(torch.linalg.norm(w - fmt.decode())) <= float(torch.linalg.norm(w - fmt.a.decode())) * (1 + 1e-3)
    check_format(fmt, tmp_path)
