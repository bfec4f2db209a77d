"""Calibration: statistics of each layer's inputs, gathered with forward hooks on calibration data only.

For a Linear layer with inputs x (one row per token), H = Σ xᵀx, (in, in): its diagonal weighs clipping errors
by how strongly each input channel is driven, and the whole matrix drives GPTQ.

Layers are processed in order on the outputs of the already-compressed layers before them (as GPTQ does):
the model's repeated blocks (the largest ModuleList: decoder or encoder layers) are run one at a time on the
captured outputs of the block before; a model without such blocks is run whole once per layer.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from squash.data import calibration_text, paragraphs


class HessianHook:
    """Accumulates H = Σ xᵀx over the inputs of one linear layer (any layer of a linear form: its input's last
    dimension is the weight's columns). Layers fed the same tensor (q, k, v; gate, up) share one product
    through `shared`, which remembers the last input seen."""

    def __init__(self, layer: nn.Module, shared: dict):
        self.h = None  # (in, in), sized by the first input
        self.tokens = 0
        self.shared = shared
        self.handle = layer.register_forward_pre_hook(self)

    def __call__(self, module, args):
        x = args[0]
        if self.shared.get("x") is not x:  # holding x keeps its identity from being reused by another tensor
            flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
            self.shared.update(x=x, xtx=flat.T @ flat)
        self.h = self.shared["xtx"].clone() if self.h is None else self.h.add_(self.shared["xtx"])
        self.tokens += x.numel() // x.shape[-1]

    def remove(self) -> torch.Tensor:
        self.handle.remove()
        return self.h


def calibration_batches(model, samples: int = 32, seq_len: int = 512) -> list[dict]:
    """Inputs drawn from the calibration text only: token windows (LM), paragraph batches (encoder), or the
    training images (classifier)."""
    from squash.models import tokenizer_for

    if model.kind == "causal-lm":
        tok = tokenizer_for(model)
        ids = tok(calibration_text(), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        n = min(samples, len(ids) // seq_len)
        windows = ids[: n * seq_len].reshape(n, seq_len)  # (n, T)
        return [{"input_ids": w[None], "use_cache": False} for w in windows]  # a cache would leak across runs
    if model.kind == "encoder":
        tok = tokenizer_for(model)
        texts = paragraphs(calibration_text())[: samples * 16]
        return [dict(tok(texts[i : i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
                for i in range(0, len(texts), 32)]
    if model.kind == "classifier":
        from squash.digits import digits_split

        x = digits_split()["x_train"]
        return [{"x": x[i : i + 256]} for i in range(0, len(x), 256)]
    raise ValueError(f"no calibration data for a {model.kind} model; pass calibration batches yourself")


def repeated_blocks(module: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList holding the most parameters (a transformer's layers), if any."""
    best, best_n = None, 0
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1:
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = (name, m), n
    return best


class _Stop(Exception):
    pass


@torch.inference_mode()
def block_inputs(module: nn.Module, first: nn.Module, batches: list[dict]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) that reach `first` for each calibration batch; the rest of the model is not run."""
    captured = []

    def grab(_, args, kwargs):
        # a key/value cache passed along would grow with every re-run of the block: never keep one
        kwargs = {k: (None if "past_key" in k else v) for k, v in kwargs.items()}
        captured.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                module(**batch)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


@torch.inference_mode()
def hessians(run: Callable[[], None], layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """H of each linear layer in `layers` while `run()` feeds calibration data through them."""
    from squash.layers import Form, layer_form

    shared: dict = {}
    hooks = {name: HessianHook(m, shared) for name, m in layers.items()
             if isinstance(form := layer_form(m), Form) and form.linear}
    try:
        run()
    finally:
        out = {name: hook.remove() for name, hook in hooks.items()}
    # a layer the calibration data never reached has no statistics: it falls back to rounding to nearest
    return {name: h for name, h in out.items() if hooks[name].tokens > 0}


def first_output(out):
    """A block's hidden states, whether it returns a tensor or a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out
