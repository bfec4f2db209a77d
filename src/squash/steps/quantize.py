"""Step 2, quantize: round weights to codes on a uniform grid.

Round to nearest (the baseline every method is compared with):
    c = clamp(round(w / s) + z, c_min, c_max);   ŵ = s·(c − z)
Inside the clamp range the error |w − ŵ| ≤ s/2 per element; absmax scaling keeps every weight inside it.
Symmetric grids use c ∈ [1, 2^b − 1] with z = 2^(b−1); asymmetric grids c ∈ [0, 2^b − 1] with z per block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from squash.errors import RecipeError
from squash.steps.normalize import absmax_scale, minmax_scale_zero
from squash.tensor import CompressedTensor, expand_blocks, matrix_shape, resolve_block

BLOCK_NAMES = {"tensor": (-1, -1), "channel": (1, -1)}


@dataclass(frozen=True)
class Quantize:
    """Uniform quantization of a weight to `bits`, one scale per block.

    block: "tensor", "channel" (one scale per output channel), or an int g (groups of g input weights).
    """

    bits: int = 8
    block: str | int = "channel"
    symmetric: bool = True
    rounding: str = "nearest"

    name: ClassVar[str] = "quantize"

    def __post_init__(self):
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise RecipeError(f"quantize.bits = {self.bits!r}: must be an integer from 2 to 8")
        if isinstance(self.block, str):
            if self.block not in BLOCK_NAMES:
                raise RecipeError(f"quantize.block = {self.block!r}: use 'tensor', 'channel' or a group size like 64")
        elif isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise RecipeError(f"quantize.block = {self.block!r}: a group size must be a positive integer")
        if not isinstance(self.symmetric, bool):
            raise RecipeError(f"quantize.symmetric = {self.symmetric!r}: must be true or false")
        if self.rounding != "nearest":
            raise RecipeError(f"quantize.rounding = {self.rounding!r}: only 'nearest' is available")

    def block_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        block = BLOCK_NAMES[self.block] if isinstance(self.block, str) else (1, self.block)
        return resolve_block(block, shape)

    def __call__(self, w: torch.Tensor, ct: CompressedTensor | None = None) -> CompressedTensor:
        return quantize(w, self)


def quantize(w: torch.Tensor, config: Quantize) -> CompressedTensor:
    """Round-to-nearest quantization of float weight `w` under `config`; `w` is not modified."""
    shape = tuple(w.shape)
    rows, cols = matrix_shape(shape)
    block = config.block_shape(shape)
    w2d = w.detach().float().reshape(rows, cols)  # (out, in·k…)
    if config.symmetric:
        scale, zero = absmax_scale(w2d, block, config.bits), None
        z = float(2 ** (config.bits - 1))
        cmin, cmax = 1, 2**config.bits - 1
        zfull = z
    else:
        scale, zero = minmax_scale_zero(w2d, block, config.bits)
        cmin, cmax = 0, 2**config.bits - 1
        zfull = expand_blocks(zero, block, rows, cols)
    sfull = expand_blocks(scale, block, rows, cols)
    codes = torch.clamp(torch.round(w2d / sfull + zfull), cmin, cmax).to(torch.uint8)
    return CompressedTensor(shape=shape, bits=config.bits, block=block, codes=codes, scale=scale, zero=zero)
