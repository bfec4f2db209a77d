"""Round-to-nearest quantization against the float weight, with the math's own bound asserted exactly."""
import pytest
import torch

from squash import CompressedTensor, Quantize, RecipeError, quantize
from squash.tensor import expand_blocks

SHAPES_BLOCKS = [
    ((64, 96), "channel"),
    ((64, 96), "tensor"),
    ((576, 576), 128),  # 576 is not a multiple of 128: the last group of each row is ragged (64 wide)
    ((37, 50), 16),
    ((8, 3, 3, 3), "channel"),  # a conv weight, viewed as (8, 27)
    ((1000, 48), "channel"),  # an embedding table
]


def per_element_scale(ct: CompressedTensor) -> torch.Tensor:
    rows, cols = ct.matrix_shape
    return expand_blocks(ct.scale, ct.block, rows, cols).reshape(ct.shape)


@pytest.mark.parametrize("shape,block", SHAPES_BLOCKS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_to_nearest_error_is_at_most_half_a_step(shape, block, bits, symmetric):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(bits)) * 0.05
    ct = quantize(w, Quantize(bits=bits, block=block, symmetric=symmetric))
    s = per_element_scale(ct)
    err = (w - ct.dequantize()).abs()
    # |w − ŵ| ≤ s/2 per element; the only slack allowed is float32 rounding of w/s (a few ulps of w).
    assert (err <= s / 2 + 4 * torch.finfo(torch.float32).eps * w.abs()).all()
    assert ct.dequantize().shape == w.shape and ct.dequantize().dtype == torch.float32
    assert int(ct.codes.max()) < 2**bits
    if symmetric:
        assert int(ct.codes.min()) >= 1  # the level −2^(b−1) is never used: the grid stays symmetric


def test_ragged_groups_cover_every_column():
    w = torch.randn(4, 576)
    ct = quantize(w, Quantize(bits=4, block=128))
    assert ct.scale.shape == (4, 5)  # 4 full groups of 128 and one of 64
    assert ct.block == (1, 128)
    # the ragged group has its own absmax scale: the largest weight of columns 512..575 maps to the top code
    assert torch.allclose(ct.scale[:, 4], w[:, 512:].abs().amax(1) / 7)


def test_int8_per_channel_scale_is_absmax_over_127():
    w = torch.randn(16, 40)
    ct = quantize(w, Quantize(bits=8))
    assert torch.equal(ct.scale[:, 0], w.abs().amax(1) / 127)


def test_zero_rows_and_constant_weights_are_exact():
    w = torch.zeros(3, 8)
    w[1] = 0.25
    for sym in (True, False):
        ct = quantize(w, Quantize(bits=4, symmetric=sym))
        assert torch.equal(ct.dequantize(), w)


def test_input_not_mutated_and_deterministic():
    w = torch.randn(32, 32)
    before = w.clone()
    a = quantize(w, Quantize(bits=3, block=8))
    b = quantize(w, Quantize(bits=3, block=8))
    assert torch.equal(w, before)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


def test_sqnr_grows_about_6db_per_bit():
    w = torch.randn(256, 256)
    sqnr = []
    for bits in (4, 6, 8):
        err = w - quantize(w, Quantize(bits=bits)).dequantize()
        sqnr.append(10 * torch.log10(w.pow(2).sum() / err.pow(2).sum()).item())
    assert 10 < sqnr[1] - sqnr[0] < 14 and 10 < sqnr[2] - sqnr[1] < 14


def test_stored_bytes_count_codes_and_scales():
    ct = quantize(torch.randn(10, 100), Quantize(bits=4, block=32))
    assert ct.stored_bytes() == 500 + 10 * 4 * 4  # 1000 codes at 4 bits + 40 float32 scales


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=9), dict(bits=4.0), dict(block="row"), dict(block=0),
                                 dict(symmetric="yes"), dict(rounding="stochastic")])
def test_invalid_config_is_a_recipe_error(bad):
    with pytest.raises(RecipeError):
        Quantize(**bad)
