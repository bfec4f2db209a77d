"""The one compressed-tensor type every step speaks.

    W ≈ s · (c − z)                      (this version: uniform grids)

A weight of any shape is seen as a matrix (rows = output channels, cols = everything else, the way
a Conv weight (out, in, kh, kw) flattens to (out, in·kh·kw)). The matrix is cut into blocks of
`block = (block_rows, block_cols)`; each block has one scale `s` and, when asymmetric, one zero point `z`.
Codes `c` are unsigned integers in [0, 2^bits − 1]. A symmetric grid fixes z = 2^(bits−1) and uses the
codes 1 … 2^bits − 1, so the levels s·(c − z) run from −s·(2^(bits−1) − 1) to +s·(2^(bits−1) − 1).

Granularity is one idea, the block:
    per tensor          block = (rows, cols)
    per output channel  block = (1, cols)
    per group of g      block = (1, g)      the last group of a row may be shorter (ragged); it is padded
                                           internally and the padding is never stored.

Later steps add fields to this type (a codebook grid, a pruning mask, low-rank factors, sparse outliers);
a field left empty drops its term.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class CompressedTensor:
    """A float tensor stored as codes and per-block scales: W ≈ s·(c − z).

    shape:   the original tensor's shape
    bits:    code width, 2…8
    block:   (block_rows, block_cols) on the matrix view, both ≥ 1 and already resolved against the shape
    codes:   uint8, the matrix view (rows, cols), each value in [0, 2^bits − 1]
    scale:   float, (ceil(rows / block_rows), ceil(cols / block_cols))
    zero:    float like scale, or None for a symmetric grid (z = 2^(bits−1))
    """

    shape: tuple[int, ...]
    bits: int
    block: tuple[int, int]
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)  # step-specific metadata kept in the file header (JSON-able)

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return matrix_shape(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def zero_point(self) -> torch.Tensor:
        """z per block; for a symmetric grid the fixed midpoint 2^(bits−1)."""
        if self.zero is not None:
            return self.zero
        return torch.full_like(self.scale, float(2 ** (self.bits - 1)))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ = s·(c − z), reshaped to the original shape.

        Works on the block view (R, br, C, bc) so each scale broadcasts over its block without being copied.
        """
        rows, cols = self.matrix_shape
        br, bc = self.block
        R, C = self.scale.shape
        codes = self.codes
        if (R * br, C * bc) != (rows, cols):  # ragged edge blocks: pad, then cut the padding off again
            codes = torch.nn.functional.pad(codes, (0, C * bc - cols, 0, R * br - rows))
        c = codes.reshape(R, br, C, bc).to(dtype)  # (R, br, C, bc)
        s = self.scale.to(dtype)[:, None, :, None]
        if self.zero is None:
            w = (c - float(2 ** (self.bits - 1))) * s
        else:
            w = (c - self.zero.to(dtype)[:, None, :, None]) * s
        return w.reshape(R * br, C * bc)[:rows, :cols].reshape(self.shape)

    def stored_bytes(self) -> int:
        """Bytes this tensor occupies on disk: packed codes plus scales (and zeros)."""
        n = math.ceil(self.numel * self.bits / 8)
        n += self.scale.numel() * self.scale.element_size()
        if self.zero is not None:
            n += self.zero.numel() * self.zero.element_size()
        return n

    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes() / self.numel


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(out, in·k…) — the matrix view every step works on."""
    if len(shape) == 0:
        return (1, 1)
    if len(shape) == 1:
        return (1, shape[0])
    return (shape[0], math.prod(shape[1:]))


def resolve_block(block: tuple[int, int], shape: tuple[int, ...]) -> tuple[int, int]:
    """Replace −1 ("all") in a block by the matrix's size; clip a group wider than the matrix."""
    rows, cols = matrix_shape(shape)
    br, bc = block
    br = rows if br == -1 else min(br, rows)
    bc = cols if bc == -1 else min(bc, cols)
    if br < 1 or bc < 1:
        raise ValueError(f"block {block} must hold positive sizes or -1")
    return br, bc


def to_blocks(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Matrix (rows, cols) → (R, C, br·bc) blocks, padding ragged edges with NaN (ignored by the callers)."""
    rows, cols = w.shape
    br, bc = block
    R, C = math.ceil(rows / br), math.ceil(cols / bc)
    padded = torch.full((R * br, C * bc), float("nan"), dtype=w.dtype, device=w.device)
    padded[:rows, :cols] = w
    return padded.reshape(R, br, C, bc).permute(0, 2, 1, 3).reshape(R, C, br * bc)  # (R, C, br·bc)


def expand_blocks(per_block: torch.Tensor, block: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """(R, C) per-block values → (rows, cols), each block's value repeated over its elements."""
    br, bc = block
    full = per_block.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)
    return full[:rows, :cols]
