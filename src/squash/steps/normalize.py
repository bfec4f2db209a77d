"""Step 1, normalize: choose per-block scale s and zero point z that map weights onto the grid.

Symmetric absmax (integer grid, z fixed at the midpoint 2^(b−1), levels ±(2^(b−1) − 1); custom grid in [−1, 1]):
    s = α · max|w| / (2^(b−1) − 1)            s = α · max|w|   on a custom grid
Asymmetric min/max (levels 0 … 2^b − 1):
    s = α · (max w − min w) / (2^b − 1),   z = −α · min w / s    (z rounded to a multiple of 2^−f when stored
                                                                as an unsigned fixed-point number, f = 0: an integer)

α = 1 is plain absmax / min-max. Clipping (α < 1) trades a larger error on the few largest weights for a finer
grid on all the others; `clip_search` picks α per block minimising the block's (optionally weighted) error
    Σ_j d_j (w_j − ŵ_j)²,   d_j = 1, or the diagonal of XᵀX for calibration-aware clipping.
`hqq_zero` refines a zero point without data (HQQ: Badri & Shaji 2023, half-quadratic splitting with an lp, p < 1,
error that lets a few outliers stay wrong so that the rest fit).

A block whose weights are all zero gets s = 1 so that dividing by it is safe.
"""
from __future__ import annotations

import torch

CLIP_RATIOS = torch.linspace(1.0, 0.5, 11).tolist()


def scale_zero(blocks: torch.Tensor, bits: int, symmetric: bool, alpha: torch.Tensor | float = 1.0,
               custom_grid: bool = False, zero_frac: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point per block for (…, n) blocks (NaN padding ignored); α may be per block (…)."""
    w = blocks.nan_to_num(nan=0.0)
    if symmetric:
        amax = w.abs().amax(dim=-1) * alpha
        s = amax if custom_grid else amax / (2 ** (bits - 1) - 1)
        return torch.where(s > 0, s, torch.ones_like(s)), None
    lo = w.amin(dim=-1).clamp(max=0.0) * alpha
    hi = w.amax(dim=-1).clamp(min=0.0) * alpha
    s = (hi - lo) / (2**bits - 1)
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = -lo / s
    if zero_frac is None:
        return s, z
    step = 2.0**-zero_frac  # a fixed-point zero point: multiples of 2^−zero_frac (1: an integer)
    return s, (torch.round(z / step) * step).clamp(0, min(2**bits - 1, 255 * step))


def round_to_grid(x: torch.Tensor, bits: int, symmetric: bool, grid: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest code for x = w/s + z: round and clamp on the integer grid, nearest level on a custom grid."""
    if grid is None:
        lo = 1 if symmetric else 0
        return torch.clamp(torch.round(x), lo, 2**bits - 1)
    mids = (grid[1:] + grid[:-1]) / 2  # grid sorted ascending
    return torch.bucketize(x, mids).to(x.dtype)


def fake_quantize(blocks: torch.Tensor, s: torch.Tensor, z: torch.Tensor | float, bits: int, symmetric: bool,
                  grid: torch.Tensor | None = None) -> torch.Tensor:
    """ŵ = s·(G[c] − z) for (…, n) blocks with per-block s, z (…)."""
    s_, z_ = s[..., None], (z[..., None] if torch.is_tensor(z) else z)
    c = round_to_grid(blocks / s_ + z_, bits, symmetric, grid)
    levels = c if grid is None else grid[c.long()]
    return s_ * (levels - z_)


def midpoint(bits: int, symmetric: bool, grid: torch.Tensor | None) -> float:
    return 0.0 if grid is not None else float(2 ** (bits - 1))


def clip_search(blocks: torch.Tensor, bits: int, symmetric: bool, weight: torch.Tensor | None = None,
                grid: torch.Tensor | None = None, zero_frac: int | None = None,
                ratios: list[float] = CLIP_RATIOS) -> torch.Tensor:
    """Per-block α from `ratios` minimising Σ d_j (w_j − ŵ_j)²; blocks (…, n), weight d broadcastable to it."""
    w = blocks.nan_to_num(nan=0.0)
    valid = ~torch.isnan(blocks)
    d = valid.float() if weight is None else valid.float() * weight
    best_err = torch.full(blocks.shape[:-1], float("inf"))
    best = torch.ones(blocks.shape[:-1])
    for a in ratios:
        s, z = scale_zero(blocks, bits, symmetric, a, grid is not None, zero_frac)
        z = midpoint(bits, symmetric, grid) if z is None else z
        err = ((w - fake_quantize(w, s, z, bits, symmetric, grid)) ** 2 * d).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, a), best)
    return best


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft threshold, the proximal step of the lp norm (p < 1) used by HQQ."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp(min=1e-8).pow(p - 1))


def hqq_zero(blocks: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, iters: int = 20,
             p: float = 0.7, beta: float = 10.0, kappa: float = 1.01) -> torch.Tensor:
    """Refine float zero points z (…) for fixed scales s (…) by half-quadratic splitting; keeps the best z seen.

    W_e = shrink(W − s(Q − z));  z = mean(Q − (W − W_e)/s);  Q = round(W/s + z)
    """
    w = blocks.nan_to_num(nan=0.0)
    valid = (~torch.isnan(blocks)).float()
    n = valid.sum(-1).clamp(min=1)
    best_z, best_err = z.clone(), torch.full_like(z, float("inf"))
    for _ in range(iters):
        q = torch.clamp(torch.round(w / s[..., None] + z[..., None]), 0, 2**bits - 1)
        r = s[..., None] * (q - z[..., None])
        err = ((w - r).abs() * valid).sum(-1)
        better = err < best_err
        best_err, best_z = torch.where(better, err, best_err), torch.where(better, z, best_z)
        w_e = shrink_lp(w - r, beta, p)
        z = ((q - (w - w_e) / s[..., None]) * valid).sum(-1) / n
        beta *= kappa
    return best_z
