"""Step 1, normalize: choose per-block scale s and zero point z that map weights onto the integer grid.

Symmetric absmax (z fixed at the grid's midpoint 2^(b−1), levels ±(2^(b−1) − 1)):
    s = max|w| / (2^(b−1) − 1)
Asymmetric min/max (levels 0 … 2^b − 1):
    s = (max w − min w) / (2^b − 1),   z = −min w / s

A block whose weights are all zero gets s = 1 so that dividing by it is safe (every code then maps to 0).
"""
from __future__ import annotations

import torch

from squash.tensor import to_blocks


def absmax_scale(w2d: torch.Tensor, block: tuple[int, int], bits: int) -> torch.Tensor:
    """s = max|w| / (2^(b−1) − 1) per block; shape (R, C)."""
    blocks = to_blocks(w2d.float(), block)  # (R, C, br·bc), NaN-padded
    amax = blocks.abs().nan_to_num(nan=0.0).amax(dim=-1)
    s = amax / (2 ** (bits - 1) - 1)
    return torch.where(s > 0, s, torch.ones_like(s))


def minmax_scale_zero(w2d: torch.Tensor, block: tuple[int, int], bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """s = (max − min) / (2^b − 1), z = −min / s per block (min ≤ 0 ≤ max so that 0 is exact); shapes (R, C)."""
    blocks = to_blocks(w2d.float(), block)
    lo = blocks.nan_to_num(nan=0.0).amin(dim=-1).clamp(max=0.0)
    hi = blocks.nan_to_num(nan=0.0).amax(dim=-1).clamp(min=0.0)
    s = (hi - lo) / (2**bits - 1)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return s, -lo / s
