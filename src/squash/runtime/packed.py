"""The fast runtime: compressed weights kept packed in memory and multiplied by squash's kernel.

A CompressedTensor W ≈ s·(G[c] − z)·diag(r) + U·V + S becomes a PackedWeight:

    codes   uint8 (N, K) for 5–8 bits; two 4-bit codes a byte for ≤ 4 bits, 32 codes in 16 bytes:
            byte i of a chunk = c[i] | c[i + 16] << 4   (the order one vector load unpacks)
    grid    (1 or N, 16) float32 levels for ≤ 4 bits (0…15 for the integer grid; NF4; a codebook)
    scale, zero   float32 (N, blocks): each block is one row high, `block` codes wide (the last may be short);
                  a symmetric tensor holds one zero point
    col_scale r and low-rank U·V stay as they are and are added around the kernel; outliers S are held as
    (row, column, value) triples sorted by row and added by the kernel's sparse pass:

    y = qmatmul(x·diag(r), codes) + (x·Vᵀ)·Uᵀ + x·Sᵀ

The float weight matrix is never built. Widths of 2–3 bits are held in 4-bit nibbles (a 4-bit grid whose
upper levels are unused) and 5–7 bits in bytes: memory is then 4 or 8 bits a weight, not the stored width.
What cannot be packed (pruning masks, float-kept tensors, per-tensor 8-bit grids) keeps the reference
module, and `accelerate` says which and why.
"""
from __future__ import annotations

import ctypes
import math
import threading
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from squash.runtime import kernels
from squash.tensor import CompressedTensor


@dataclass
class PackedWeight:
    shape: tuple[int, int]  # (N, K)
    bits: int               # 8 or 4: the width the kernel reads
    codes: torch.Tensor
    grid: torch.Tensor | None
    scale: torch.Tensor
    zero: torch.Tensor
    block: int
    col_scale: torch.Tensor | None = None
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    sparse_rows: torch.Tensor | None = None   # int32 (nnz,), ascending
    sparse_cols: torch.Tensor | None = None   # int32 (nnz,)
    sparse_value: torch.Tensor | None = None  # float32 (nnz,)
    int8_activations: bool = False  # few-token products round x to int8 per 32-chunk (kernels.qmatmul_i8)

    def to(self, device) -> "PackedWeight":
        """The same weight with every array on `device` (the GPU path dequantizes there per call)."""
        from dataclasses import fields, replace

        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    def nbytes(self) -> int:
        """Bytes held in memory."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.grid, self.scale, self.zero, self.col_scale, self.u, self.v,
                            self.sparse_rows, self.sparse_cols, self.sparse_value) if t is not None]


def why_not_packable(ct: CompressedTensor) -> str | None:
    """None when the kernel can run this tensor, else the reason it cannot."""
    if ct.codes is None:
        return "no codes (float or low-rank only)"
    if ct.mask is not None:
        return "pruning mask"
    if len(ct.shape) < 2:
        return "not a matrix"
    rows, cols = ct.matrix_shape  # a convolution's: (out channels, in channels × kernel)
    bc = ct.block[1]
    if ct.bits > 4 and ct.grid is not None:
        return f"{ct.bits}-bit custom grid"
    step = 16 if ct.bits > 4 else 32
    if bc < cols and bc % step:
        return f"group of {bc} (the kernel needs a multiple of {step} or whole rows)"
    return None


def pack(ct: CompressedTensor) -> PackedWeight:
    """The kernel's layout of a packable CompressedTensor (see why_not_packable)."""
    reason = why_not_packable(ct)
    if reason:
        raise ValueError(f"cannot pack: {reason}")
    N, K = ct.matrix_shape
    br, bc = ct.block
    block = min(bc, K)
    scale = ct.scale.float().repeat_interleave(br, dim=0)[:N].contiguous()
    if ct.zero is None:  # symmetric: one zero point for the whole tensor
        zero = torch.tensor([ct.midpoint()], dtype=torch.float32)
    else:
        zero = ct.zero_point().float().repeat_interleave(br, dim=0)[:N].contiguous()
    if ct.bits > 4:
        bits, codes, grid = 8, ct.codes.to(torch.uint8).contiguous(), None
    else:
        bits, codes = 4, pack_nibbles(ct.codes)
        if ct.grid is None:
            grid = torch.arange(16, dtype=torch.float32)[None]
        else:
            g = ct.grid.float().reshape(-1, ct.grid.shape[-1])  # (1 or N, levels)
            grid = F.pad(g, (0, 16 - g.shape[1])).contiguous()
    pw = PackedWeight((N, K), bits, codes, grid, scale, zero, block)
    if ct.col_scale is not None:
        pw.col_scale = ct.col_scale.float()
    if ct.u is not None:
        pw.u, pw.v = ct.u.float().contiguous(), ct.v.float().contiguous()
    if ct.sparse_index is not None:
        pw.sparse_rows, pw.sparse_cols, pw.sparse_value = to_sparse(ct.sparse_index.long(), ct.sparse_value, N, K)
    return pw


