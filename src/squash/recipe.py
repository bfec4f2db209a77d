"""A recipe is an ordered list of steps; compress() walks the model once and applies it to every weight.

Recipes are named presets (src/squash/recipes/*.toml) or TOML files of the same shape:

    name = "int8"
    exclude = []                 # module names (or prefixes) left in float
    [[steps]]
    step = "quantize"
    bits = 8
    block = "channel"            # "tensor", "channel" or a group size such as 64
    symmetric = true
"""
from __future__ import annotations

import copy
import math
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from squash.errors import RecipeError, SquashError
from squash.layers import Form, layer_form, layer_weight, matrix_of
from squash.models import Model
from squash.runtime.modules import CompressedWeight, compressed_module
from squash.steps import STEPS

Progress = Callable[[int, int, str], None]  # (done, total, tensor name)


def matches(name: str, pattern: str) -> bool:
    """A module name matches a pattern that is the name itself or one of its prefixes (`model.layers.3`)."""
    return name == pattern or name.startswith(pattern + ".")


@dataclass(frozen=True)
class LayerRule:
    """Steps that replace the recipe's default steps for the modules `match` names (a name or a prefix)."""

    match: str
    steps: tuple


@dataclass(frozen=True)
class Recipe:
    """An ordered list of steps applied to every target weight; `layers` rules override them per module
    (the first rule that matches wins); `exclude` leaves modules in float, and so does `min_weights` for layers
    too small to be worth compressing (a token-type embedding of 2 rows is added to every token: its error is
    a bias on the whole model, and compressing it saves nothing)."""

    steps: tuple
    exclude: tuple[str, ...] = ()
    name: str = "custom"
    version: int = 1
    layers: tuple[LayerRule, ...] = ()
    min_weights: int = 0

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(self.steps))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.steps:
            raise RecipeError(f"recipe {self.name!r} has no steps; add at least one [[steps]] table")
        _check_order([s.name for s in self.steps], self.name)
        for r in self.layers:
            _check_order([s.name for s in r.steps], self.name, rule=True)

    @property
    def needs_calibration(self) -> bool:
        every = self.steps + tuple(s for rule in self.layers for s in rule.steps)
        return any(getattr(s, "needs_calibration", False) for s in every)

    def steps_for(self, names: list[str]) -> tuple:
        """The tensor steps for the modules `names` (model-level steps are left out)."""
        for rule in self.layers:
            if any(matches(n, rule.match) for n in names):
                return rule.steps
        return tuple(s for s in self.steps if not getattr(s, "model_level", False))

    def model_step(self, name: str):
        return next((s for s in self.steps if s.name == name), None)

    def to_dict(self) -> dict:
        out = {"name": self.name, "version": self.version, "exclude": list(self.exclude),
               "min_weights": self.min_weights, "steps": _steps_to_dicts(self.steps)}
        if self.layers:
            out["layers"] = [{"match": r.match, "steps": _steps_to_dicts(r.steps)} for r in self.layers]
        return out

    @classmethod
    def from_dict(cls, d: dict, origin: str = "recipe") -> Recipe:
        if not isinstance(d, dict):
            raise RecipeError(f"{origin}: a recipe must be a table")
        unknown = set(d) - {"name", "version", "exclude", "steps", "description", "layers", "min_weights",
                            "finetune_result"}  # the last: what a fine-tune measured, written by squash
        if unknown:
            raise RecipeError(f"{origin}: unknown recipe key(s) {sorted(unknown)}; allowed: name, exclude, steps, layers")
        exclude = d.get("exclude", [])
        if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
            raise RecipeError(f"{origin}: exclude must be a list of module names")
        rules = d.get("layers", [])
        if not isinstance(rules, list) or not all(isinstance(r, dict) and isinstance(r.get("match"), str) for r in rules):
            raise RecipeError(f"{origin}: layers must be [[layers]] tables, each with match = \"module name\" and steps")
        layers = [LayerRule(r["match"], _steps_from(r.get("steps", []), f"{origin}: layers[{i}]"))
                  for i, r in enumerate(rules)]
        min_weights = d.get("min_weights", 0)
        if isinstance(min_weights, bool) or not isinstance(min_weights, int) or min_weights < 0:
            raise RecipeError(f"{origin}: min_weights = {min_weights!r}: a non-negative integer")
        name, version = d.get("name", origin), d.get("version", 1)
        if "name" in d and (not isinstance(name, str) or not name or len(name) > 200):
            raise RecipeError(f"{origin}: name must be a short string")
        if version != 1 or isinstance(version, bool):
            raise RecipeError(f"{origin}: recipe version {version!r}; this squash reads version 1")
        return cls(steps=_steps_from(d.get("steps", []), origin), exclude=exclude, name=d.get("name", origin),
                   version=d.get("version", 1), layers=layers, min_weights=min_weights)


