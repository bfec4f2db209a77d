"""Step 2, quantize: codes on a grid, chosen by rounding to nearest or by error-compensating rounding.

Round to nearest (the floor every method is compared with):
    c = nearest code of (w / s + z);   ŵ = s·(G[c] − z)
On the integer grid inside the clamp range |w − ŵ| ≤ s/2 per element; absmax scaling keeps every weight inside.

Grids the codes index (one machinery for all):
    uniform  G = 0 … 2^b − 1 (symmetric: codes 1 … 2^b − 1 around z = 2^(b−1))
    log      G = {0} ∪ {±2^−e : e = 0 … 2^(b−1) − 2}: sign plus a power of two (Miyashita et al. 2016)
    nf       G = quantiles of N(0, 1) scaled to [−1, 1], with an exact zero (NF4: Dettmers et al., QLoRA 2023)

Error-compensating rounding (GPTQ: Frantar et al. 2023, from Optimal Brain Surgeon) with H = Σ xᵀx over
calibration inputs x of the layer: columns are quantized left to right; column j's error, divided by the
Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), is spread over the columns not yet quantized:
    e = (w_j − ŵ_j) / U_jj;    W_{:, k>j} −= e · U_{j, k>j}
so that ‖(W − Ŵ)X‖² is minimised greedily. Group scales are chosen when the walk reaches each group, on the
already-updated weights.

W8A8 (activations = 8): weights as above; the runtime also rounds each token's activations to int8,
x ≈ s_x·q_x with s_x = max|x| / 127 per token, the form int8-only accelerators need.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch

from squash.errors import RecipeError
from squash.steps.normalize import clip_search, hqq_zero, midpoint, round_to_grid, scale_zero
from squash.tensor import CompressedTensor, from_blocks, matrix_shape, resolve_block, to_blocks

BLOCK_NAMES = {"tensor": (-1, -1), "channel": (1, -1)}
CHOICES = {
    "grid": ("uniform", "log", "nf"),
    "clip": ("absmax", "mse", "hqq"),
    "rounding": ("nearest", "gptq"),
    "scale_dtype": ("float32", "float16"),
    "zero_dtype": ("float", "int", "fixed8"),
}


@dataclass(frozen=True)
class Quantize:
    """Quantize a weight to `bits` on a grid, one scale (and zero point) per block.

    block:       "tensor", "channel" (one scale per output channel), or an int g (groups of g input weights)
    symmetric:   no zero point (uniform grid) / z = 0 (log, nf grids)
    grid:        "uniform", "log" or "nf"
    clip:        "absmax" (plain), "mse" (α per block minimising the error; weighted by the diagonal of XᵀX when
                 calibration data is given), "hqq" (data-free zero-point optimisation; asymmetric, float zero)
    rounding:    "nearest" or "gptq" (needs calibration data; Linear layers; others fall back to nearest)
    scale_dtype: "float32" or "float16" (what is stored)
    zero_dtype:  asymmetric zero point stored as "float" (scale_dtype), "int" (an integer packed at `bits`) or
                 "fixed8" (8 bits, of which 8 − bits fractional: z in steps of 2^(bits−8))
    activations: 0, or 8 for W8A8 (per-token int8 activations at run time)
    damp:        GPTQ's dampening, a fraction of mean(diag H) added to the diagonal
    act_order:   GPTQ visits columns by decreasing H_jj (the most driven inputs first, while the most columns are
                 left to absorb their error); group scales are then fixed up front from the original weights
    act_scale:   activation-aware scaling (AWQ: Lin et al. 2024): quantize W·diag(t) with t_j = d_j^α, d_j the RMS
                 of input channel j and α searched per layer, and store r = 1/t so that Ŵ = Q(W·diag(t))·diag(r)
                 exactly undoes it; salient input channels get a finer grid. Needs calibration data.
    """

    bits: int = 8
    block: str | int = "channel"
    symmetric: bool = True
    grid: str = "uniform"
    clip: str = "absmax"
    rounding: str = "nearest"
    scale_dtype: str = "float32"
    zero_dtype: str = "float"
    activations: int = 0
    damp: float = 0.01
    act_order: bool = False
    act_scale: bool = False

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
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise RecipeError(f"quantize.{key} = {getattr(self, key)!r}: choose one of {', '.join(allowed)}")
        if self.grid != "uniform" and not self.symmetric:
            raise RecipeError(f"quantize.grid = {self.grid!r} is symmetric by construction; set symmetric = true")
        if self.clip == "hqq" and (self.symmetric or self.zero_dtype != "float"):
            raise RecipeError("quantize.clip = 'hqq' optimises a float zero point: set symmetric = false, zero_dtype = 'float'")
        if self.activations not in (0, 8):
            raise RecipeError(f"quantize.activations = {self.activations!r}: 0 (weights only) or 8 (W8A8)")
        if not isinstance(self.act_scale, bool):
            raise RecipeError(f"quantize.act_scale = {self.act_scale!r}: must be true or false")
        if not isinstance(self.act_order, bool):
            raise RecipeError(f"quantize.act_order = {self.act_order!r}: must be true or false")
        if not (isinstance(self.damp, (int, float)) and 0 < self.damp < 1):
            raise RecipeError(f"quantize.damp = {self.damp!r}: a fraction between 0 and 1, such as 0.01")

    @property
    def needs_calibration(self) -> bool:
        return self.rounding == "gptq" or self.clip == "mse" or self.act_scale

    def block_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        block = BLOCK_NAMES[self.block] if isinstance(self.block, str) else (1, self.block)
        return resolve_block(block, shape)

    def __call__(self, w: torch.Tensor, ct: CompressedTensor | None, h: torch.Tensor | None = None) -> CompressedTensor:
        return quantize(w, self, ct, h)


@lru_cache(maxsize=None)
def grid_levels(kind: str, bits: int) -> torch.Tensor | None:
    """The sorted levels G of a custom grid in [−1, 1] (None for the integer grid)."""
    if kind == "uniform":
        return None
    if kind == "log":
        powers = [2.0 ** -e for e in range(2 ** (bits - 1) - 1)]
        levels = sorted([-p for p in powers] + [0.0] + powers)
        levels.append(levels[-1])  # 2^b − 1 distinct levels; the spare code repeats the top one
        return torch.tensor(sorted(levels), dtype=torch.float32)
    # nf: 2^(b−1) positive and 2^(b−1) − 1 negative normal quantiles, plus 0, scaled to [−1, 1]
    from scipy.stats import norm

    offset = 0.5 * (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16))  # QLoRA's 0.9677: the outermost quantile used
    pos = norm.ppf(torch.linspace(offset, 0.5, 2 ** (bits - 1) + 1)[:-1].double().numpy())
    neg = -norm.ppf(torch.linspace(offset, 0.5, 2 ** (bits - 1))[:-1].double().numpy())
    levels = torch.tensor(sorted(list(pos) + [0.0] + list(neg)), dtype=torch.float32)
    return levels / levels.abs().max()


def quantize(w: torch.Tensor, config: Quantize, ct: CompressedTensor | None = None,
             h: torch.Tensor | None = None) -> CompressedTensor:
    """Quantize float weight `w` (not modified). A previous `ct` holding sparse outliers is kept and they are
    taken out of `w` first. `h` = Σ xᵀx of the layer's inputs, (in, in), enables GPTQ and weighted clipping."""
    shape = tuple(w.shape)
    rows, cols = matrix_shape(shape)
    block = config.block_shape(shape)
    w2d = w.detach().float().reshape(rows, cols).clone()  # (out, in·k…)
    if ct is not None and ct.sparse_index is not None:
        w2d.view(-1)[ct.sparse_index.long()] -= ct.sparse_value.float()
    if h is not None and h.shape != (cols, cols):
        h = None  # a Hessian of another shape (conv, embedding) does not apply
    mask = None if ct is None else ct.mask
    gptq = config.rounding == "gptq" and h is not None and block[0] in (1, rows)
    if mask is not None and not gptq and ct.dense is not None:
        w2d = ct.dense.float()  # the pruned values, compensated by the prune step (GPTQ redoes that itself)
    grid = grid_levels(config.grid, config.bits)
    col_scale = None
    if config.act_scale and h is not None:
        col_scale = (1.0 / activation_scale(w2d, h, config, grid)).half()  # r = 1/t, stored in float16
        t = 1.0 / col_scale.float()  # the stored r inverted exactly, so that Ŵ = Q(W·t)·r holds as written
        w2d, h = w2d * t, h / torch.outer(t, t)  # X·Wᵀ = (X/t)·(W·t)ᵀ
    if gptq:
        codes, scale, zero = _gptq(w2d, h, config, block, grid, mask)
    else:
        kept = w2d if mask is None else w2d.masked_fill(~mask, float("nan"))  # scales from the kept weights
        codes, scale, zero = _nearest(kept, config, block, grid, None if h is None else torch.diag(h))
    out = CompressedTensor(shape=shape, bits=config.bits, block=block, codes=codes.to(torch.uint8), scale=scale,
                           zero_frac=zero_frac(config) or 0,
                           zero=zero, grid=None if grid is None else grid.clone(), col_scale=col_scale, mask=mask)
    if ct is not None:
        out.sparse_index, out.sparse_value = ct.sparse_index, ct.sparse_value
    if config.activations:
        out.extra["activation_bits"] = config.activations
    return out


