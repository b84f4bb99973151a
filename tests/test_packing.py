import pytest
import torch

from matpress.errors import FormatError
from matpress.formats.packing import pack_rows, packed_row_bytes, unpack_rows


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 13, 64, 129])
def test_pack_round_trip_is_exact(bits, n):
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 1 << bits, (5, n), generator=g)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, packed_row_bytes(n, bits) if bits < 8 else n)
    assert torch.equal(unpack_rows(packed, bits, n).long(), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packed_size_is_bits_per_code(bits):
    codes = torch.zeros(3, 1024, dtype=torch.int64)
    assert pack_rows(codes, bits).numel() == 3 * 1024 * bits // 8


def test_four_bit_layout_is_low_nibble_first():
    packed = pack_rows(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), 4)
    assert packed.tolist() == [[0x21, 0x43, 0x65, 0x87]]


def test_out_of_range_codes_are_refused():
    with pytest.raises(FormatError, match="codes must lie"):
        pack_rows(torch.tensor([[4]]), 2)
    with pytest.raises(FormatError, match="codes must lie"):
        pack_rows(torch.tensor([[-1]]), 3)


def test_unpack_checks_row_length():
    with pytest.raises(FormatError, match="expected"):
        unpack_rows(torch.zeros(2, 5, dtype=torch.uint8), 4, 16)