ORDER = {"prune_channels": 0, "outliers": 1, "prune": 2, "quantize": 3, "codebook": 3, "lowrank": 4,
         "entropy": 5, "finetune": 5}


def _check_order(names: list[str], recipe: str, rule: bool = False) -> None:
    """prune_channels, outliers, prune, quantize or codebook, lowrank, then entropy and finetune (in either order):
    each at most once, as a later step builds on the earlier ones."""
    order = [ORDER[n] for n in names]
    if order != sorted(order) or len(set(names)) != len(names):
        raise RecipeError(f"recipe {recipe!r}: steps {names} out of order; use each step at most once, in the order "
                          "prune_channels, outliers, prune, quantize (or codebook), lowrank, entropy, finetune")
    if "quantize" in names and "codebook" in names:
        raise RecipeError(f"recipe {recipe!r}: codebook replaces quantize (its centroids are the grid); use one")
    if rule and ({"prune_channels", "finetune"} & set(names)):
        raise RecipeError(f"recipe {recipe!r}: prune_channels and finetune act on the whole model; put them in "
                          "the recipe's [[steps]], not in a [[layers]] rule")
    if names and all(n in ("prune_channels", "finetune", "entropy") for n in names) and not rule:
        raise RecipeError(f"recipe {recipe!r}: no step compresses the weights; add prune, quantize, codebook or lowrank")


def _steps_to_dicts(steps) -> list[dict]:
    return [{"step": s.name, **asdict(s)} for s in steps]


def _steps_from(raw_steps, origin: str) -> tuple:
    if not isinstance(raw_steps, list) or not raw_steps:
        raise RecipeError(f"{origin}: no steps; add at least one [[steps]] table")
    steps = []
    for i, raw in enumerate(raw_steps):
        if not isinstance(raw, dict):
            raise RecipeError(f"{origin}: steps[{i}] must be a table")
        raw = dict(raw)
        kind = raw.pop("step", None)
        if kind not in STEPS:
            raise RecipeError(f"{origin}: steps[{i}].step = {kind!r}; known steps: {', '.join(STEPS)}")
        cls_ = STEPS[kind]
        allowed = {f.name for f in fields(cls_)}
        bad = set(raw) - allowed
        if bad:
            raise RecipeError(f"{origin}: {kind} has no parameter(s) {sorted(bad)}; it takes {sorted(allowed)}")
        hints = typing.get_type_hints(cls_)
        for key, value in raw.items():
            if not _fits(value, hints[key]):
                raise RecipeError(f"{origin}: {kind}.{key} = {value!r}: expected {_type_name(hints[key])}")
        steps.append(cls_(**raw))
    return tuple(steps)


def _fits(value, hint) -> bool:
    """Whether a TOML value has a step field's declared type: bool is not a number, a float is finite and an int
    may stand for a float; str | int (a block size or "channel") takes either."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for t in options:
        if t is bool and isinstance(value, bool):
            return True
        if isinstance(value, bool):
            continue
        if t is int and isinstance(value, int):
            return -2**63 <= value < 2**63  # TOML's integers are 64-bit; Python's parser takes any size
        if t is float and isinstance(value, (int, float)) and abs(value) < 1e300:  # finite, and no int overflow
            return True
        if t is str and isinstance(value, str):
            return True
        if t is type(None) and value is None:
            return True
        if typing.get_origin(t) in (tuple, list) and isinstance(value, list):
            inner = typing.get_args(t)[:1]
            return all(_fits(v, inner[0]) for v in value) if inner else True
        if t is typing.Any:
            return True
    return False


def _type_name(hint) -> str:
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
             type(None): "nothing"}
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return " or ".join(names.get(t, "a list") for t in options)


def presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("squash.recipes").iterdir() if p.name.endswith(".toml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A preset name (see presets()) or a path to a .toml recipe."""
    text = str(name_or_path)
    if text in presets():
        data = resources.files("squash.recipes").joinpath(f"{text}.toml").read_text()
        origin = text
    else:
        path = Path(text)
        if not path.is_file():
            raise RecipeError(f"recipe {text!r} is neither a preset ({', '.join(presets())}) nor a TOML file")
        try:
            data, origin = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"{path}: cannot read this recipe file ({e})") from e
    try:
        parsed = tomllib.loads(data)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{origin}: invalid TOML ({e})") from e
    except RecursionError:  # tomllib recurses once per nesting level
        raise RecipeError(f"{origin}: invalid TOML (nested too deeply)") from None
    return Recipe.from_dict(parsed, origin)


