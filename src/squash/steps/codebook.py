"""Step 5, codebook: k-means weight sharing, and entropy coding of what is stored.

Weight sharing (Deep Compression: Han, Mao & Dally 2016): the kept weights of a tensor (or of each row) are
clustered into k = 2^b centroids G by k-means in one dimension, minimising the (weighted) within-cluster error

    Σ_i ω_i · (w_i − G[c_i])²,   c_i = argmin_a |w_i − G[a]|,

and each weight stores only its b-bit index c_i. The weights ω are 1, or with calibration data the sensitivity
of the layer's output to each weight, ω_ij = H_jj = Σ x_j² (the diagonal of the layer Hessian, as SqueezeLLM
weights its k-means), so centroids sit where errors cost most. Seeding is k-means++ (Arthur & Vassilvitskii
2007: each next seed drawn with probability ∝ ω·D², D the distance to the nearest seed so far) from a seeded
generator, so the result is deterministic; then Lloyd iterations: in 1-D the assignment is a search among the
midpoints of the sorted centroids, the update a weighted mean per cluster.

The stored tensor is W ≈ M ⊙ G[c] (scale 1, zero 0 on the CompressedTensor), G float16 per tensor (2^b,) or
per row (rows, 2^b). Fine-tuning later trains G with gradients summed over each centroid's weights.

Entropy coding (the last stage of Deep Compression, there Huffman) is the `entropy` step: the codes and the
mask are stored ANS-coded (squash.entropy), a size near n·H bits instead of n·b.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from squash.errors import RecipeError, SquashError
from squash.tensor import CompressedTensor, matrix_shape

SCOPES = ("tensor", "row")
GRID_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class Codebook:
    """Share 2^bits centroids per tensor or per row, found by weighted k-means (k-means++ seeding, `seed`)."""

    bits: int = 4
    scope: str = "tensor"
    weighted: bool = True
    seed: int = 0
    iters: int = 50
    grid_dtype: str = "float16"

    name: ClassVar[str] = "codebook"

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise RecipeError(f"codebook.bits = {self.bits!r}: an integer from 1 to 8")
        if self.scope not in SCOPES:
            raise RecipeError(f"codebook.scope = {self.scope!r}: choose one of {', '.join(SCOPES)}")
        if self.grid_dtype not in GRID_DTYPES:
            raise RecipeError(f"codebook.grid_dtype = {self.grid_dtype!r}: choose one of {', '.join(GRID_DTYPES)}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise RecipeError(f"codebook.iters = {self.iters!r}: a positive integer")
        if not isinstance(self.weighted, bool) or isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise RecipeError("codebook.weighted must be true or false and codebook.seed an integer")

    @property
    def needs_calibration(self) -> bool:
        return self.weighted

    def __call__(self, w: torch.Tensor, ct: CompressedTensor | None, h: torch.Tensor | None = None) -> CompressedTensor:
        return codebook(w, self, ct, h)


def kmeans_1d(x: torch.Tensor, weight: torch.Tensor, k: int, seed: int = 0, iters: int = 50
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means on each row of x (B, n), entries of weight 0 ignored. Returns centroids (B, k), sorted,
    and assignments (B, n) (int64). Deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    x, weight = x.double(), weight.double().clamp(min=0)
    B, n = x.shape
    centroids = kmeans_pp(x, weight, k, gen)
    assign = torch.zeros(B, n, dtype=torch.long)
    for it in range(iters):
        centroids = centroids.sort(dim=1).values
        new = torch.searchsorted((centroids[:, 1:] + centroids[:, :-1]) / 2, x.contiguous())  # nearest centroid
        if it and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros(B, k, dtype=x.dtype).scatter_add_(1, assign, weight * x)
        mass = torch.zeros(B, k, dtype=x.dtype).scatter_add_(1, assign, weight)
        centroids = torch.where(mass > 0, sums / mass.clamp(min=1e-300), centroids)  # an empty cluster stays put
    centroids = centroids.sort(dim=1).values
    assign = torch.searchsorted((centroids[:, 1:] + centroids[:, :-1]) / 2, x.contiguous())
    return centroids.float(), assign


def kmeans_pp(x: torch.Tensor, weight: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeds per row: the first ∝ ω, each next ∝ ω·D² (D: distance to the nearest seed so far)."""
    B, n = x.shape
    seeds = torch.empty(B, k, dtype=x.dtype)
    p = weight + 1e-30  # a row of all-zero weight still draws
    seeds[:, 0] = x.gather(1, _draw(p, gen))[:, 0]
    d2 = (x - seeds[:, :1]).pow(2)
    for a in range(1, k):
        p = weight * d2
        p = torch.where(p.sum(1, keepdim=True) > 0, p, weight + 1e-30)  # fewer distinct values than k
        seeds[:, a] = x.gather(1, _draw(p, gen))[:, 0]
        d2 = torch.minimum(d2, (x - seeds[:, a : a + 1]).pow(2))
    return seeds