def to_sparse(index: torch.Tensor, value: torch.Tensor, N: int, K: int):
    """Flat positions n·K + k and their values → (rows int32, cols int32, values float32), sorted by row."""
    if index.numel() and (index.min() < 0 or index.max() >= N * K):
        raise ValueError("outlier positions outside the matrix")
    order = torch.argsort(index, stable=True)
    index, value = index[order], value[order]
    return ((index // K).to(torch.int32).contiguous(), (index % K).to(torch.int32).contiguous(),
            value.float().contiguous())


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes < 16 → (N, ceil(K/32)·16) bytes; byte i of each 32-code chunk = c[i] | c[i+16] << 4."""
    N, K = codes.shape
    Kp = math.ceil(K / 32) * 32
    c = F.pad(codes.to(torch.uint8), (0, Kp - K)).reshape(N, Kp // 32, 2, 16)  # (N, chunks, half, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(N, Kp // 2).contiguous()


def unpack_nibbles(packed: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of pack_nibbles: (n, bytes) → (n, K) codes."""
    n = packed.shape[0]
    b = packed.reshape(n, -1, 1, 16)  # (n, chunks, 1, 16)
    return torch.cat([b & 0xF, b >> 4], dim=2).reshape(n, -1)[:, :K]


def dequantize_rows(pw: PackedWeight, rows: torch.Tensor) -> torch.Tensor:
    """Ŵ[rows] (len(rows), K) from the packed form: the embedding lookup and the reference for tests."""
    N, K = pw.shape
    codes = pw.codes[rows] if pw.bits == 8 else unpack_nibbles(pw.codes[rows], K)
    if pw.grid is None:
        levels = codes.float()
    elif pw.grid.shape[0] == 1:
        levels = pw.grid[0][codes.long()]
    else:
        levels = torch.gather(pw.grid[rows], 1, codes.long())
    s = pw.scale[rows].repeat_interleave(pw.block, dim=1)[:, :K]
    z = pw.zero if pw.zero.numel() == 1 else pw.zero[rows].repeat_interleave(pw.block, dim=1)[:, :K]
    w = s * (levels - z)
    if pw.col_scale is not None:
        w = w * pw.col_scale
    if pw.u is not None:
        w = w + pw.u[rows] @ pw.v
    if pw.sparse_rows is not None:
        if w.device.type == "cpu" and kernels.available():  # straight into w: no dense S block, no index tensors
            w = w.contiguous()
            kernels.sparse_into(w, pw, rows=rows.long().contiguous())
        else:
            w = w + _sparse_rows(pw, rows)
    return w


def _sparse_rows(pw: PackedWeight, rows: torch.Tensor) -> torch.Tensor:
    """S[rows] (len(rows), K) as a dense float32 block (PyTorch ops: the reference, and the GPU's path)."""
    out = torch.zeros(len(rows), pw.shape[1], device=rows.device)
    sorted_rows = pw.sparse_rows.long()
    start = torch.searchsorted(sorted_rows, rows)
    count = torch.searchsorted(sorted_rows, rows, right=True) - start
    first = torch.cumsum(count, 0) - count  # where each asked row's values begin in the gathered list
    which = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), count)  # asked row of each value
    at = start[which] + torch.arange(len(which), device=rows.device) - first[which]  # its index in cols/values
    out.index_put_((which, pw.sparse_cols[at].long()), pw.sparse_value[at], accumulate=True)
    return out