# ---------------------------------------------------------------- walking the model


def survey(module: nn.Module, exclude: tuple[str, ...] = (), min_weights: int = 0
           ) -> tuple[list[tuple[str, nn.Module, Form]], dict[str, str]]:
    """Every layer of the model (a module owning a floating weight of ≥ 2 dimensions, squash.layers), found
    from the module graph: (name, module, form) for those to compress, and {name: why it stays float} for the
    rest, so nothing is skipped silently. Weights that no layer owns as `weight` (an attention's packed
    in_proj_weight, a class token) are listed with their reason too."""
    names = {n for n, _ in module.named_modules()}
    for e in exclude:
        if e not in names:
            raise SquashError(f"exclude names {e!r}, which is not a module of this model; see `squash inspect`")
    targets, skipped, owned = [], {}, set()
    for name, m in module.named_modules():
        w = layer_weight(m)
        if w is None:
            continue
        owned.add(id(w))
        form = layer_form(m)
        if isinstance(form, str):
            skipped[name] = form
        elif any(matches(name, e) for e in exclude):
            skipped[name] = "excluded by the recipe"
        elif w.numel() < min_weights:
            skipped[name] = f"{w.numel():,} weights, under the recipe's min_weights = {min_weights:,}"
        else:
            targets.append((name, m, form))
    for name, p in module.named_parameters():
        if p.dim() >= 2 and p.dtype.is_floating_point and id(p) not in owned:
            skipped[name] = "a parameter that is not a layer's weight (squash compresses layer weights only)"
    return targets, skipped


def target_weights(module: nn.Module, exclude: tuple[str, ...] = (), min_weights: int = 0) -> list[tuple[str, nn.Module]]:
    """(module name, module) for every layer to compress (see survey)."""
    return [(name, m) for name, m, _ in survey(module, exclude, min_weights)[0]]


