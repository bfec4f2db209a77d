import pytest
import torch

from squash.packing import pack_codes, packed_size, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 1001])
def test_pack_round_trips_every_width(bits, n):
    codes = torch.randint(0, 2**bits, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n, bits)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_bit_layout_matches_the_documented_diagram():
    # 4 bits: first code in the low nibble
    assert pack_codes(torch.tensor([0x3, 0xA], dtype=torch.uint8), 4).tolist() == [0xA3]
    # 3 bits: c0 in bits 0-2, c1 in bits 3-5, c2 straddles into the next byte
    packed = pack_codes(torch.tensor([0b101, 0b011, 0b110], dtype=torch.uint8), 3)
    assert packed.tolist() == [0b10_011_101, 0b1]


def test_codes_too_wide_and_wrong_sizes_are_refused():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([16], dtype=torch.uint8), 4)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 7)
