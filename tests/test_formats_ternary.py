import pytest
import torch

from format_checks import check_format
from matpress.errors import FormatError
from matpress.formats import TernaryFormat
from matpress.formats.packing import pack_trits, unpack_trits


@pytest.mark.parametrize("n", [1, 4, 5, 6, 13, 100])
def test_trits_pack_five_per_byte_and_round_trip(n):
    torch.manual_seed(n)
    t = torch.randint(-1, 2, (3, n))
    packed = pack_trits(t)
    assert packed.shape == (3, (n + 4) // 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_trits(packed, n), t.to(torch.int8))


@pytest.mark.parametrize("group_size", [None, 32, 50])
@pytest.mark.parametrize("shape", [(16, 128), (7, 75)])
def test_absmean_ternary_values_and_scales(group_size, shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[0], 1)
    fmt = TernaryFormat.encode(w, group_size=group_size)
    trits = fmt.trits()
    assert trits.dtype == torch.int8 and set(trits.unique().tolist()) <= {-1, 0, 1}
    group = fmt.group_size
    assert group == (shape[1] if group_size is None else min(group_size, shape[1]))
    scales = fmt.group_scales()
    assert scales.shape == (shape[0], -(-shape[1] // group)) and scales.dtype == torch.float32
    # decoded = trits * scale of the element's group, exactly
    cols = torch.arange(shape[1]) // group
    assert torch.equal(fmt.decode(), trits.float() * scales[:, cols])
    # absmean: the scale is the group's mean |w| (rounded up to fp16), and each trit is round(w / scale)
    for o in range(shape[0]):
        for g in range(scales.shape[1]):
            seg = w[o, g * group : (g + 1) * group]
            assert float(seg.abs().mean()) <= float(scales[o, g]) <= float(seg.abs().mean()) * (1 + 2**-9)
    assert torch.equal(trits.float(), torch.clamp(torch.round(w / scales[:, cols]), -1, 1))


def test_bits_per_weight_is_one_point_six_plus_scales():
    fmt = TernaryFormat.encode(torch.randn(64, 640), group_size=64)
    assert fmt.nbytes == 64 * 128 + 64 * 10 * 2
    assert fmt.bits_per_weight == pytest.approx(1.6 + 16 / 64)


@pytest.mark.parametrize("group_size", [None, 24])
def test_ternary_format_checks(group_size, tmp_path):
    torch.manual_seed(2)
    check_format(TernaryFormat.encode(torch.randn(12, 50), group_size=group_size), tmp_path)


def test_bad_ternary_input_fails_clearly():
    with pytest.raises(FormatError, match="group_size"):
        TernaryFormat.encode(torch.randn(4, 8), group_size=0)
    with pytest.raises(FormatError, match=r"\{-1, 0, 1\}"):
        pack_trits(torch.tensor([[2, 0]]))
    fmt = TernaryFormat.encode(torch.randn(4, 10))
    with pytest.raises(FormatError, match="packed"):
        TernaryFormat.from_tensors((4, 12), fmt.config(), fmt.to_tensors())