def check_finite(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        if not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise SquashError(f"weight {name!r} holds {bad} NaN/Inf value(s); fix the model before compressing it")


def compress(model: Model | nn.Module, recipe: Recipe, calib: list[dict] | None = None,
             progress: Progress | None = None, checkpoint: str | Path | None = None) -> Model:
    """A compressed copy of `model`, the same bytes every time: PyTorch's deterministic algorithms are on while it
    runs (with two threads, some CPU kernels' default backward accumulates in whatever order the threads finish,
    and fine-tuning's Adam turns those last-bit differences, in a key bias whose true gradient is zero, into
    whole steps). See _compress."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: an op without such a kernel still runs
    try:
        return _compress(model, recipe, calib, progress, checkpoint)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _compress(model: Model | nn.Module, recipe: Recipe, calib: list[dict] | None,
              progress: Progress | None, checkpoint: str | Path | None) -> Model:
    """A compressed copy of `model` (which is left untouched): every target weight runs through the recipe's
    tensor steps and its module is replaced by one that holds the compressed weight. Tied weights stay tied.
    Model-level steps run around them: prune_channels first (the shapes shrink), finetune last (distilling
    `model` into the result; `checkpoint` is where an interrupted fine-tune resumes from).

    A recipe that needs calibration (GPTQ, weighted clipping) gathers H = Σ xᵀx per Linear from `calib`
    (input batches; by default drawn from the calibration text), layer after layer on the outputs of the layers
    already compressed."""
    from squash.models import load as load_model

    if isinstance(model, nn.Module):
        model = load_model(model)
    if model.compressed:
        raise SquashError(f"{model.name} is already compressed; compress its float source instead")
    check_finite(model.module)
    module = copy.deepcopy(model.module)
    config = dict(model.config)
    channels = recipe.model_step("prune_channels")
    if channels is not None:
        from squash.calibrate import calibration_batches
        from squash.steps.channels import prune_channels

        batches = calib if calib is not None else calibration_batches(model)
        shapes = prune_channels(module, channels, run=lambda: [module(**b) for b in batches])
        config["resized"] = {**config.get("resized", {}), **shapes}
    found, skipped = survey(module, recipe.exclude, recipe.min_weights)
    forms = {name: form for name, _, form in found}
    targets = [(name, m) for name, m, _ in found]
    for rule in recipe.layers:
        if not any(matches(n, rule.match) for n, _ in targets):
            raise SquashError(f"layers rule match = {rule.match!r} names no compressible module of this model; "
                              "see `squash inspect` for the names")
    if not targets:
        raise SquashError(f"{model.name} has no layer to compress (" + (
            "; ".join(f"{n}: {why}" for n, why in list(skipped.items())[:3]) or "no weight of two or more dimensions")
            + ")")
    groups: dict[int, list[tuple[str, nn.Module]]] = {}  # tied layers share one weight: one group
    for name, m in targets:
        groups.setdefault(id(m.weight), []).append((name, m))

    tensors, tied, done, shrunk = {}, {}, [], {}
    sparsities = _global_sparsities(recipe, groups)

    def apply(key: int, hessian: dict[str, torch.Tensor]) -> None:
        members = groups[key]
        first_name, first = members[0]
        # a tied group takes the Hessian of its Linear member (an output head tied to the token embedding)
        h = next((hessian[n] for n, _ in members if n in hessian), None)
        form = forms[first_name]
        w = matrix_of(first.weight.data, form)  # rows are output channels
        ct = None
        for step in recipe.steps_for([n for n, _ in members]):
            if step.name == "prune" and not step.embeddings and any(isinstance(m, nn.Embedding) for _, m in members):
                continue  # an embedding table (or an output head tied to one) is not pruned unless asked
            if step.name == "prune" and step.scope == "global":
                # a layer wholly under the global threshold prunes everything: 1 − 1e-9 rounds to all of it
                step = replace(step, sparsity=min(sparsities[key], 1 - 1e-9), scope="layer")
            if step.name == "entropy" and ct is None:
                continue  # nothing stored compressed in this layer (an embedding a prune-only recipe skips)
            ct = step(w, ct, h)
        if ct is None:  # every step skipped this layer: it stays float
            for name, _ in members:
                skipped[name] = "no step of the recipe applies to it"
            done.append(key)
            return
        if tuple(w.shape) != tuple(matrix_of(model.module.get_parameter(f"{first_name}.weight"), form).shape):
            shrunk[f"{first_name}.weight"] = w  # structured pruning changed it: the float weight it stands for
        ct.extra["sqnr_db"] = sqnr_db(w, ct.dequantize())
        if form.kind != "linear":
            ct.extra["form"] = form.to_dict()
        weight = CompressedWeight(ct)
        tensors[f"{first_name}.weight"] = ct
        for name, m in members:
            if name != first_name:
                tied[f"{name}.weight"] = f"{first_name}.weight"
            _set_module(module, name, compressed_module(m, weight, forms[name]))
        done.append(key)
        if progress:
            progress(len(done), len(groups), f"{first_name}.weight")

    if not any(getattr(s, "needs_calibration", False) for s in _tensor_steps(recipe)):
        for key in groups:
            apply(key, {})
    else:
        _compress_calibrated(model, module, groups, calib, apply)
    layers = {name: f"compressed ({forms[name].kind})" for name, _ in targets if name not in skipped}
    layers.update({name: f"float: {why}" for name, why in skipped.items()})
    out = Model(module=module.eval(), kind=model.kind, name=model.name, config=config,
                tokenizer=model.tokenizer, source=dict(model.source), tensors=tensors, tied=tied,
                recipe=recipe.to_dict(), layers=layers, assets=dict(model.assets))
    tune = recipe.model_step("finetune")
    if tune is not None:
        from squash.steps.finetune import finetune

        out.recipe["finetune_result"] = finetune(out, model, tune, progress, checkpoint)
        for name, ct in out.tensors.items():
            w = shrunk.get(name, None)
            ct.extra["sqnr_db"] = sqnr_db(float_matrix(model.module, name, ct) if w is None else w, ct.dequantize())
    return out


def _tensor_steps(recipe: Recipe) -> tuple:
    return tuple(s for s in recipe.steps + tuple(x for r in recipe.layers for x in r.steps)
                 if not getattr(s, "model_level", False))


def _global_sparsities(recipe: Recipe, groups: dict) -> dict[int, float]:
    """Per-layer sparsities of global magnitude pruning: one threshold over every weight a global prune step
    applies to."""
    from squash.steps.prune import global_sparsities

    chosen = {}
    for key, members in groups.items():
        steps = recipe.steps_for([n for n, _ in members])
        prune = next((s for s in steps if s.name == "prune" and s.scope == "global"), None)
        if prune is not None and (prune.embeddings or not any(isinstance(m, nn.Embedding) for _, m in members)):
            chosen.setdefault(prune.sparsity, {})[key] = members[0][1].weight.data
    out = {}
    for sparsity, weights in chosen.items():
        out.update(global_sparsities(weights, sparsity))
    return out


def _compress_calibrated(model: Model, module: nn.Module, groups: dict, calib, apply) -> None:
    """Blocks in order, each calibrated on the outputs of the compressed blocks before it; then the rest."""
    from squash.calibrate import block_inputs, calibration_batches, first_output, hessians, repeated_blocks

    batches = calib if calib is not None else calibration_batches(model)
    remaining = list(groups)
    found = repeated_blocks(module)
    if found:
        prefix, blocks = found
        inputs = block_inputs(module, blocks[0], batches)
        for i, block in enumerate(blocks):
            inside = [k for k in remaining if all(n.startswith(f"{prefix}.{i}.") for n, _ in groups[k])]
            layers = {n: m for k in inside for n, m in groups[k]}

            def run_block():
                for args, kwargs in inputs:
                    block(*args, **kwargs)

            h = hessians(run_block, layers)
            for k in inside:
                apply(k, h)
                remaining.remove(k)
            with torch.inference_mode():
                inputs = [_replace_hidden(args, kwargs, first_output(block(*args, **kwargs))) for args, kwargs in inputs]
        del inputs
    if remaining:  # layers outside the blocks (embeddings, output head): one pass through the compressed model

        def run_model():
            for batch in batches:
                module(**batch)

        if found:
            layers = {n: m for k in remaining for n, m in groups[k]}
            h = hessians(run_model, layers)
            for k in list(remaining):
                apply(k, h)
        else:  # a small model without repeated blocks: one pass per layer, in order
            for k in list(remaining):
                current = {n: module.get_submodule(n) for n, _ in groups[k]}
                apply(k, hessians(run_model, current))


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """A block's next inputs: the same call with the hidden states replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def float_matrix(module: nn.Module, name: str, ct) -> torch.Tensor:
    """The float weight `name` of `module` as the compressed tensor `ct` stores it (rows = output channels)."""
    w = module.get_parameter(name)
    return w.T if ct.extra.get("form", {}).get("kind") == "linear_t" else w


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float | None:
    """SQNR = 10·log10(‖W‖² / ‖W − Ŵ‖²) in dB; None when exact."""
    noise = (w.float() - w_hat.float()).pow(2).sum().item()
    signal = w.float().pow(2).sum().item()
    if noise == 0 or signal == 0:
        return None  # exact (or all zero): no finite ratio, and JSON has no infinity
    return 10 * math.log10(signal / noise)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise SquashError("the model itself is a single layer; wrap it in a container module")
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# ---------------------------------------------------------------- accounting


def float_weight_bytes(module: nn.Module) -> tuple[int, int]:
    """(number of weights, bytes as float32) over unique parameters (tied storage counted once)."""
    seen, n = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n, 4 * n


def stored_weight_bytes(model: Model) -> tuple[int, int]:
    """(number of weights, bytes stored): compressed tensors with their scales, plus the float state."""
    n = sum(ct.numel for ct in model.tensors.values())
    b = sum(ct.stored_bytes() for ct in model.tensors.values())
    state, _ = float_state(model.module)
    params = {name for name, _ in model.module.named_parameters()}
    for name, t in state.items():
        b += t.numel() * t.element_size()
        n += t.numel() if name in params else 0
    return n, b


def float_state(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Float tensors to store (the compressed weights are not in state_dict), shared storage once,
    and the aliases of shared storage (name → stored name)."""
    out, aliases, seen = {}, {}, {}
    for name, t in module.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t
    return out, aliases


def total_bits(model: Model) -> float:
    n, b = stored_weight_bytes(model)
    return 8 * b / n if n else math.nan