AWQ_ALPHAS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)


def activation_scale(w2d: torch.Tensor, h: torch.Tensor, config: Quantize, grid) -> torch.Tensor:
    """t = d^α (geometric mean 1), d_j = sqrt(H_jj): α minimising the output error tr(E·H·Eᵀ) of plain rounding,
    E = W − Q(W·diag(t))·diag(1/t). α = 0 (no scaling) is among the candidates, so it never does worse."""
    d = torch.diag(h).float().clamp(min=1e-12).sqrt()
    d = d / d.log().mean().exp()
    rows, cols = w2d.shape
    block = config.block_shape((rows, cols))
    plain = Quantize(bits=config.bits, block=config.block, symmetric=config.symmetric, grid=config.grid,
                     scale_dtype=config.scale_dtype, zero_dtype=config.zero_dtype)
    best, best_err = torch.ones(cols), float("inf")
    for alpha in AWQ_ALPHAS:
        t = d.pow(alpha)
        codes, s, z = _nearest(w2d * t, plain, block, grid, None)
        ct = CompressedTensor(shape=(rows, cols), bits=config.bits, block=block, codes=codes.to(torch.uint8),
                              scale=s, zero=z, grid=grid, zero_frac=zero_frac(plain) or 0)
        e = w2d - ct.dequantize() / t
        err = ((e @ h) * e).sum().item()
        if err < best_err:
            best, best_err = t, err
    return best