def packed_matmul(x: torch.Tensor, pw: PackedWeight, vector: bool = True) -> torch.Tensor:
    """y = x·Ŵᵀ for x (..., K), float32 out. On a GPU (no squash kernel there) Ŵ is rebuilt per call from the
    packed codes on the device and multiplied there: memory stays packed, speed is the GPU's matmul."""
    if pw.codes.device.type != "cpu":
        w = dequantize_rows(pw, torch.arange(pw.shape[0], device=pw.codes.device))
        return F.linear(x, w.to(x.dtype)).float()
    sparse = pw.sparse_rows is not None
    if x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous() and x.shape[0] < TILED_FROM \
            and pw.col_scale is None and pw.u is None:  # the decode step: codes and outliers only
        y = _few_tokens(x, pw, vector)
        if sparse:
            kernels.sparse_add(y, x, pw.sparse_rows, pw.sparse_cols, pw.sparse_value)
        return y
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pw.shape[1]).float().contiguous()  # (M, K)
    xq = x2 * pw.col_scale if pw.col_scale is not None else x2
    # S multiplies x, not x·diag(r): it goes into the dequantised tiles only when there is no column scale
    in_tiles = sparse and pw.col_scale is None and x2.shape[0] >= TILED_FROM
    if x2.shape[0] >= TILED_FROM:
        y = _tiled(xq.contiguous(), pw, vector, in_tiles)
    else:
        y = _few_tokens(xq.contiguous(), pw, vector)
    if pw.u is not None:
        y = y + (x2 @ pw.v.T) @ pw.u.T  # (M, r) · (r, N)
    if sparse and not in_tiles:
        kernels.sparse_add(y, x2, pw.sparse_rows, pw.sparse_cols, pw.sparse_value)
    return y.reshape(*lead, pw.shape[0])


def _few_tokens(x: torch.Tensor, pw: PackedWeight, vector: bool) -> torch.Tensor:
    if pw.int8_activations and vector:
        return kernels.qmatmul_i8(x, pw.codes, pw.bits, pw.scale, pw.zero, pw.block)
    return kernels.qmatmul(x, pw.codes, pw.bits, pw.grid, pw.scale, pw.zero, pw.block, vector)


def int8_activations_ok(pw: PackedWeight) -> bool:
    """Whether the int8-activation kernel can take this weight: uniform codes (G[c] = c), K and the blocks
    multiples of 32, a CPU with AVX-512 VNNI."""
    N, K = pw.shape
    uniform = pw.grid is None or (pw.grid.shape[0] == 1 and torch.equal(pw.grid[0], torch.arange(16.0)))
    return (uniform and K % 32 == 0 and (pw.block >= K or pw.block % 32 == 0) and pw.codes.device.type == "cpu"
            and kernels.has_vnni())


TILED_FROM = 16  # tokens: from here on a float GEMM over dequantised tiles beats streaming the codes per 8 tokens
TILE_FLOATS = 1 << 20  # a tile of Ŵ holds at most this many float32 values (4 MB): the weight matrices of
#                        smollm2 and minilm fit in one tile (one GEMM); a 49152-row output head takes 48