def _draw(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One index per row with probability ∝ p (B, n) → (B, 1), by inverting the cumulative sum (torch.multinomial
    stops at 2^24 categories; an embedding table has more weights)."""
    cdf = p.double().cumsum(dim=1)  # (B, n)
    u = torch.rand(p.shape[0], 1, generator=gen, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=p.shape[1] - 1)


def codebook(w: torch.Tensor, config: Codebook, ct: CompressedTensor | None = None,
             h: torch.Tensor | None = None) -> CompressedTensor:
    """W ≈ M ⊙ G[c]: k-means over the kept weights (the pruned, compensated values when a prune step came first)."""
    shape = tuple(w.shape)
    rows, cols = matrix_shape(shape)
    if ct is not None and ct.codes is not None:
        raise SquashError("codebook replaces quantize: use one of them in a recipe, not both")
    w2d = w.detach().float().reshape(rows, cols).clone()  # (out, in·k…)
    if ct is not None and ct.dense is not None:
        w2d = ct.dense.float()
    elif ct is not None and ct.sparse_index is not None:
        w2d.view(-1)[ct.sparse_index.long()] -= ct.sparse_value.float()
    mask = None if ct is None else ct.mask
    omega = torch.ones(rows, cols)
    if config.weighted and h is not None and h.shape == (cols, cols):
        d = torch.diag(h).float().clamp(min=0)
        omega = (d / d.mean().clamp(min=1e-12)).expand(rows, cols).clamp(min=1e-6)
    if mask is not None:
        omega = omega * mask
    k = 2**config.bits
    if config.scope == "row":
        grid, assign = kmeans_1d(w2d, omega, k, config.seed, config.iters)  # (rows, k), (rows, cols)
    else:
        grid, assign = kmeans_1d(w2d.reshape(1, -1), omega.reshape(1, -1), k, config.seed, config.iters)
        grid, assign = grid[0], assign.reshape(rows, cols)
    grid = grid.to(getattr(torch, config.grid_dtype))
    # assign against the levels as stored: rounding them to float16 can move a midpoint past a weight
    levels = grid.float() if grid.dim() == 2 else grid.float()[None, :]
    x = w2d if grid.dim() == 2 else w2d.reshape(1, -1)
    assign = torch.searchsorted((levels[:, 1:] + levels[:, :-1]).contiguous() / 2, x.contiguous()).reshape(rows, cols)
    codes = assign.to(torch.uint8)
    if mask is not None:
        codes = codes.masked_fill(~mask, 0)
    out = CompressedTensor(shape=shape, bits=config.bits, block=(rows, cols), codes=codes,
                           scale=torch.ones(1, 1), grid=grid, mask=mask)
    if ct is not None:
        out.sparse_index, out.sparse_value = ct.sparse_index, ct.sparse_value
    return out


@dataclass(frozen=True)
class Entropy:
    """Store the codes and the mask entropy-coded (ANS, exact); sizes become those of the coded streams."""

    name: ClassVar[str] = "entropy"

    def __call__(self, w: torch.Tensor, ct: CompressedTensor | None, h: torch.Tensor | None = None) -> CompressedTensor:
        if ct is None or (ct.codes is None and ct.mask is None):
            raise SquashError("entropy codes what earlier steps store: put quantize, codebook or prune before it")
        return replace(ct, entropy=True, extra=dict(ct.extra))