def zero_frac(config: Quantize) -> int | None:
    """Fractional bits of a fixed-point zero point; None for a float zero (or none at all)."""
    if config.symmetric or config.zero_dtype == "float":
        return None
    return 0 if config.zero_dtype == "int" else 8 - config.bits


def _scales(blocks: torch.Tensor, config: Quantize, grid, col_weight: torch.Tensor | None):
    """(s, z) per block for (…, n) blocks, stored dtypes applied; z None when symmetric."""
    frac = zero_frac(config)
    alpha = 1.0
    if config.clip == "mse":
        alpha = clip_search(blocks, config.bits, config.symmetric, col_weight, grid, frac)
    s, z = scale_zero(blocks, config.bits, config.symmetric, alpha, grid is not None, frac)
    if config.clip == "hqq":
        z = hqq_zero(blocks, s, z, config.bits)
    s = s.to(getattr(torch, config.scale_dtype))
    if z is not None:
        z = torch.round(z * 2**frac).to(torch.uint8) if frac is not None else z.to(getattr(torch, config.scale_dtype))
    return s, z


def _nearest(w2d: torch.Tensor, config: Quantize, block, grid, h_diag: torch.Tensor | None):
    rows, cols = w2d.shape
    blocks = to_blocks(w2d, block)  # (R, C, br·bc)
    col_weight = None
    if h_diag is not None:
        col_weight = to_blocks(h_diag.float().expand(rows, cols).contiguous(), block).nan_to_num(nan=0.0)
    s, z = _scales(blocks, config, grid, col_weight)
    zf = midpoint(config.bits, config.symmetric, grid) if z is None else (
        z.float() / 2 ** (zero_frac(config) or 0))[..., None]
    c = round_to_grid(blocks / s.float()[..., None] + zf, config.bits, config.symmetric, grid)
    return from_blocks(c.nan_to_num(nan=0.0), block, rows, cols), s, z


