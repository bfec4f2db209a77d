"""The one compressed-tensor type every step speaks.

    W ≈ s · (G[c] − z) · diag(r) + U·V + S

codes c index a grid G of levels (the integers 0 … 2^bits − 1 when `grid` is None; a logarithmic or NF4 grid
otherwise), s and z are a scale and zero point per block, r an optional scale per input column (the exact
inverse of an activation-aware scaling applied before quantizing), U·V a low-rank term and S sparse outliers kept in float.
A field left empty drops its term; with no codes at all, W ≈ U·V + S (a pure low-rank factorisation).

A weight of any shape is seen as a matrix (rows = output channels, cols = everything else, the way
a Conv weight (out, in, kh, kw) flattens to (out, in·kh·kw)). The matrix is cut into blocks of
`block = (block_rows, block_cols)`; each block has one scale `s` and, when asymmetric, one zero point `z`.
On the integer grid a symmetric tensor fixes z = 2^(bits−1) and uses the codes 1 … 2^bits − 1, so the levels
s·(c − z) run from −s·(2^(bits−1) − 1) to +s·(2^(bits−1) − 1); on a custom grid symmetric means z = 0.

Granularity is one idea, the block:
    per tensor          block = (rows, cols)
    per output channel  block = (1, cols)
    per group of g      block = (1, g)      the last group of a row may be shorter (ragged); it is padded
                                           internally and the padding is never stored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class CompressedTensor:
    """A float tensor stored as W ≈ s·(G[c] − z)·diag(r) + U·V + S.

    shape:   the original tensor's shape
    bits:    code width, 2…8 (0 when there are no codes)
    block:   (block_rows, block_cols) on the matrix view, both ≥ 1 and already resolved against the shape
    codes:   uint8, the matrix view (rows, cols), each value in [0, 2^bits − 1]; None for a pure low-rank tensor
    scale:   float32 or float16, (ceil(rows / block_rows), ceil(cols / block_cols))
    zero:    like scale (float), or uint8 fixed-point zero points z = zero / 2^zero_frac (stored packed at
             bits + zero_frac bits), or None: symmetric
    grid:    float32 levels (2^bits,) that codes index; None for the integer grid
    col_scale: r, float16 (cols,): multiplies each column of the quantized part; None for r = 1
    u, v:    low-rank factors (rows, r) and (r, cols), float16 or float32
    sparse_index, sparse_value:  flat positions (int32) in the matrix view and their float values, added last
    mask:    bool (rows, cols), False where a weight is pruned; None: dense
    dense:   float16 (rows, cols) kept values of a pruned tensor without codes
    entropy: codes and mask stored entropy-coded (exact; the size is that of the coded streams)
    """

    shape: tuple[int, ...]
    bits: int
    block: tuple[int, int]
    codes: torch.Tensor | None
    scale: torch.Tensor | None
    zero: torch.Tensor | None = None
    grid: torch.Tensor | None = None
    col_scale: torch.Tensor | None = None
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    sparse_index: torch.Tensor | None = None
    sparse_value: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    zero_frac: int = 0
    entropy: bool = False
    extra: dict = field(default_factory=dict)  # step-specific metadata kept in the file header (JSON-able)

    ARRAYS = ("codes", "scale", "zero", "grid", "col_scale", "u", "v", "sparse_index", "sparse_value", "mask", "dense")

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return matrix_shape(self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def midpoint(self) -> float:
        """z of a symmetric tensor: 2^(bits−1) on the integer grid, 0 on a custom grid."""
        return 0.0 if self.grid is not None else float(2 ** (self.bits - 1))

    def zero_point(self) -> torch.Tensor:
        """z per block (R, C)."""
        if self.zero is not None:
            return self.zero.float() if self.zero.dtype.is_floating_point else self.zero.float() / 2**self.zero_frac
        return torch.full(self.scale.shape, self.midpoint(), dtype=torch.float32, device=self.scale.device)

    def levels(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """G[c] for every code, the matrix view."""
        if self.grid is None:
            return self.codes.to(dtype)
        if self.grid.dim() == 2:  # one grid per row
            return torch.gather(self.grid.to(dtype), 1, self.codes.long())
        return self.grid.to(dtype)[self.codes.long()]

    @property
    def kept(self) -> int:
        """Weights not pruned."""
        return self.numel if self.mask is None else int(self.mask.sum())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ = s·(G[c] − z)·diag(r) + U·V + S, reshaped to the original shape.

        Works on the block view (R, br, C, bc) so each scale broadcasts over its block without being copied.
        """
        rows, cols = self.matrix_shape
        if self.codes is None and self.dense is not None:
            w = self.dense.to(dtype)
        elif self.codes is None:
            w = torch.zeros(rows, cols, dtype=dtype, device=self.u.device if self.u is not None else None)
        else:
            br, bc = self.block
            R, C = self.scale.shape
            c = self.levels(dtype)
            if (R * br, C * bc) != (rows, cols):  # ragged edge blocks: pad, then cut the padding off again
                c = torch.nn.functional.pad(c, (0, C * bc - cols, 0, R * br - rows))
            c = c.reshape(R, br, C, bc)  # (R, br, C, bc)
            s = self.scale.to(dtype)[:, None, :, None]
            z = self.midpoint() if self.zero is None else self.zero_point().to(dtype)[:, None, :, None]
            w = ((c - z) * s).reshape(R * br, C * bc)[:rows, :cols]
            if self.col_scale is not None:
                w = w * self.col_scale.to(dtype)
        if self.mask is not None:
            w = w * self.mask
        if self.u is not None:
            w = w + self.u.to(dtype) @ self.v.to(dtype)
        if self.sparse_index is not None:
            w = w.reshape(-1).index_add(0, self.sparse_index.long(), self.sparse_value.to(dtype)).reshape(rows, cols)
        return w.reshape(self.shape)

    def stored_bytes(self) -> int:
        """Bytes this tensor occupies on disk: packed (or entropy-coded) codes of the kept weights, the mask,
        scales, zeros, grid, factors, outliers."""
        from squash.entropy import coded_streams

        if self.entropy:
            n = sum(s.nbytes() for s in coded_streams(self).values())
        else:
            n = math.ceil(self.kept * self.bits / 8) if self.codes is not None else 0
            n += math.ceil(self.numel / 8) if self.mask is not None else 0
        if self.dense is not None:
            n += self.kept * self.dense.element_size()
        for t in (self.scale, self.grid, self.col_scale, self.u, self.v, self.sparse_index, self.sparse_value):
            if t is not None:
                n += t.numel() * t.element_size()
        if self.zero is not None:
            if self.zero.dtype.is_floating_point:
                n += self.zero.numel() * self.zero.element_size()
            else:  # fixed-point zero points are packed at bits + zero_frac
                n += math.ceil(self.zero.numel() * (self.bits + self.zero_frac) / 8)
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



def from_blocks(blocks: torch.Tensor, block: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """Inverse of to_blocks: (R, C, br·bc) → the (rows, cols) matrix, padding cut off."""
    R, C, _ = blocks.shape
    br, bc = block
    full = blocks.reshape(R, C, br, bc).permute(0, 2, 1, 3).reshape(R * br, C * bc)
    return full[:rows, :cols]