def _tiled(x: torch.Tensor, pw: PackedWeight, vector: bool, outliers: bool = False) -> torch.Tensor:
    """x·Ŵᵀ for many tokens: Ŵ dequantised a tile of rows at a time (transient, at most TILE_FLOATS values),
    each tile one float GEMM. `outliers`: S is added into each tile (a few values a row) before its GEMM."""
    N, K = pw.shape
    rows = max(1, TILE_FLOATS // K)
    # the kernel writes the reused buffer behind autograd's back: a graph that saves w gets a fresh tile
    tile = _tile if not (torch.is_grad_enabled() and x.requires_grad) else (lambda r, k: None)
    if rows >= N:  # one tile: one GEMM, no copy into a slice
        w = kernels.dequantize(K, pw.codes, pw.bits, pw.grid, pw.scale, pw.zero, pw.block, 0, N, vector,
                               out=tile(N, K))
        if outliers:
            kernels.sparse_into(w, pw, n0=0)
        return x @ w.T
    y = torch.empty(x.shape[0], N)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        w = kernels.dequantize(K, pw.codes, pw.bits, pw.grid, pw.scale, pw.zero, pw.block, n0, n1, vector,
                               out=tile(n1 - n0, K))
        if outliers:
            kernels.sparse_into(w, pw, n0=n0)
        y[:, n0:n1] = x @ w.T  # (M, K) · (K, tile)
    return y


_scratch = threading.local()


def _tile(rows: int, K: int) -> torch.Tensor:
    """A (rows, K) float32 view of this thread's tile buffer (at most TILE_FLOATS values, kept between calls):
    a fresh 4 MB tensor each call costs more in page faults than the dequantisation itself."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < rows * K:
        buf = _scratch.buf = torch.empty(rows * K)
    return buf[: rows * K].view(rows, K)


class _Packed(nn.Module):
    """A module holding a PackedWeight `pw` (and maybe a plain-tensor `bias`): .to(device) moves them too."""

    def _apply(self, fn, recurse=True):
        self.pw = _moved(self.pw, fn)
        if getattr(self, "bias", None) is not None:
            self.bias = fn(self.bias)
        return super()._apply(fn, recurse)


class PackedLinear(_Packed):
    """y = x·Ŵᵀ + b from packed codes."""

    def __init__(self, pw: PackedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.pw = pw
        self.bias = None if bias is None else bias.detach().float().clone()
        self.out_features, self.in_features = pw.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = packed_matmul(x, self.pw)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self.pw.bits}-bit"


class PackedEmbedding(_Packed):
    """Rows of Ŵ looked up by index, dequantised from the packed codes (only the rows asked for), times the
    layer's constant row scale (see QEmbedding)."""

    def __init__(self, pw: PackedWeight, padding_idx: int | None, scale: float = 1.0):
        super().__init__()
        self.pw = pw
        self.padding_idx = padding_idx
        self.scale = scale
        self.num_embeddings, self.embedding_dim = pw.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize_rows(self.pw, ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)
        return rows if self.scale == 1.0 else rows * self.scale


class PackedConv(_Packed):
    """A Conv1d/2d/3d whose weight stays packed: for each call one pass of the kernel rebuilds Ŵ (transient, as a
    tile of PackedLinear's is), then the float convolution runs. The reference QConv rebuilds it in a dozen
    PyTorch operations, which costs more than a small convolution itself."""

    def __init__(self, pw: PackedWeight, conv):
        super().__init__()
        self.pw = pw
        self.weight_shape = tuple(conv.weight_q.ct.shape)  # (out, in / groups, *kernel)
        self.bias = None if conv.bias is None else conv.bias.detach().float().clone()
        self.op, self.stride, self.padding = conv.op, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = full_weight(self.pw).view(self.weight_shape).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self.op(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"weight={self.weight_shape}, packed={self.pw.bits}-bit"


def full_weight(pw: PackedWeight) -> torch.Tensor:
    """All of Ŵ (N, K) as float32: the kernel's dequantisation on the CPU, dequantize_rows elsewhere."""
    N, K = pw.shape
    if pw.codes.device.type != "cpu":
        return dequantize_rows(pw, torch.arange(N, device=pw.codes.device))
    w = kernels.dequantize(K, pw.codes, pw.bits, pw.grid, pw.scale, pw.zero, pw.block, 0, N)
    if pw.col_scale is not None:  # Ŵ = s·(G[c] − z)·diag(r) + U·V + S, in dequantize_rows' order
        w = w * pw.col_scale
    if pw.u is not None:
        w = w + pw.u @ pw.v
    if pw.sparse_rows is not None:
        w = w.contiguous()
        kernels.sparse_into(w, pw, n0=0)
    return w


_MOVED: dict = {}


def _moved(pw: PackedWeight, fn) -> PackedWeight:
    """fn applied to a PackedWeight's arrays, once per weight even when tied modules move it twice."""
    probe = fn(pw.codes)
    if probe.device == pw.codes.device:
        return pw  # a dtype change or no move: packed arrays keep their own dtypes
    key = (id(pw), str(probe.device))
    if key not in _MOVED:
        _MOVED.clear()  # only the latest move is remembered: enough to keep a tied pair tied
        _MOVED[key] = pw.to(probe.device)
    return _MOVED[key]


def w8a8_packable(ct: CompressedTensor) -> bool:
    """int8 weights and activations run on PyTorch's int8×int8→int32 matmul (oneDNN, VNNI/AMX) when the weight
    has one symmetric scale per output channel and nothing besides its codes."""
    rows, cols = ct.matrix_shape
    return (ct.extra.get("activation_bits") == 8 and ct.bits == 8 and ct.grid is None and ct.zero is None
            and ct.block == (1, cols) and len(ct.shape) == 2 and ct.mask is None and ct.u is None
            and ct.sparse_index is None and ct.col_scale is None)


class PackedW8A8Linear(nn.Module):
    """y = (q(x)·Cᵀ)·s_x·s_w + b with int8 activations q(x) = round(x / s_x), s_x = max|x| / 127 per token
    (the reference QLinear's activation rounding) and int8 weights C = c − 128: one int32 matmul.
    `gelu`: y = GELU(…) in the same output pass (set by fuse_gelu for the layer an exact GELU follows)."""

    def __init__(self, ct: CompressedTensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = (ct.codes.to(torch.int16) - 128).to(torch.int8).contiguous()  # (N, K)
        self.scale = ct.scale.float().reshape(-1)  # (N,)
        self.bias = None if bias is None else bias.detach().float().clone()
        self.out_features, self.in_features = self.weight.shape
        self.gelu = False

    def forward(self, x: torch.Tensor, fused: bool = True) -> torch.Tensor:
        """`fused`: the activation rounding and the output scaling each run as one C++ pass (kernels.cpp,
        same float32 operations); False, or no kernel, or a GPU: the same formula in PyTorch calls."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        if fused and x2.device.type == "cpu" and kernels.available():
            ext = kernels.extension()
            xq, sx = ext.quantize_rows(x2, True)
            y = ext.scale_int32(torch._int_mm(xq, self.weight.T), sx, self.scale,
                                _NO_BIAS if self.bias is None else self.bias, True, self.gelu)
            return y.reshape(*lead, self.out_features)
        sx = x2.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127  # (M, 1)
        xq = torch.clamp(torch.round(x2 / sx), -127, 127).to(torch.int8)
        y = torch._int_mm(xq, self.weight.T).float() * sx * self.scale  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        if self.gelu:
            y = F.gelu(y)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8×int8" + (
            ", GELU fused" if self.gelu else "")


def fuse_gelu(module: nn.Module) -> list[str]:
    """Where an exact GELU follows a W8A8 layer in the same parent (BERT's intermediate block: `dense`, then
    `intermediate_act_fn`), compute it in the layer's output pass and make the activation an identity: one pass
    over the (tokens × 4·hidden) activations instead of two. Returns the fused layers' names."""
    fused = []
    for name, mod in module.named_modules():
        dense, act = getattr(mod, "dense", None), getattr(mod, "intermediate_act_fn", None)
        if isinstance(dense, PackedW8A8Linear) and _exact_gelu(act):
            dense.gelu = True
            mod.intermediate_act_fn = nn.Identity()
            fused.append(f"{name}.dense" if name else "dense")
    return fused


def _exact_gelu(act) -> bool:
    """transformers' GELUActivation (erf form) or nn.GELU without the tanh approximation."""
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu

_NO_BIAS = torch.empty(0)


def accelerate(module: nn.Module, int8_activations: bool = True) -> dict[str, str]:
    """Swap every packable compressed Linear/Embedding for its packed form, in place.

    `int8_activations`: products over fewer than TILED_FROM tokens (decoding) round x to int8 per 32-chunk and
    multiply integers (kernels.qmatmul_i8, llama.cpp's scheme) where the weight allows; False keeps x in float32.

    Returns {module name: "packed 8-bit" | "packed 4-bit" | "int8×int8 matmul" | "reference: <reason>"}
    (W8A8 layers run on torch._int_mm). Tied modules (an
    embedding shared with the output head) share one PackedWeight. The unpacked codes are released.
    """
    from squash.runtime.modules import QConv, QEmbedding, QLinear, QWrapped

    kernels.extension()  # build (or load) the kernel before touching the model
    done: dict[int, PackedWeight] = {}
    report: dict[str, str] = {}
    for name, mod in list(module.named_modules()):
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, QWrapped):
                report[full] = f"reference: {type(child.inner).__name__} runs its own forward on Ŵ"
                continue
            if not isinstance(child, (QLinear, QEmbedding, QConv)):
                continue
            ct = child.weight_q.ct
            if child.weight_q.trainable is not None:
                report[full] = "reference: being trained"
                continue
            if isinstance(child, QLinear) and w8a8_packable(ct):
                setattr(mod, child_name, PackedW8A8Linear(ct, child.bias))
                report[full] = "int8×int8 matmul"
                continue
            if ct.extra.get("activation_bits"):
                report[full] = "reference: activation rounding with a weight layout int8 matmul cannot take"
                continue
            reason = why_not_packable(ct)
            if reason:
                report[full] = f"reference: {reason}"
                continue
            pw = done.get(id(ct)) or pack(ct)
            pw.int8_activations = int8_activations and int8_activations_ok(pw)
            done[id(ct)] = pw
            if isinstance(child, QConv):
                setattr(mod, child_name, PackedConv(pw, child))
                report[full] = f"packed {pw.bits}-bit, convolution"
                continue
            new = (PackedLinear(pw, child.bias) if isinstance(child, QLinear)
                   else PackedEmbedding(pw, child.padding_idx, child.scale))
            setattr(mod, child_name, new)
            report[full] = f"packed {pw.bits}-bit"
    for name in fuse_gelu(module):
        report[name] += ", GELU fused"
    _release_memory()
    return report


def _release_memory() -> None:
    """Give freed heap pages back to the OS so resident memory shows what the model holds (glibc only)."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def concat_packed(pws: list[PackedWeight]) -> PackedWeight | None:
    """The rows of several PackedWeights of one input stacked into one (for fused projections), or None
    when their storage differs (width, group, column scales, low-rank terms)."""
    first = pws[0]
    if any(p.bits != first.bits or p.block != first.block or p.shape[1] != first.shape[1] or p.u is not None
           for p in pws):
        return None
    if any((p.col_scale is None) != (first.col_scale is None) or
           (p.col_scale is not None and not torch.equal(p.col_scale, first.col_scale)) for p in pws):
        return None
    grid = None
    if first.bits == 4:
        same = all(p.grid.shape[0] == 1 and torch.equal(p.grid, first.grid) for p in pws)
        grid = first.grid if same else torch.cat([p.grid.expand(p.shape[0], 16) for p in pws]).contiguous()
    out = PackedWeight((sum(p.shape[0] for p in pws), first.shape[1]), first.bits,
                       torch.cat([p.codes for p in pws]).contiguous(), grid,
                       torch.cat([p.scale for p in pws]).contiguous(), _cat_zero(pws),
                       first.block, col_scale=first.col_scale,
                       int8_activations=all(p.int8_activations for p in pws))
    if any(p.sparse_rows is not None for p in pws):
        offsets = torch.tensor([0] + [p.shape[0] for p in pws]).cumsum(0)
        parts = [(p.sparse_rows + int(offsets[i]), p.sparse_cols, p.sparse_value) for i, p in enumerate(pws)
                 if p.sparse_rows is not None]  # each part sorted, parts in row order: the whole stays sorted
        out.sparse_rows, out.sparse_cols, out.sparse_value = (torch.cat([x[j] for x in parts]).contiguous()
                                                              for j in range(3))
    return out


def load_packed(path, int8_activations: bool = True) -> "Model":
    """A .squash file loaded for running: packable weights packed (see accelerate), the rest on the
    reference path; the model's `runtime` maps each compressed layer to how it runs."""
    from squash.io.squash_file import load_squash

    model = load_squash(path)
    report = accelerate(model.module, int8_activations)
    packed = {f"{name}.weight" for name, how in report.items() if not how.startswith("reference")}
    model.tensors = {n: ct for n, ct in model.tensors.items() if n not in packed}  # their codes live packed now
    model.runtime = report
    _release_memory()
    return model


def _cat_zero(pws: list[PackedWeight]) -> torch.Tensor:
    if all(p.zero.numel() == 1 for p in pws) and len({float(p.zero) for p in pws}) == 1:
        return pws[0].zero
    return torch.cat([p.zero.expand_as(p.scale) for p in pws]).contiguous()