def dampened(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """H + damp·mean(diag H)·I in float64, a dead input (H_jj = 0) given H_jj = 1; and the dead inputs."""
    H = h.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    return H, dead


def inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """U, upper triangular, with H⁻¹ = UᵀU: the factor the GPTQ / SparseGPT loops walk."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()


def _column_kernel(grid, mask):
    """squash's C++ version of GPTQ's column loop (runtime/kernels.cpp, gptq_columns) where it applies: the
    integer grid, no pruning mask, a CPU build of the kernel. None: the Python loop below."""
    if grid is not None or mask is not None or not USE_KERNEL:
        return None
    from squash.runtime import kernels

    return kernels.extension().gptq_columns if kernels.available() else None


USE_KERNEL = True  # tests turn it off to compare the two loops


def _gptq(w2d: torch.Tensor, h: torch.Tensor, config: Quantize, block, grid, mask: torch.Tensor | None = None):
    """GPTQ with lazy batch updates. Natural order: group scales chosen on the updated weights as the walk reaches
    each group. Act order: columns visited by decreasing H_jj, scales fixed up front (static groups).
    With a pruning `mask` the pruned weights become exactly 0 and their error is fed forward like a rounding
    error (SparseGPT's joint prune-and-quantize pass); scales are chosen on the kept weights only."""
    rows, cols = w2d.shape
    br, bc = block
    W = w2d.clone()
    H, dead = dampened(h, config.damp)
    W[:, dead] = 0.0
    h_diag = torch.diag(H).float()
    perm = torch.argsort(h_diag, descending=True) if config.act_order else torch.arange(cols)
    U = inverse_cholesky(H[perm][:, perm])

    n_groups = math.ceil(cols / bc)
    R = 1 if br == rows else rows
    scale = torch.empty(R, n_groups, dtype=getattr(torch, config.scale_dtype))
    frac = zero_frac(config)
    zero = None if config.symmetric else torch.empty(R, n_groups, dtype=torch.uint8 if frac is not None
                                                     else getattr(torch, config.scale_dtype))
    zdiv = 2.0 ** (frac or 0) if frac is not None else 1.0
    codes = torch.empty(rows, cols, dtype=torch.uint8)

    def choose(g: int, cols_now: torch.Tensor) -> None:
        """Scales of group g from its current (error-updated) columns (rows, ≤ bc)."""
        if mask is not None:
            cols_now = cols_now.masked_fill(~mask[:, g * bc : g * bc + cols_now.shape[1]], float("nan"))
        blocks = cols_now.reshape(R, -1)[:, None, :]  # (R, 1, n): one block per row, or one for the tensor
        wd = h_diag[g * bc : g * bc + cols_now.shape[1]].repeat(cols_now.shape[0] // R)[None, None, :]
        s, z = _scales(blocks, config, grid, wd)
        scale[:, g] = s[:, 0]
        if zero is not None:
            zero[:, g] = z[:, 0]

    if config.act_order:  # static groups: every scale chosen now, from the original weights
        for g in range(n_groups):
            choose(g, W[:, g * bc : (g + 1) * bc])
    elif bc >= cols:
        choose(0, W)
    W = W[:, perm]  # (rows, cols) in visiting order
    lazy_groups = not config.act_order and bc < cols
    step = bc * max(1, 128 // bc) if lazy_groups else 128  # lazy-batch width, whole groups
    columns = _column_kernel(grid, mask)

    def per_column(t: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
        """(rows, len(gs)) values of a per-group (R, groups) array for the columns of groups gs."""
        return t[:, gs].float().expand(rows, -1)

    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        if columns is not None:  # the same walk in C++, one segment of fixed scales at a time
            js = perm[i1:i2]
            S1, Z1 = torch.empty_like(W1), torch.empty_like(W1)
            C1 = torch.empty(W1.shape, dtype=torch.uint8)
            bounds = list(range(0, i2 - i1, bc)) if lazy_groups else [0]
            U1c = U1.contiguous()
            for a, b in zip(bounds, bounds[1:] + [i2 - i1]):
                if lazy_groups:
                    choose(int(js[a]) // bc, W1[:, a:b])
                gs = js[a:b] // bc
                S1[:, a:b] = per_column(scale, gs)
                Z1[:, a:b] = midpoint(config.bits, config.symmetric, grid) if zero is None else per_column(zero, gs) / zdiv
                columns(W1, U1c, S1, Z1, a, b, 1.0 if config.symmetric else 0.0, 2.0**config.bits - 1, C1, Err1)
            codes[:, js] = C1
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
            continue
        for i in range(i2 - i1):
            j = int(perm[i1 + i])  # the original column
            g = j // bc
            if lazy_groups and j % bc == 0:
                choose(g, W1[:, i : i + min(bc, i2 - j)])
            s = scale[:, g].float().expand(rows) if R == 1 else scale[:, g].float()
            z = midpoint(config.bits, config.symmetric, grid) if zero is None else (
                zero[:, g].float().expand(rows) if R == 1 else zero[:, g].float()) / zdiv
            w = W1[:, i]
            c = round_to_grid(w / s + z, config.bits, config.symmetric, grid)
            codes[:, j] = c.to(torch.uint8)
            q = s * ((c if grid is None else grid[c.long()]) - z)
            if mask is not None:
                q = q * mask[:, j]
            err = (w - q) / U1[i, i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)  # W1 −= err ⊗ U1[i], in place
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return codes, scale, zero
