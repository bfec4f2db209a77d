"""Step 4, structured: remove whole channels (neurons), so shapes really shrink and no mask is needed.

A unit u is an output channel of its producer layers (a conv's output channel, a Linear's output row; the
gate and up projections of a gated MLP together) and the matching input slice of its consumer layer (the next
conv's input channel, the rows × columns of a Linear that read it). Removing u deletes the producer rows (and
biases) and the consumer's input slice. Where the unit's value reaches the consumer only through a function
with f(0)·… = 0 (ReLU, GELU, SiLU(gate)·up), the smaller model computes exactly what the full model computes
with that unit's activation held at zero (the "masked model").

Scores (lowest removed, the same fraction in every group of units):
    magnitude    ‖producer rows_u‖₂ · ‖consumer slice_u‖₂
    activation   sqrt(E[a_u²]) · ‖consumer slice_u‖₂, a_u the unit's activations at the consumer's input on
                 calibration data (what the unit actually contributes; structured Wanda)

Units squash knows: the MLP hidden neurons of LLaMA-style decoders (gate_proj, up_proj → down_proj) and of
BERT encoders (intermediate.dense → output.dense), and digits-cnn's conv1 → conv2 → fc1 → fc2 chain. Attention
heads are left alone (grouped-query heads would have to be removed in whole groups).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from squash.errors import RecipeError, SquashError


@dataclass(frozen=True)
class PruneChannels:
    """Remove `sparsity` of the units of every group (rounded down, at least one unit kept)."""

    sparsity: float = 0.25
    score: str = "activation"

    name: ClassVar[str] = "prune_channels"
    model_level: ClassVar[bool] = True

    def __post_init__(self):
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise RecipeError(f"prune_channels.sparsity = {self.sparsity!r}: a fraction from 0 to below 1")
        if self.score not in ("magnitude", "activation"):
            raise RecipeError(f"prune_channels.score = {self.score!r}: choose magnitude or activation")

    @property
    def needs_calibration(self) -> bool:
        return self.score == "activation"


@dataclass
class UnitGroup:
    """Units that are rows of `producers` and input slices of width `width` of `consumer`."""

    producers: list[str]
    consumer: str
    width: int = 1  # consumer input columns per unit (fc1 reads each conv2 channel at 4×4 positions)


def unit_groups(module: nn.Module) -> list[UnitGroup]:
    """The prunable unit groups of a known architecture."""
    names = dict(module.named_modules())
    groups = []
    for name in names:
        if name.endswith(".mlp") and f"{name}.gate_proj" in names:  # LLaMA, Qwen, Mistral …
            groups.append(UnitGroup([f"{name}.gate_proj", f"{name}.up_proj"], f"{name}.down_proj"))
        elif name.endswith(".intermediate") and f"{name}.dense" in names:  # BERT
            parent = name.removesuffix(".intermediate")
            groups.append(UnitGroup([f"{name}.dense"], f"{parent}.output.dense"))
    if {"conv1", "conv2", "fc1", "fc2"} <= set(names):  # digits-cnn
        conv2, fc1 = names["conv2"], names["fc1"]
        groups += [UnitGroup(["conv1"], "conv2"),
                   UnitGroup(["conv2"], "fc1", fc1.in_features // conv2.out_channels),
                   UnitGroup(["fc1"], "fc2")]
    return groups


def _in_slices(consumer: nn.Module, width: int) -> torch.Tensor:
    """The consumer's weight as (units, out, rest): each unit's input slice."""
    w = consumer.weight.detach().float()
    if isinstance(consumer, nn.Linear):
        return w.T.reshape(-1, width, w.shape[0]).permute(0, 2, 1)  # (units, out, width)
    return w.transpose(0, 1).reshape(w.shape[1], w.shape[0], -1)  # conv: (in, out, k·k)


def unit_scores(module: nn.Module, group: UnitGroup, act_rms: torch.Tensor | None) -> torch.Tensor:
    consumer = module.get_submodule(group.consumer)
    out_norm = _in_slices(consumer, group.width).flatten(1).norm(dim=1)  # (units,)
    if act_rms is not None:
        return act_rms * out_norm
    rows = torch.cat([module.get_submodule(p).weight.detach().float().flatten(1) for p in group.producers], dim=1)
    return rows.norm(dim=1) * out_norm


def activation_rms(module: nn.Module, groups: list[UnitGroup], run) -> dict[str, torch.Tensor]:
    """sqrt(E[a_u²]) per unit of each group, from the consumers' inputs while `run()` feeds calibration data."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for g in groups:
        consumer = module.get_submodule(g.consumer)

        def hook(mod, args, g=g):
            x = args[0].detach().float()
            if isinstance(mod, nn.Linear):
                x2 = x.reshape(-1, x.shape[-1]).pow(2)  # (tokens, in)
                per = x2.sum(0).reshape(-1, g.width).sum(1)
                n = x2.shape[0] * g.width
            else:
                per = x.pow(2).transpose(0, 1).flatten(1).sum(1)  # (channels,)
                n = x[:, 0].numel()
            sums[g.consumer] = sums.get(g.consumer, 0) + per
            counts[g.consumer] = counts.get(g.consumer, 0) + n

        handles.append(consumer.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in handles:
            h.remove()
    return {k: (sums[k] / counts[k]).sqrt() for k in sums}


def keep_units(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Indices (sorted) of the units kept: all but the floor(sparsity·n) lowest, at least one kept."""
    n = scores.numel()
    drop = min(math.floor(sparsity * n), n - 1)
    order = torch.argsort(scores, stable=True)
    return order[drop:].sort().values


def shrink_producer(layer: nn.Module, keep: torch.Tensor) -> nn.Module:
    w = layer.weight.detach()[keep].clone()
    b = None if layer.bias is None else layer.bias.detach()[keep].clone()
    if isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, len(keep), bias=b is not None)
    else:
        new = type(layer)(layer.in_channels, len(keep), layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, layer.groups, bias=b is not None)
    return _fill(new, w, b)


def shrink_consumer(layer: nn.Module, keep: torch.Tensor, width: int) -> nn.Module:
    cols = (keep[:, None] * width + torch.arange(width)[None, :]).reshape(-1)  # the unit slices' columns
    w = layer.weight.detach()[:, cols].clone()
    b = None if layer.bias is None else layer.bias.detach().clone()
    if isinstance(layer, nn.Linear):
        new = nn.Linear(len(cols), layer.out_features, bias=b is not None)
    else:
        if layer.groups != 1:
            raise SquashError("grouped convolutions cannot lose input channels one by one")
        new = type(layer)(len(keep), layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, 1, bias=b is not None)
    return _fill(new, w, b)


def _fill(layer: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> nn.Module:
    layer.weight = nn.Parameter(w, requires_grad=False)
    if b is not None:
        layer.bias = nn.Parameter(b, requires_grad=False)
    return layer.eval()


def prune_channels(module: nn.Module, config: PruneChannels, run=None) -> dict[str, list[int]]:
    """Shrink `module` in place; returns the new weight shape of every layer changed (for rebuilding the
    architecture from a file). `run()` feeds calibration data (needed for the activation score)."""
    from squash.recipe import _set_module

    groups = unit_groups(module)
    if not groups:
        raise SquashError("prune_channels knows no channel groups in this model (LLaMA/BERT MLPs, digits-cnn)")
    rms = activation_rms(module, groups, run) if config.score == "activation" and run is not None else {}
    keeps = {g.consumer: keep_units(unit_scores(module, g, rms.get(g.consumer)), config.sparsity) for g in groups}
    shapes = {}
    for g in groups:  # producers first: a layer can be one group's consumer and the next group's producer
        for p in g.producers:
            _set_module(module, p, shrink_producer(module.get_submodule(p), keeps[g.consumer]))
    for g in groups:
        _set_module(module, g.consumer, shrink_consumer(module.get_submodule(g.consumer), keeps[g.consumer], g.width))
    for g in groups:
        for name in (*g.producers, g.consumer):
            shapes[name] = list(module.get_submodule(name).weight.shape)
    return shapes


def masked_forward_hooks(module: nn.Module, config: PruneChannels, run=None) -> list:
    """The "masked model": hooks that zero the removed units at their consumers' inputs instead of removing
    them (same choice of units as prune_channels). Returns the hook handles; used by the tests."""
    groups = unit_groups(module)
    rms = activation_rms(module, groups, run) if config.score == "activation" and run is not None else {}
    handles = []
    for g in groups:
        consumer = module.get_submodule(g.consumer)
        keep = keep_units(unit_scores(module, g, rms.get(g.consumer)), config.sparsity)
        n_units = _in_slices(consumer, g.width).shape[0]
        unit_mask = torch.zeros(n_units, dtype=torch.bool)
        unit_mask[keep] = True

        def hook(mod, args, unit_mask=unit_mask, width=g.width):
            x = args[0]
            if isinstance(mod, nn.Linear):
                return (x * unit_mask.repeat_interleave(width).to(x.dtype),)
            return (x * unit_mask.to(x.dtype)[None, :, None, None],)

        handles.append(consumer.register_forward_pre_hook(hook))
    return handles


def resize_modules(module: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Give `module` the shapes a structurally pruned model was saved with (weights to be loaded after)."""
    from squash.recipe import _set_module

    for name, shape in shapes.items():
        layer = module.get_submodule(name)
        if isinstance(layer, nn.Linear):
            new = nn.Linear(shape[1], shape[0], bias=layer.bias is not None)
        else:
            new = type(layer)(shape[1], shape[0], layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                              1, bias=layer.bias is not None)
        _set_module(module, name, new.eval())
