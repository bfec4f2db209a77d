"""Step 3, decompose: low-rank factors and sparse outliers.

Truncated SVD (Eckart–Young): W = Σ σ_i u_i v_iᵀ; keeping the r largest gives the best rank-r approximation
in Frobenius norm, U = u_{1..r}·diag(σ), V = v_{1..r}ᵀ. The rank is given; or the smallest r whose kept
energy Σ_{i≤r} σ_i² / Σ σ_i² reaches `energy`; or the largest r whose factors fit a size target of
`bits_per_weight`: r = ⌊bpw·rows·cols / (b_f·(rows + cols))⌋, b_f the bits of a factor entry (16 or 32).

Low-rank correction of quantisation error (as in LQER / ZeroQuant-V2): W ≈ Q(W) + U·V, with U·V the truncated
SVD of the residual R = W − Q(W). With calibration data the residual is weighted by the input scale
d_j = sqrt(H_jj): the SVD is taken of R·D and V is mapped back by D⁻¹, so the rank is spent where the layer's
inputs are large, approximately minimising ‖(W − Ŵ)X‖ rather than ‖W − Ŵ‖.

Dense + sparse outliers (SpQR, SqueezeLLM): the `fraction` of weights with the largest |w_ij|·d_j (d = 1 without
data) are kept exactly in float16 as a sparse term S (flat int32 position + value each); the quantize step that
follows sees W − S, whose smaller range gives a finer grid to everything else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from squash.errors import RecipeError
from squash.tensor import CompressedTensor, matrix_shape

FACTOR_DTYPES = ("float16", "float32")


def truncated_svd(m: torch.Tensor, rank: int | None = None, energy: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """U (rows, r), V (r, cols) with U·V the best rank-r approximation of m."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    if rank is None:
        kept = torch.cumsum(s**2, 0) / (s**2).sum().clamp(min=1e-30)
        rank = int((kept < energy).sum().item()) + 1
    rank = max(1, min(rank, len(s)))
    return (u[:, :rank] * s[:rank]).float(), vh[:rank].float()


def input_weight(h: torch.Tensor | None, cols: int) -> torch.Tensor | None:
    """d_j = sqrt(H_jj), normalised to mean 1; None without calibration data."""
    if h is None or h.shape != (cols, cols):
        return None
    d = torch.diag(h).float().clamp(min=0).sqrt()
    d = d / d.mean().clamp(min=1e-12)
    return d.clamp(min=1e-3)  # a dead input channel must stay invertible


@dataclass(frozen=True)
class LowRank:
    """W ≈ U·V (first step: a factorisation replacing W) or W ≈ Q(W) + U·V (after quantize: a correction)."""

    rank: int = 0
    energy: float = 0.0
    bits_per_weight: float = 0.0
    factor_dtype: str = "float16"
    weighted: bool = True

    name: ClassVar[str] = "lowrank"

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise RecipeError(f"lowrank.rank = {self.rank!r}: a non-negative integer")
        if not isinstance(self.energy, (int, float)) or not 0 <= self.energy < 1:
            raise RecipeError(f"lowrank.energy = {self.energy!r}: a fraction in [0, 1), such as 0.9")
        if not isinstance(self.bits_per_weight, (int, float)) or self.bits_per_weight < 0:
            raise RecipeError(f"lowrank.bits_per_weight = {self.bits_per_weight!r}: a positive size target")
        if sum(x > 0 for x in (self.rank, self.energy, self.bits_per_weight)) != 1:
            raise RecipeError("lowrank: give exactly one of rank (e.g. 16), energy (e.g. 0.9) or bits_per_weight (e.g. 2)")
        if self.factor_dtype not in FACTOR_DTYPES:
            raise RecipeError(f"lowrank.factor_dtype = {self.factor_dtype!r}: one of {', '.join(FACTOR_DTYPES)}")

    @property
    def needs_calibration(self) -> bool:
        return False  # uses H when the recipe gathers it, works without

    def __call__(self, w: torch.Tensor, ct: CompressedTensor | None, h: torch.Tensor | None = None) -> CompressedTensor:
        return lowrank(w, self, ct, h)


def lowrank(w: torch.Tensor, config: LowRank, ct: CompressedTensor | None = None,
            h: torch.Tensor | None = None) -> CompressedTensor:
    """Factorise W (no `ct`) or the residual W − ct (a correction); weighted by sqrt(diag H) when given."""
    shape = tuple(w.shape)
    rows, cols = matrix_shape(shape)
    w2d = w.detach().float().reshape(rows, cols)
    residual = w2d if ct is None else w2d - ct.dequantize().reshape(rows, cols)
    d = input_weight(h, cols) if config.weighted else None
    target = residual if d is None else residual * d  # (rows, cols)·D
    rank = config.rank or None
    if config.bits_per_weight:
        factor_bits = 16 if config.factor_dtype == "float16" else 32
        rank = max(1, int(config.bits_per_weight * rows * cols / (factor_bits * (rows + cols))))
    u, v = truncated_svd(target, rank, config.energy or None)
    if d is not None:
        v = v / d  # back from the weighted space: (U·V·D)·D⁻¹
    dtype = getattr(torch, config.factor_dtype)
    if ct is None:
        ct = CompressedTensor(shape=shape, bits=0, block=(rows, cols), codes=None, scale=None)
    elif ct.u is not None:
        raise RecipeError("lowrank: this tensor already has a low-rank term; use one lowrank step")
    ct.u, ct.v = u.to(dtype), v.to(dtype)
    ct.extra["rank"] = int(u.shape[1])
    return ct


@dataclass(frozen=True)
class Outliers:
    """Keep the `fraction` most damaging weights in float as a sparse term; put it before quantize."""

    fraction: float = 0.005

    name: ClassVar[str] = "outliers"

    def __post_init__(self):
        if not isinstance(self.fraction, (int, float)) or not 0 < self.fraction < 0.5:
            raise RecipeError(f"outliers.fraction = {self.fraction!r}: a small fraction such as 0.005")

    @property
    def needs_calibration(self) -> bool:
        return False

    def __call__(self, w: torch.Tensor, ct: CompressedTensor | None, h: torch.Tensor | None = None) -> CompressedTensor:
        if ct is not None:
            raise RecipeError("outliers must come before quantize in a recipe (the grid is fitted to what is left)")
        return outliers(w, self, h)


def outliers(w: torch.Tensor, config: Outliers, h: torch.Tensor | None = None) -> CompressedTensor:
    """The top `fraction` of |w_ij|·d_j as a sparse term (int32 flat positions, float16 values)."""
    shape = tuple(w.shape)
    rows, cols = matrix_shape(shape)
    w2d = w.detach().float().reshape(rows, cols)
    d = input_weight(h, cols)
    score = w2d.abs() if d is None else w2d.abs() * d
    k = max(1, int(config.fraction * w2d.numel()))
    idx = torch.topk(score.reshape(-1), k).indices.sort().values
    return CompressedTensor(shape=shape, bits=0, block=(rows, cols), codes=None, scale=None,
                            sparse_index=idx.to(torch.int32), sparse_value=w2d.reshape(-1)[idx].half())
