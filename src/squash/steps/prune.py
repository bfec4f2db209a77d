"""Step 4, prune: a mask M of weights set to zero, W ≈ M ⊙ W'.

Scores (the smallest are pruned):
    magnitude    |W_ij|                                   (Han et al. 2015)
    activation   |W_ij| · ‖X_j‖,  ‖X_j‖ = sqrt(H_jj)     (Wanda: Sun et al. 2024), H = Σ xᵀx
    sparsegpt    W_ij² / [H⁻¹]_jj²  on the error-updated weights, with Optimal Brain Surgeon compensation
                 (SparseGPT: Frantar & Alistarh 2023): columns are visited left to right; the pruned part of
                 column j is removed and its error spread over the columns not yet visited,
                     e = (w_j − m_j ⊙ w_j) / U_jj;   W_{:, k>j} −= e · U_{j, k>j},   H⁻¹ = UᵀU,
                 the same loop GPTQ uses for rounding. The mask is chosen block by block (128 columns) on the
                 updated weights. When a GPTQ quantize step follows, it walks the original weights again with
                 the mask fixed, pruning and rounding in one error-feedback pass.

Patterns:
    unstructured  exactly round(sparsity · n) weights pruned per layer (scope "layer"), per row (scope "row":
                  round(sparsity · cols) in every row, Wanda's choice for language models), or with one magnitude
                  threshold over the whole model (scope "global": compress() turns it into per-layer sparsities)
    N:M           in every group of M consecutive weights of a row, exactly N are kept (2:4: NVIDIA's sparse
                  tensor cores). A row whose length M does not divide keeps N of its last, shorter group too
                  (or all of it when shorter than N).

Structured pruning, which removes whole channels and shrinks the model, is a model-level step: see
squash.steps.channels.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from squash.errors import RecipeError
from squash.steps.quantize import dampened, inverse_cholesky
from squash.tensor import CompressedTensor, matrix_shape

SCORES = ("magnitude", "activation", "sparsegpt")
SCOPES = ("layer", "row", "global")


@dataclass(frozen=True)
class Prune:
    """Prune `sparsity` of the weights (unstructured) or to an "N:M" pattern.

    pattern:  "unstructured" or "N:M" such as "2:4" (N kept of every M)
    score:    "magnitude", "activation" (needs calibration data) or "sparsegpt" (needs calibration data)
    scope:    "layer", "row" or "global" (unstructured only)
    damp:     SparseGPT's dampening, a fraction of mean(diag H)
    embeddings: prune embedding tables too (off: a token's row is all it has; a later quantize step still applies)
    """

    sparsity: float = 0.5
    pattern: str = "unstructured"
    score: str = "magnitude"
    scope: str = "layer"
    damp: float = 0.01
    embeddings: bool = False

    name: ClassVar[str] = "prune"

    def __post_init__(self):
        if self.pattern != "unstructured" and not re.fullmatch(r"\d+:\d+", str(self.pattern)):
            raise RecipeError(f"prune.pattern = {self.pattern!r}: use 'unstructured' or N:M such as '2:4'")
        if self.pattern != "unstructured":
            n, m = self.nm
            if not 0 < n < m:
                raise RecipeError(f"prune.pattern = {self.pattern!r}: N must be between 1 and M − 1")
        elif isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise RecipeError(f"prune.sparsity = {self.sparsity!r}: a fraction from 0 to below 1, such as 0.5")
        if self.score not in SCORES:
            raise RecipeError(f"prune.score = {self.score!r}: choose one of {', '.join(SCORES)}")
        if self.scope not in SCOPES:
            raise RecipeError(f"prune.scope = {self.scope!r}: choose one of {', '.join(SCOPES)}")
        if self.scope != "layer" and (self.pattern != "unstructured" or self.score == "sparsegpt"):
            raise RecipeError(f"prune.scope = {self.scope!r} applies to unstructured magnitude or activation pruning")
        if not (isinstance(self.damp, (int, float)) and 0 < self.damp < 1):
            raise RecipeError(f"prune.damp = {self.damp!r}: a fraction between 0 and 1, such as 0.01")

    @property
    def nm(self) -> tuple[int, int]:
        n, m = (int(x) for x in str(self.pattern).split(":"))
        return n, m

    @property
    def target_sparsity(self) -> float:
        if self.pattern == "unstructured":
            return float(self.sparsity)
        n, m = self.nm
        return 1 - n / m

    @property
    def needs_calibration(self) -> bool:
        return self.score != "magnitude"

    def __call__(self, w: torch.Tensor, ct: CompressedTensor | None, h: torch.Tensor | None = None) -> CompressedTensor:
        return prune(w, self, ct, h)


def prune(w: torch.Tensor, config: Prune, ct: CompressedTensor | None = None,
          h: torch.Tensor | None = None) -> CompressedTensor:
    """Prune float weight `w` (not modified); sparse outliers of a previous `ct` are kept and taken out first.
    Returns W ≈ M ⊙ D + S with D the (compensated) kept values in float16."""
    shape = tuple(w.shape)
    rows, cols = matrix_shape(shape)
    w2d = w.detach().float().reshape(rows, cols).clone()  # (out, in·k…)
    if ct is not None and ct.sparse_index is not None:
        w2d.view(-1)[ct.sparse_index.long()] -= ct.sparse_value.float()
    if h is not None and h.shape != (cols, cols):
        h = None  # an embedding or conv: no input statistics of this shape
    if config.score == "sparsegpt" and h is not None:
        mask, w2d = sparsegpt(w2d, h, config)
    else:
        mask = choose_mask(scores(w2d, h, config.score), config)
    out = CompressedTensor(shape=shape, bits=0, block=(1, 1), codes=None, scale=None, mask=mask,
                           dense=(w2d * mask).half())
    if ct is not None:
        out.sparse_index, out.sparse_value = ct.sparse_index, ct.sparse_value
    return out


def scores(w2d: torch.Tensor, h: torch.Tensor | None, score: str) -> torch.Tensor:
    """|W| or |W|·‖X_j‖ (sparsegpt without data falls back to magnitude: its first block's score is the same
    up to a per-column factor)."""
    if score == "activation" and h is not None:
        return w2d.abs() * torch.diag(h).float().clamp(min=0).sqrt()[None, :]
    return w2d.abs()


def choose_mask(score: torch.Tensor, config: Prune) -> torch.Tensor:
    if config.pattern != "unstructured":
        return nm_mask(score, *config.nm)
    if config.scope == "row":
        return row_mask(score, config.sparsity)
    return layer_mask(score, config.sparsity)


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep all but the round(sparsity·n) lowest scores (ties broken by position)."""
    k = round(sparsity * score.numel())
    mask = torch.ones(score.numel(), dtype=torch.bool)
    if k:
        mask[torch.argsort(score.reshape(-1), stable=True)[:k]] = False
    return mask.reshape(score.shape)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Every row keeps all but its round(sparsity·cols) lowest scores."""
    k = round(sparsity * score.shape[1])
    mask = torch.ones_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :k], False)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In each group of m consecutive columns keep the n highest scores."""
    rows, cols = score.shape
    full = cols - cols % m
    mask = torch.zeros_like(score, dtype=torch.bool)
    if full:
        groups = score[:, :full].reshape(rows, full // m, m)  # (rows, groups, m)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=2).indices, True)
        mask[:, :full] = keep.reshape(rows, full)
    if full < cols:  # the ragged last group
        tail = score[:, full:]
        k = min(n, tail.shape[1])
        mask[:, full:] = torch.zeros_like(tail, dtype=torch.bool).scatter_(1, tail.topk(k, dim=1).indices, True)
    return mask


def sparsegpt(w2d: torch.Tensor, h: torch.Tensor, config: Prune, blocksize: int = 128
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, compensated weights) by the SparseGPT loop; unstructured masks prune exactly round(sparsity·n)."""
    rows, cols = w2d.shape
    H, dead = dampened(h, config.damp)
    U = inverse_cholesky(H)
    W = w2d.clone()
    W[:, dead] = 0.0
    mask = torch.ones(rows, cols, dtype=torch.bool)
    d = torch.diag(U)
    nm = config.nm if config.pattern != "unstructured" else None
    if nm is not None:
        blocksize = nm[1] * max(1, blocksize // nm[1])  # groups never straddle two blocks
    total = config.target_sparsity * rows * cols
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        M1 = torch.ones_like(W1, dtype=torch.bool)
        if nm is None:  # this block's share of the layer's count, rounded cumulatively so the total is exact
            k = round(total * i2 / cols) - round(total * i1 / cols)
            score = W1.pow(2) / d[i1:i2].pow(2)[None, :]
            if k:
                M1.view(-1)[torch.argsort(score.reshape(-1), stable=True)[:k]] = False
        for i in range(i2 - i1):
            if nm is not None and (i1 + i) % nm[1] == 0:
                j2 = min(i + nm[1], i2 - i1)
                score = W1[:, i:j2].pow(2) / d[i1 + i : i1 + j2].pow(2)[None, :]
                M1[:, i:j2] = nm_mask(score, *nm)  # a group shorter than M only at the row's end
            w = W1[:, i]
            err = (w - w * M1[:, i]) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)  # W1 −= err ⊗ U1[i], in place
            Err1[:, i] = err
        mask[:, i1:i2] = M1
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return mask, W * mask


def global_sparsities(weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, float]:
    """One magnitude threshold over all the given weights, pruning round(sparsity · total) of them; returns each
    weight's own resulting sparsity (what "global" pruning means per layer)."""
    flat = torch.cat([w.detach().float().abs().reshape(-1) for w in weights.values()])
    k = round(sparsity * flat.numel())
    if k == 0:
        return {name: 0.0 for name in weights}
    order = torch.argsort(flat, stable=True)
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[order[:k]] = True
    out, start = {}, 0
    for name, w in weights.items():
        n = w.numel()
        out[name] = float(pruned[start : start + n].sum()) / n
        start += n
    return out

