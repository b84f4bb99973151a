import math

import pytest
import torch

from conftest import NewTensorBytes
from format_checks import check_format
from matpress.errors import FormatError
from matpress.formats import DenseFormat, IntFormat, TransformedFormat
from matpress.formats import packing
from matpress.formats.integer import grouped
from matpress.passes.layers import relative_error


def element_scales(fmt: IntFormat) -> torch.Tensor:
    """The scale that applies to each weight element, (out, in)."""
    scale, _ = fmt.scale_zero()
    g = grouped(torch.zeros(fmt.shape), fmt.group)
    return (g + scale.unsqueeze(-1)).reshape(fmt.out_features, -1)[:, : fmt.in_features]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [None, 32, 128])
@pytest.mark.parametrize("shape", [(16, 256), (7, 100), (33, 77)])
def test_rtn_error_is_at_most_half_a_step(bits, symmetric, group_size, shape):
    torch.manual_seed(bits)
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 0.1
    w[0, : shape[1] // 3] += 0.5  # an outlier region
    fmt = IntFormat.encode(w, bits=bits, group_size=group_size, symmetric=symmetric)
    err = (w - fmt.decode()).abs()
    bound = element_scales(fmt) / 2
    # fp32 arithmetic in w / s + z adds at most a few ulps of the value itself
    slack = 4 * torch.finfo(torch.float32).eps * (w.abs() / element_scales(fmt) + (1 << bits)) * element_scales(fmt)
    assert bool((err <= bound + slack).all()), float((err - bound).max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_use_the_declared_bit_width(bits):
    w = torch.randn(8, 64)
    fmt = IntFormat.encode(w, bits=bits, group_size=16)
    codes = fmt.codes()
    assert int(codes.max()) < (1 << bits)
    # min-max RTN reaches both ends of the grid in every asymmetric group
    assert int(codes.max()) == (1 << bits) - 1 and int(codes.min()) == 0


@pytest.mark.parametrize("bits,group,expected_bpw", [(4, 128, 4.25), (8, 128, 8.25), (3, 128, 3.25), (2, 64, 2.5)])
def test_bits_per_weight_counts_packed_codes_and_fp16_scales(bits, group, expected_bpw):
    w = torch.randn(64, 512)
    fmt = IntFormat.encode(w, bits=bits, group_size=group)
    assert fmt.bits_per_weight == pytest.approx(expected_bpw)
    held = fmt.packed.numel() * 1 + fmt.scales.numel() * 2 + fmt.zeros.numel() * 2
    assert fmt.nbytes == held
    assert fmt.packed.numel() == 64 * 512 * bits // 8


def test_symmetric_stores_no_zero_points():
    fmt = IntFormat.encode(torch.randn(4, 64), bits=4, group_size=32, symmetric=True)
    assert fmt.zeros is None and "zeros" not in fmt.to_tensors()
    assert fmt.nbytes == 4 * 32 + 4 * 2 * 2


def test_short_last_group_uses_only_real_columns():
    w = torch.zeros(1, 130)
    w[0, 128:] = torch.tensor([1.0, 3.0])  # last group: columns 128, 129
    fmt = IntFormat.encode(w, bits=2, group_size=128)
    scale, _ = fmt.scale_zero()
    assert fmt.n_groups == 2
    # range of the last group is [1, 3] (not [0, 3]): three steps of 2/3, rounded up to fp16
    assert 2 / 3 <= float(scale[0, 1]) <= 2 / 3 * (1 + 2**-9)
    assert bool(((fmt.decode()[0, 128:] - w[0, 128:]).abs() <= float(scale[0, 1]) / 2 + 1e-6).all())


def test_zero_rows_decode_exactly_and_constant_rows_within_half_a_step():
    w = torch.zeros(3, 64)
    w[1] = 0.25
    fmt = IntFormat.encode(w, bits=3, group_size=32)
    assert torch.equal(fmt.decode()[0], w[0])
    scale, _ = fmt.scale_zero()
    assert bool(((fmt.decode()[1] - 0.25).abs() <= scale[1].repeat_interleave(32) / 2).all())


def test_round_trip_through_tensors_is_exact():
    fmt = IntFormat.encode(torch.randn(10, 70), bits=3, group_size=32)
    again = IntFormat.from_tensors(fmt.shape, fmt.config(), fmt.to_tensors())
    assert torch.equal(again.decode(), fmt.decode())
    x = torch.randn(5, 70)
    assert torch.equal(again.matmul(x), x @ fmt.decode().T)


@pytest.mark.parametrize(
    "weight,match",
    [
        (torch.tensor([[1.0, float("nan")]]), "NaN/Inf"),
        (torch.tensor([[1.0, float("inf")]]), "NaN/Inf"),
        (torch.tensor(1.0), "2-D"),
        (torch.ones(5), "2-D"),
        (torch.ones(2, 2, 2), "2-D"),
        (torch.ones(0, 4), "empty"),
        (torch.ones(3, 4, dtype=torch.int32), "floating point"),
    ],
)
def test_bad_weights_are_refused(weight, match):
    with pytest.raises(FormatError, match=match):
        IntFormat.encode(weight)
    with pytest.raises(FormatError, match=match):
        DenseFormat.encode(weight)


@pytest.mark.parametrize("bits", [0, 9, 4.0])
def test_bad_bit_widths_are_refused(bits):
    with pytest.raises(FormatError, match="bits"):
        IntFormat.encode(torch.randn(2, 8), bits=bits)


def test_huge_weights_that_overflow_fp16_scales_are_refused():
    with pytest.raises(FormatError, match="overflows fp16"):
        IntFormat.encode(torch.tensor([[0.0, 1e9]]), bits=2)


def test_tampered_tensors_are_refused():
    t = IntFormat.encode(torch.randn(4, 64), bits=4, group_size=32).to_tensors()
    with pytest.raises(FormatError, match="scales"):
        IntFormat.from_tensors((4, 64), {"bits": 4, "group_size": 32, "symmetric": False}, {**t, "scales": t["scales"][:2]})
    with pytest.raises(FormatError, match="packed"):
        IntFormat.from_tensors((4, 64), {"bits": 3, "group_size": 32, "symmetric": False}, t)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_dense_format_keeps_the_weight(dtype):
    w = torch.randn(6, 10)
    fmt = DenseFormat.encode(w, dtype=dtype)
    eps = {"fp32": 0, "fp16": 2**-11, "bf16": 2**-8}[dtype]
    assert torch.allclose(fmt.decode(), w, rtol=eps, atol=0)
    assert fmt.nbytes == w.numel() * {"fp32": 4, "fp16": 2, "bf16": 2}[dtype]
    assert math.isclose(fmt.bits_per_weight, {"fp32": 32, "fp16": 16, "bf16": 16}[dtype])


def _weight(out_features: int = 24, in_features: int = 100) -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(out_features, in_features)


@pytest.mark.parametrize("make", [
    lambda: IntFormat.encode(_weight(), bits=4, group_size=64),
    lambda: IntFormat.encode(_weight(), bits=3, group_size=None, symmetric=True),
    lambda: IntFormat.encode(_weight(), bits=8, group_size=32),
    lambda: DenseFormat.encode(_weight(), dtype="fp16"),
    lambda: DenseFormat.encode(_weight()),
    lambda: TransformedFormat.encode(_weight(), rotate=True, seed=1, bits=4, group_size=64),
    lambda: TransformedFormat.encode(_weight(), rotate=False, scale=torch.linspace(0.5, 2, 100), bits=4),
], ids=["int4-g64", "int3-ch-sym", "int8-g32", "dense-fp16", "dense-fp32", "rotated-int4", "scaled-int4"])
def test_format_contract(make, tmp_path):
    # matmul against decode, nbytes against the stored bytes, exact save/load (tests/format_checks.py)
    check_format(make(), tmp_path)


@pytest.mark.parametrize("bits", [3, 4])
def test_encode_and_decode_hold_one_fp32_copy_of_the_matrix_at_most(monkeypatch, bits):
    """RTN on a big layer must not hold several fp32 or int64 copies of it (a 14336x4096 layer took
    1.5 GB of temporaries for 235 MB of weights): encoding holds the fp32 codes, the packed result and
    the int64 temporaries of one chunk of rows; decoding the unpacked codes and one fp32 matrix; the
    relative error one chunk of rows of the difference."""
    chunk = 1 << 14
    monkeypatch.setattr(packing, "CHUNK_CODES", chunk)
    rows, cols = 512, 1024
    w = torch.randn(rows, cols)
    matrix, codes = 4 * rows * cols, rows * cols  # fp32 bytes; one byte per code
    small = 3 * 4 * rows * (cols // 128) + (1 << 16)  # per-group scales, zeros and masks, and slack
    chunk_temporaries = 4 * 8 * chunk  # a chunk's codes as int64, padded, shifted, and its words
    with NewTensorBytes() as encoding:
        fmt = IntFormat.encode(w, bits=bits, group_size=128)
    assert encoding.peak <= matrix + codes * bits // 8 + chunk_temporaries + small
    with NewTensorBytes() as decoding:
        approx = fmt.decode()
    assert decoding.peak <= matrix + codes + chunk_temporaries + small
    with NewTensorBytes() as error:
        assert relative_error(w, approx) == pytest.approx(float((w - approx).norm() / w.norm()), rel=1e-5)
    assert error.peak <= matrix + small  # the reference value's difference
    with NewTensorBytes() as error:
        relative_error(w, approx)
    assert error.peak <= 4 * chunk + small
