"""Which layers squash can hold compressed, found by what their forward computes rather than by class names.

A *layer* is a module that owns a floating weight of two or more dimensions (`weight`). Its form says how
squash stands in for it:

    linear     y = x·Wᵀ + b          nn.Linear, or any module whose forward computes exactly that (probed)
    linear_t   y = x·W + b           a linear layer stored transposed, W (in, out): GPT-2's Conv1D
    embedding  y = c·W[ids]          nn.Embedding, and subclasses that scale every row by one constant c
                                     (Gemma multiplies by √hidden: dropping c breaks the model)
    conv       y = conv(x, W) + b    nn.Conv1d/2d/3d with zero padding
    wrapped    the module's own forward, run with Ŵ in place of W: any other module owning such a weight
               (a learned position table indexed by an attention mask, a conv with dynamic "same" padding)

A form is decided by probing: the module runs on a small random input and its output is compared with the
plain operation's (relative error ≤ 1e-5). Nothing is assumed from a name, so a subclass that changes the
forward is never swapped for a plain stand-in that would compute something else.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
PROBE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Form:
    """How a layer is held compressed (see the module docstring); `scale` is an embedding's row factor c."""

    kind: str
    scale: float = 1.0

    @property
    def linear(self) -> bool:
        return self.kind in ("linear", "linear_t")

    def to_dict(self) -> dict:
        return {"kind": self.kind, **({"scale": self.scale} if self.scale != 1.0 else {})}


def layer_weight(module: nn.Module) -> torch.Tensor | None:
    """The module's own floating `weight` of ≥ 2 dimensions, or None (norms, biases, containers)."""
    w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
    if w is None or not w.dtype.is_floating_point or w.dim() < 2:
        return None
    return w


def layer_form(module: nn.Module) -> Form | str:
    """The module's Form, or a reason (str) why squash leaves it float. Call on a module that owns a weight."""
    w = layer_weight(module)
    if w is None:
        return "no floating weight of two or more dimensions"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transposed convolutions are not supported yet"
    if type(module) is nn.Linear:
        return Form("linear")
    if type(module) is nn.Embedding:
        return Form("embedding")
    if type(module) in PLAIN_CONVS:
        return Form("conv") if module.padding_mode == "zeros" else Form("wrapped")
    for base, kind in ((nn.Linear, "linear"), (nn.Embedding, "embedding")) + tuple((c, "conv") for c in PLAIN_CONVS):
        if isinstance(module, base) and type(module).forward is base.forward:  # a subclass that keeps the forward
            return Form(kind) if kind != "conv" or module.padding_mode == "zeros" else Form("wrapped")
    try:
        with torch.no_grad():
            return _probe(module, w)
    except Exception:  # the forward does not take the probe's input at all: keep that forward as it is
        return Form("wrapped")


def _probe(module: nn.Module, w: torch.Tensor) -> Form:
    gen = torch.Generator().manual_seed(0)
    if isinstance(module, nn.Embedding):
        ids = torch.arange(min(8, w.shape[0]))
        y, plain = module(ids), F.embedding(ids, w)
        if _close(y, plain):
            return Form("embedding")
        c = float((y * plain).sum() / plain.pow(2).sum().clamp(min=1e-30))  # least-squares c in y ≈ c·plain
        return Form("embedding", scale=c) if _close(y, c * plain) else Form("wrapped")
    if isinstance(module, PLAIN_CONVS) or w.dim() != 2:
        return Form("wrapped")  # a conv subclass (dynamic padding, weight standardisation): its own forward
    bias = module._parameters.get("bias")
    out_in = {"linear": (w.shape[0], w.shape[1]), "linear_t": (w.shape[1], w.shape[0])}
    for kind, (n_out, n_in) in out_in.items():
        if bias is not None and bias.shape != (n_out,):
            continue
        x = torch.randn(3, n_in, generator=gen, dtype=w.dtype)
        try:
            y = module(x)
        except Exception:
            continue
        plain = F.linear(x, w, bias) if kind == "linear" else torch.addmm(bias, x, w) if bias is not None else x @ w
        if isinstance(y, torch.Tensor) and _close(y, plain):
            return Form(kind)
    return Form("wrapped")


def _close(y, plain: torch.Tensor) -> bool:
    if not isinstance(y, torch.Tensor) or y.shape != plain.shape:
        return False
    return float((y - plain).pow(2).sum()) <= PROBE_TOLERANCE**2 * max(float(plain.pow(2).sum()), 1e-30)


def matrix_of(weight: torch.Tensor, form: Form) -> torch.Tensor:
    """The weight as squash stores it: rows are output channels (a transposed linear's W is turned back)."""
    return weight.T.contiguous() if form.kind == "linear_t" else weight


def rms_gain(norm: nn.Module) -> torch.Tensor | None:
    """The gain g with norm(x) = x·rsqrt(mean(x²) + ε)·g, found by probing the module: its weight w (LLaMA,
    Qwen, Phi) or 1 + w (Gemma stores the offset from 1). None for anything else (a LayerNorm, with mean
    subtraction, or a norm without a weight)."""
    w = norm._parameters.get("weight") if hasattr(norm, "_parameters") else None
    if w is None or w.dim() != 1 or not w.dtype.is_floating_point:
        return None
    w = w.detach().float()
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6)
    x = torch.randn(4, w.shape[0], generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            y = norm(x).float()
    except Exception:  # a norm over other axes than the last: not an RMSNorm of this kind
        return None
    for g in (w, 1.0 + w):
        if y.shape == x.shape and torch.allclose(y, F.rms_norm(x, g.shape, g, eps), rtol=1e-4, atol=1e-5):
            return g.contiguous()
    return None
