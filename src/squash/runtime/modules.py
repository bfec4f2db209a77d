"""Modules that hold compressed weights and compute with them.

This is the reference path: each forward dequantizes the weight (Ŵ = s·(c − z)) and calls the float op.
The float weight matrix is never kept between calls, so resident memory is the codes and scales.
Tied weights (a token embedding shared with the output head) share one CompressedTensor.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from squash.errors import SquashError
from squash.layers import Form
from squash.tensor import CompressedTensor


class CompressedWeight(nn.Module):
    """Holds a CompressedTensor's arrays as buffers (so `.to(device)` moves them) and rebuilds Ŵ on demand."""

    def __init__(self, ct: CompressedTensor):
        super().__init__()
        self.trainable = None  # set while fine-tuning: a module that gives Ŵ differentiably
        self.set_tensor(ct)

    def set_tensor(self, ct: CompressedTensor) -> None:
        self.ct = ct
        for f in ct.ARRAYS:
            self.register_buffer(f, getattr(ct, f), persistent=False)

    def _apply(self, fn, recurse=True):  # keep the dataclass pointing at the moved buffers
        out = super()._apply(fn, recurse)
        for f in self.ct.ARRAYS:
            setattr(self.ct, f, getattr(self, f))
        return out

    def forward(self, dtype: torch.dtype) -> torch.Tensor:
        if self.trainable is not None:
            return self.trainable(dtype)
        return self.ct.dequantize(dtype)


class QLinear(nn.Module):
    """y = x·Ŵᵀ + b."""

    def __init__(self, weight: CompressedWeight, bias: torch.Tensor | None):
        super().__init__()
        self.weight_q = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.out_features, self.in_features = weight.ct.shape

    @property
    def weight(self) -> torch.Tensor:
        """Ŵ, for code that reads a layer's weight directly (nn.MultiheadAttention reads out_proj.weight)."""
        return self.weight_q(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_q.ct.extra.get("activation_bits"):
            x = quantize_activations(x, self.weight_q.ct.extra["activation_bits"])
        return F.linear(x, self.weight_q(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.weight_q.ct.bits}"


def quantize_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token symmetric rounding of activations: x̂ = s_x·round(x / s_x), s_x = max|x| / (2^(b−1) − 1)."""
    qmax = 2 ** (bits - 1) - 1
    s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax  # one scale per token
    q = torch.clamp(torch.round(x / s), -qmax, qmax) * s
    return q if not x.requires_grad else x + (q - x).detach()  # straight through when fine-tuning


class QEmbedding(nn.Module):
    """Rows of Ŵ looked up by index, times the layer's constant row scale c (Gemma's √hidden; usually 1);
    only the rows asked for are dequantized."""

    def __init__(self, weight: CompressedWeight, padding_idx: int | None, scale: float = 1.0):
        super().__init__()
        self.weight_q = weight
        self.padding_idx = padding_idx
        self.scale = scale
        self.num_embeddings, self.embedding_dim = weight.ct.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_q(torch.float32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ct = self.weight_q.ct
        if (self.weight_q.trainable is not None or ct.block[0] != 1 or ct.codes is None or ct.u is not None
                or ct.sparse_index is not None or ct.mask is not None or (ct.grid is not None and ct.grid.dim() == 2)):
            # training, scales shared across rows, or terms beyond codes: the whole table
            rows = F.embedding(ids, self.weight_q(torch.float32), self.padding_idx)
        else:
            rows = _dequantize_rows(ct, ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)  # (…, dim)
        return rows if self.scale == 1.0 else rows * self.scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.weight_q.ct.bits}" + (
            f", rows × {self.scale:.4g}" if self.scale != 1.0 else "")


def _dequantize_rows(ct: CompressedTensor, rows: torch.Tensor) -> torch.Tensor:
    """Ŵ[rows] for a tensor whose blocks are one row high."""
    dim = ct.shape[1]
    bc = ct.block[1]
    s = ct.scale[rows].repeat_interleave(bc, dim=1)[:, :dim]
    z = ct.zero_point()[rows].repeat_interleave(bc, dim=1)[:, :dim]
    levels = ct.codes[rows].float() if ct.grid is None else ct.grid.float()[ct.codes[rows].long()]
    w = s.float() * (levels - z.float())
    return w if ct.col_scale is None else w * ct.col_scale.float()


class QConv(nn.Module):
    """A Conv1d/2d/3d whose weight is compressed; stride, padding and groups copied from the original."""

    def __init__(self, weight: CompressedWeight, bias: torch.Tensor | None, conv: nn.modules.conv._ConvNd):
        super().__init__()
        self.weight_q = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.op = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(conv.kernel_size)]
        if conv.padding_mode != "zeros":
            raise SquashError(f"conv padding_mode {conv.padding_mode!r} is not supported yet; exclude this layer")
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_q(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weight_q(x.dtype), self.bias, self.stride, self.padding, self.dilation, self.groups)


class QWrapped(nn.Module):
    """Any other layer: its own forward, run with Ŵ in place of its weight (torch.func.functional_call).
    The float weight is gone from `inner`; everything else it holds stays as it was."""

    def __init__(self, weight: CompressedWeight, inner: nn.Module):
        super().__init__()
        self.weight_q = weight
        del inner._parameters["weight"]
        self.inner = inner

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_q(torch.float32).reshape(self.weight_q.ct.shape)

    def forward(self, *args, **kwargs):
        from torch.func import functional_call

        return functional_call(self.inner, {"weight": self.weight}, args, kwargs)

    def extra_repr(self) -> str:
        return f"{type(self.inner).__name__} with bits={self.weight_q.ct.bits}"


def compressed_module(original: nn.Module, weight: CompressedWeight, form: Form) -> nn.Module:
    """The compressed stand-in for a layer of the given form (squash.layers)."""
    if form.linear:
        return QLinear(weight, original._parameters.get("bias"))
    if form.kind == "embedding":
        return QEmbedding(weight, getattr(original, "padding_idx", None), form.scale)
    if form.kind == "conv":
        return QConv(weight, original.bias, original)
    if form.kind == "wrapped":
        return QWrapped(weight, original)
    raise TypeError(f"no compressed stand-in for a {form.kind} layer ({type(original).__name__})")


STAND_INS = (QLinear, QEmbedding, QConv, QWrapped)
