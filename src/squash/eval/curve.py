"""`squash curve`: sweep a recipe parameter, measure size and quality loss at each point, fit the curve.

    squash curve MODEL --sweep quantize.bits=8,6,5,4,3,2 [--sweep quantize.block=32,64] [--recipe NAME|FILE]

Each point is the base recipe (by default plain round to nearest, `Quantize(bits=8, block=64,
symmetric=False)`; or --recipe) with the swept parameters replaced; several --sweep options give their
cartesian product. At each point:
    size     bits per weight counting everything stored (codes, scales, zeros, float leftovers), per weight of
             the float model: 8·stored bytes / float weights, as `squash.evaluate` reports it
    loss     language models: KL(p_float ‖ p_compressed) in nats per token (and the perplexity ratio);
             encoders: 1 − cos(e_float, e_compressed); classifiers: the accuracy drop in points
             (100 × (accuracy_float − accuracy)); measured per evaluation chunk (an LM window, a group of
             8 paragraphs, one of 8 slices of the test images): the loss is the mean of the chunks, the error
             bars are the standard error over chunks, and the curve fit's bootstrap resamples whole chunks
Each point is cached as one JSON file under `squash.models.cache_dir()/curve` ($SQUASH_CACHE honoured), keyed by
the sha256 of (float weights' sha256, recipe, evaluation size, squash version): an interrupted sweep resumes
where it stopped and a rerun takes seconds. The loss against bits per weight is fitted with
`squash.eval.curve_fit.fit_curve` (exponential, logistic, power law; AICc; cliff and knee with bootstrap
intervals) and written as `curve-MODEL.png` and `curve-MODEL.json`.

Per-layer sensitivity: one layer group (a transformer block, or a single layer in a model without repeated
blocks; tied layers together) compressed at a low setting with the rest of the model left float, for every
group; the loss each causes alone, sorted by damage.

Mixed precision: the loss of every group at every candidate setting (the same machinery), assumed additive
across groups; an exact dynamic programme over a discretised byte budget picks one setting per group to minimise
the summed loss within a size budget (or the fewest bytes whose summed loss meets a target). The result is a
recipe with one [[layers]] rule per group that differs from the most common setting, written as TOML that
`squash.load_recipe` reads back, then compressed and measured again, since additivity is only an assumption.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

import squash
from squash.atomic import write_atomic
from squash.errors import RecipeError, SquashError
from squash.eval.quality import QUICK, EvalSize, lm_windows, saturating_exp, sentence_embeddings
from squash.models import Model, cache_dir, tokenizer_for
from squash.recipe import (
    ORDER, LayerRule, Recipe, compress, float_weight_bytes, load_recipe, matches, stored_weight_bytes, target_weights,
)
from squash.steps import STEPS, Quantize

Progress = Callable[[int, int, str], None]

# float16 scales and integer zero points: 20 bits a group of 64, the layout the presets use
DEFAULT_BASE = Recipe(steps=(Quantize(bits=8, block=64, symmetric=False, scale_dtype="float16", zero_dtype="int"),),
                      name="rtn")
DEFAULT_SWEEP = "quantize.bits=8,6,5,4,3,2"
CACHE_FORMAT = 1  # bump when what a cached point holds, or how it is measured, changes

# what the loss is for each kind of model, and the loss under which a point counts as "within tolerance"
LOSS = {
    "causal-lm": {"name": "KL to float", "unit": "nats/token", "tolerance": 0.05},
    "encoder": {"name": "1 − cosine to float", "unit": "", "tolerance": 0.01},
    "classifier": {"name": "accuracy drop", "unit": "points", "tolerance": 1.0},
}
CLASSIFIER_CHUNKS = 8  # slices of the test images
PARAGRAPHS_PER_CHUNK = 8
DP_CELLS = 20000  # resolution of the byte budget in the allocation's dynamic programme
N_BOOT = 200  # bootstrap refits of the chosen curve (cliff and knee intervals)


# ---------------------------------------------------------------- sweeps and recipes


def parse_sweep(spec: str) -> tuple[str, str, list]:
    """"quantize.bits=8,6,4" → ("quantize", "bits", [8, 6, 4]). Values are read as bool (true/false), int, float
    or else string ("channel"; quotes optional). Unknown steps and parameters are refused with RecipeError."""
    m = re.fullmatch(r"\s*([A-Za-z_]\w*)\.([A-Za-z_]\w*)\s*=\s*(.*?)\s*", spec or "")
    if not m:
        raise RecipeError(f"--sweep {spec!r}: write STEP.PARAMETER=V1,V2,… such as quantize.bits=8,6,4")
    step, param, raw = m.groups()
    if step not in STEPS:
        raise RecipeError(f"--sweep {spec!r}: unknown step {step!r}; known steps: {', '.join(STEPS)}")
    allowed = [f.name for f in fields(STEPS[step])]
    if param not in allowed:
        takes = f"it takes {', '.join(allowed)}" if allowed else "it takes no parameters"
        raise RecipeError(f"--sweep {spec!r}: the {step} step has no parameter {param!r}; {takes}")
    items = [v.strip() for v in raw.split(",")]
    if not raw or any(not v for v in items):
        raise RecipeError(f"--sweep {spec!r}: give comma-separated values after '=', such as {step}.{param}=8,6,4")
    values = [_parse_value(v) for v in items]
    if len({(type(v), v) for v in values}) != len(values):
        raise RecipeError(f"--sweep {spec!r}: a value is repeated")
    return step, param, values


def _parse_value(text: str):
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        value = float(text)
    except ValueError:
        return text
    if not math.isfinite(value):
        raise RecipeError(f"sweep value {text!r}: must be a finite number")
    return value


def parse_sweeps(specs: Sequence[str | tuple] | str | None) -> list[dict]:
    """The cartesian product of several sweeps, as a list of {"step.param": value} (the first sweep varies
    slowest). None or [] gives the default sweep, quantize.bits=8,6,5,4,3,2."""
    if isinstance(specs, str):
        specs = [specs]
    parsed = [s if isinstance(s, tuple) else parse_sweep(s) for s in (specs or [DEFAULT_SWEEP])]
    keys = [f"{step}.{param}" for step, param, _ in parsed]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise RecipeError(f"--sweep {dup} is given twice; put all its values in one --sweep")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, _, values in parsed))]


def setting_label(overrides: dict) -> str:
    return ", ".join(f"{k}={_value_text(v)}" for k, v in overrides.items())


def _value_text(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def recipe_at(base: Recipe | None, overrides: dict) -> Recipe:
    """`base` (default: DEFAULT_BASE, plain round to nearest) with the parameters in `overrides`
    ({"quantize.bits": 4} or {("quantize", "bits"): 4}) replaced in its steps. A step the recipe lacks is added
    with its defaults in its place in the step order (an error where it cannot be, e.g. codebook next to
    quantize). [[layers]] rules are left as they are: they are deliberate per-layer exceptions."""
    base = base or DEFAULT_BASE
    by_step: dict[str, dict] = {}
    for key, value in overrides.items():
        if isinstance(key, tuple):
            step, param = key
        else:
            step, _, param = str(key).partition(".")
        if step not in STEPS or param not in {f.name for f in fields(STEPS[step])}:
            raise RecipeError(f"{step}.{param}: no such step parameter; known steps: {', '.join(STEPS)}")
        by_step.setdefault(step, {})[param] = value
    label = setting_label({f"{s}.{p}": v for s, ps in by_step.items() for p, v in ps.items()})
    steps = list(base.steps)
    for step, params in by_step.items():
        i = next((j for j, s in enumerate(steps) if s.name == step), None)
        try:
            if i is not None:
                steps[i] = replace(steps[i], **params)
            else:
                new = STEPS[step](**params)
                pos = next((j for j, s in enumerate(steps) if ORDER[s.name] > ORDER[step]), len(steps))
                steps.insert(pos, new)
        except RecipeError as e:
            raise RecipeError(f"{label}: {e}") from e
        except (TypeError, ValueError) as e:
            raise RecipeError(f"{label}: invalid value for the {step} step ({e})") from e
    try:
        return replace(base, steps=tuple(steps), name=f"{base.name} {label}" if label else base.name)
    except RecipeError as e:
        raise RecipeError(f"{label} on recipe {base.name!r}: {e}") from e


def base_recipe(recipe: Recipe | str | Path | None) -> Recipe:
    """None → DEFAULT_BASE; a preset name or TOML path → that recipe; a Recipe as it is."""
    if recipe is None:
        return DEFAULT_BASE
    if isinstance(recipe, Recipe):
        return recipe
    return load_recipe(recipe)


# ---------------------------------------------------------------- quality per chunk


@torch.inference_mode()
def lm_window_losses(module, reference, windows: torch.Tensor, progress: Progress | None = None) -> dict:
    """Per evaluation window (same definitions as squash.eval.quality.lm_quality, kept per window): mean KL of
    `module` against `reference` per predicted token, mean NLL of each model, top-1 agreement, tokens."""
    out = {"kl": [], "nll": [], "nll_float": [], "top1": [], "tokens": []}
    for i, w in enumerate(windows):
        x = w[None]  # (1, T)
        logp = torch.log_softmax(module(x).logits[0, :-1].float(), dim=-1)  # (T-1, V)
        logp_ref = torch.log_softmax(reference(x).logits[0, :-1].float(), dim=-1)
        target = w[1:]
        n = len(target)
        out["nll"].append(-logp.gather(1, target[:, None]).sum().item() / n)
        out["nll_float"].append(-logp_ref.gather(1, target[:, None]).sum().item() / n)
        out["kl"].append((logp_ref.exp() * (logp_ref - logp)).sum().item() / n)
        out["top1"].append((logp.argmax(-1) == logp_ref.argmax(-1)).float().mean().item())
        out["tokens"].append(n)
        if progress:
            progress(i + 1, len(windows), "evaluation text")
    return out


class Quality:
    """Quality loss of compressed modules against one float reference, per evaluation chunk. What depends only
    on the reference (its test predictions, its sentence embeddings, the token windows) is computed once."""

    def __init__(self, reference: Model, size: EvalSize = EvalSize()):
        if reference.kind not in LOSS:
            raise SquashError(f"{reference.name} is a {reference.kind} model; the curve measures language models, "
                              "sentence encoders and classifiers")
        self.reference, self.size, self.kind = reference, size, reference.kind
        self._cache: dict = {}

    @property
    def loss(self) -> dict:
        return LOSS[self.kind]

    def describe(self) -> str:
        if self.kind == "causal-lm":
            w = self._windows()
            return f"{w.shape[0]} windows of {w.shape[1]} tokens of evaluation text"
        if self.kind == "encoder":
            return f"{len(self._texts())} evaluation paragraphs"
        return f"{len(self._digits()['y_test'])} held-out digits in {CLASSIFIER_CHUNKS} slices"

    def _windows(self) -> torch.Tensor:
        if "windows" not in self._cache:
            self._cache["windows"] = lm_windows(tokenizer_for(self.reference), self.size)
        return self._cache["windows"]

    def _texts(self) -> list[str]:
        from squash.data import evaluation_text, paragraphs

        return paragraphs(evaluation_text())[: self.size.paragraphs]

    def _digits(self) -> dict:
        if "digits" not in self._cache:
            from squash.digits import digits_split

            self._cache["digits"] = digits_split()
        return self._cache["digits"]

    @torch.inference_mode()
    def measure(self, module, progress: Progress | None = None) -> tuple[list[float], dict]:
        """(per-chunk loss, metrics); the loss of the point is the mean of the chunks."""
        if self.kind == "causal-lm":
            windows = self._windows()
            if len(windows) == 0:
                raise SquashError("the evaluation text is shorter than one evaluation window")
            r = lm_window_losses(module, self.reference.module, windows, progress)
            nll, nll_ref = float(np.mean(r["nll"])), float(np.mean(r["nll_float"]))
            metrics = {"perplexity": saturating_exp(nll), "perplexity_float": saturating_exp(nll_ref),
                       "perplexity_ratio": math.exp(nll - nll_ref), "kl": float(np.mean(r["kl"])),
                       "top1_agreement": float(np.mean(r["top1"])), "tokens": int(sum(r["tokens"]))}
            return [float(v) for v in r["kl"]], metrics
        if self.kind == "encoder":
            texts, tok = self._texts(), tokenizer_for(self.reference)
            if "emb" not in self._cache:
                self._cache["emb"] = sentence_embeddings(self.reference.module, tok, texts, self.size.encoder_max_len)
            e = sentence_embeddings(module, tok, texts, self.size.encoder_max_len)
            cos = (e * self._cache["emb"]).sum(-1).double().numpy()  # (paragraphs,)
            parts = np.array_split(1.0 - cos, max(2, len(cos) // PARAGRAPHS_PER_CHUNK))
            metrics = {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "paragraphs": len(cos)}
            return [float(p.mean()) for p in parts if len(p)], metrics
        data = self._digits()
        if "correct" not in self._cache:
            self._cache["correct"] = (self.reference.module(data["x_test"]).argmax(-1) == data["y_test"]).double()
        ref = self._cache["correct"].numpy()
        got = (module(data["x_test"]).argmax(-1) == data["y_test"]).double().numpy()
        slices = np.array_split(np.arange(len(got)), CLASSIFIER_CHUNKS)
        chunks = [float(100 * (ref[s].sum() - got[s].sum()) / len(s)) for s in slices]  # whole images: exact
        metrics = {"accuracy": float(got.mean()), "accuracy_float": float(ref.mean()), "images": len(got)}
        return chunks, metrics


# ---------------------------------------------------------------- one point, cached


def measure_point(model: Model, reference: Model, recipe: Recipe, size: EvalSize = EvalSize(), *,
                  quality: Quality | None = None, progress: Progress | None = None) -> dict:
    """Compress `model` with `recipe` and measure it against `reference`: bits per weight (all stored bytes,
    per float weight), the loss (mean of the per-chunk losses), its standard error over chunks, the chunks,
    the other metrics (perplexity ratio, cosine, accuracy…), compress seconds, and each tensor's stored bytes."""
    quality = quality or Quality(reference, size)
    t = time.perf_counter()
    small = compress(model, recipe, progress=progress)
    seconds = time.perf_counter() - t
    n_float, float_bytes = float_weight_bytes(reference.module)
    _, stored = stored_weight_bytes(small)
    chunks, metrics = quality.measure(small.module)
    return {
        "recipe": recipe.to_dict(),
        "bpw": 8 * stored / n_float,
        "weight_bytes": stored,
        "float_weight_bytes": float_bytes,
        "weights": n_float,
        "loss": float(np.mean(chunks)),
        "stderr": _stderr(chunks),
        "chunks": chunks,
        "metrics": metrics,
        "compress_seconds": seconds,
        "tensors": {name: ct.stored_bytes() for name, ct in small.tensors.items()},
    }


def _stderr(chunks: Sequence[float]) -> float:
    return float(np.std(chunks, ddof=1) / math.sqrt(len(chunks))) if len(chunks) > 1 else 0.0


def point_key(model: Model, recipe: Recipe, size: EvalSize, reference: Model | None = None) -> str:
    """sha256 of what decides a point: the float weights (and the reference's, when another model), the recipe
    (its name aside), the evaluation size, the kind of loss, squash's version and the cache format."""
    shas = []
    for m in (model, reference if reference is not None and reference is not model else None):
        if m is None:
            continue
        sha = (m.source or {}).get("sha256")
        if not sha:
            raise SquashError(f"{m.name} has no sha256 of its weights; load it with squash.load")
        shas.append(sha)
    recipe_dict = {k: v for k, v in recipe.to_dict().items() if k != "name"}
    payload = {"format": CACHE_FORMAT, "source": shas[0] if len(shas) == 1 else shas, "kind": model.kind,
               "recipe": recipe_dict, "size": asdict(size), "squash": squash.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def point_cache_dir() -> Path:
    return cache_dir() / "curve"


def _read_cached(path: Path, key: str) -> dict | None:
    """The cached point, or None when missing, unreadable, corrupt or for another key (then recomputed)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    needed = {"bpw": float, "loss": float, "chunks": list, "metrics": dict, "tensors": dict, "weight_bytes": int}
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    if not all(isinstance(data.get(k), t) or (t is float and isinstance(data.get(k), int)) for k, t in needed.items()):
        return None
    if not data["chunks"] or not all(isinstance(c, (int, float)) for c in data["chunks"]):
        return None
    return data


def _write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data.encode("utf-8") if isinstance(data, str) else data)


def cached_point(model: Model, reference: Model, recipe: Recipe, size: EvalSize, *, quality: Quality | None = None,
                 use_cache: bool = True, progress: Progress | None = None) -> dict:
    """measure_point, read from the cache when it holds this point (then "cached" is True) and written to it
    after measuring. A cache that cannot be written is skipped, not fatal."""
    key = point_key(model, recipe, size, reference)
    path = point_cache_dir() / f"{key}.json"
    if use_cache:
        hit = _read_cached(path, key)
        if hit is not None:
            hit["recipe"] = recipe.to_dict()
            hit["cached"] = True
            return hit
    point = measure_point(model, reference, recipe, size, quality=quality, progress=progress)
    point["key"] = key
    try:
        _write_atomic(path, json.dumps(point))
    except OSError:
        pass
    point["cached"] = False
    return point


# ---------------------------------------------------------------- layer groups and sensitivity


def layer_groups(model: Model, recipe: Recipe | None = None) -> list[dict]:
    """The units sensitivity and allocation work on: one transformer block (the model's repeated blocks, see
    squash.calibrate.repeated_blocks) or, outside blocks and in models without them, one layer; layers that
    share a weight (a tied output head) are one group. Each: name (a module name or block prefix, usable as a
    [[layers]] match), modules, weights, float_bytes (of its weights, shared storage once)."""
    from squash.calibrate import repeated_blocks

    recipe = recipe or DEFAULT_BASE
    targets = target_weights(model.module, recipe.exclude, recipe.min_weights)
    found = repeated_blocks(model.module)
    prefix = found[0] if found else None
    groups: dict[str, dict] = {}
    owner: dict[int, str] = {}  # id(weight) → group name
    for name, m in targets:
        key = owner.get(id(m.weight))
        if key is None:
            if prefix is not None and name.startswith(prefix + "."):
                key = f"{prefix}.{name[len(prefix) + 1:].split('.')[0]}"
            else:
                key = name
        g = groups.setdefault(key, {"name": key, "modules": [], "weights": 0, "float_bytes": 0, "_ids": set()})
        g["modules"].append(name)
        if id(m.weight) not in g["_ids"] and id(m.weight) not in owner:
            g["weights"] += m.weight.numel()
            g["float_bytes"] += m.weight.numel() * m.weight.element_size()
        g["_ids"].add(id(m.weight))
        owner[id(m.weight)] = key
    if not groups:
        raise SquashError(f"{model.name} has no Linear, Conv or Embedding layer to compress")
    return [{k: v for k, v in g.items() if k != "_ids"} for g in groups.values()]


def group_recipe(recipe: Recipe, group: dict, groups: list[dict]) -> Recipe:
    """`recipe` applied to `group` only: every other group's modules are excluded (left float); [[layers]] rules
    that name none of the group's modules are dropped (compress refuses rules that match nothing)."""
    others = tuple(n for g in groups if g["name"] != group["name"] for n in g["modules"])
    rules = tuple(r for r in recipe.layers if any(matches(n, r.match) for n in group["modules"]))
    return replace(recipe, exclude=tuple(recipe.exclude) + others, layers=rules,
                   name=f"{recipe.name} on {group['name']} only")


def sensitivity(model: Model, reference: Model, low_recipe: Recipe, size: EvalSize = EvalSize(), *,
                quality: Quality | None = None, progress: Progress | None = None, use_cache: bool = True) -> list[dict]:
    """The loss each layer group causes when it alone is compressed with `low_recipe` (e.g. 2- or 3-bit round to
    nearest) and the rest of the model stays float; rows sorted by loss, most damaging first."""
    if _model_steps(low_recipe):
        raise RecipeError("sensitivity compresses one layer group at a time: give tensor steps only, not "
                          "prune_channels or finetune")
    quality = quality or Quality(reference, size)
    groups = layer_groups(reference, low_recipe)
    rows = []
    for i, g in enumerate(groups):
        if progress:
            progress(i, len(groups), f"sensitivity: {g['name']}")
        p = cached_point(model, reference, group_recipe(low_recipe, g, groups), size, quality=quality,
                         use_cache=use_cache)
        group_bytes = sum(p["tensors"].values())
        rows.append({"group": g["name"], "modules": g["modules"], "weights": g["weights"], "loss": p["loss"],
                     "stderr": p["stderr"], "chunks": p["chunks"], "group_bpw": 8 * group_bytes / max(g["weights"], 1),
                     "bpw": p["bpw"], "metrics": p["metrics"], "cached": p["cached"]})
    if progress:
        progress(len(groups), len(groups), "sensitivity")
    return sorted(rows, key=lambda r: -r["loss"])


def plot_sensitivity(rows: list[dict], path: Path, *, title: str | None = None, loss_label: str = "loss") -> Path:
    """A horizontal bar chart of the loss per group, most damaging at the top, ±1 standard error."""
    from matplotlib.figure import Figure

    path = Path(path)
    shown = rows[:40]
    fig = Figure(figsize=(8, 1.2 + 0.32 * max(len(shown), 3)), dpi=120)
    ax = fig.add_subplot()
    names = [r["group"] for r in shown][::-1]
    losses = [r["loss"] for r in shown][::-1]
    errs = [r["stderr"] for r in shown][::-1]
    top = max((abs(v) for v in losses), default=0) or 1
    colors = ["#c0392b" if v >= 0.5 * top else "#e67e22" if v >= 0.1 * top else "#2e86c1" for v in losses]
    ax.barh(names, losses, xerr=errs, color=colors, capsize=2)
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel(f"{loss_label} with only this group compressed (±1 s.e. over chunks)")
    ax.set_title(title or "per-layer sensitivity", fontsize=10)
    if len(rows) > len(shown):
        ax.text(0.99, 0.01, f"{len(rows) - len(shown)} least damaging groups not shown", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=7, color="grey")
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def _save_figure(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _write_atomic(Path(path), buf.getvalue())


# ---------------------------------------------------------------- mixed precision


def _choice_recipes(choices: Sequence, base: Recipe) -> list[tuple[str, Recipe]]:
    """(label, recipe) per choice: a Recipe, a (label, Recipe) pair, a {"step.param": value} dict, an int
    (quantize bits), a "step.param=value" string (several joined by ';') or a preset name / TOML path."""
    out = []
    for c in choices:
        if isinstance(c, Recipe):
            out.append((c.name, c))
        elif isinstance(c, tuple) and len(c) == 2 and isinstance(c[1], Recipe):
            out.append((str(c[0]), c[1]))
        elif isinstance(c, int) and not isinstance(c, bool):
            out.append((f"quantize.bits={c}", recipe_at(base, {"quantize.bits": c})))
        elif isinstance(c, dict):
            out.append((setting_label(c), recipe_at(base, c)))
        elif isinstance(c, str) and "=" in c:
            overrides = parse_setting(c)
            out.append((setting_label(overrides), recipe_at(base, overrides)))
        elif isinstance(c, (str, Path)):
            r = load_recipe(c)
            out.append((r.name, r))
        else:
            raise RecipeError(f"allocation choice {c!r}: give a Recipe, bits, or a setting such as quantize.bits=4")
    if not out:
        raise RecipeError("allocation needs at least one choice of setting")
    for label, r in out:
        if _model_steps(r):  # prune_channels reshapes the whole model; fine-tuning trains all of it
            raise RecipeError(f"allocation choice {label!r}: per-layer choices take tensor steps only, not "
                              "prune_channels or finetune")
    first = out[0][1]
    for label, r in out[1:]:
        if (r.exclude, r.min_weights, r.layers) != (first.exclude, first.min_weights, first.layers):
            raise RecipeError(f"allocation choices must share exclude, min_weights and [[layers]]; {label!r} differs")
    return out


def parse_setting(text: str) -> dict:
    """"quantize.bits=3" (several joined by ';') → {"quantize.bits": 3}: single values, as in --sweep."""
    overrides = {}
    for part in [p for p in re.split(r"[;\s]+", text.strip()) if p]:
        step, param, values = parse_sweep(part)
        if len(values) != 1:
            raise RecipeError(f"{part!r}: a setting takes one value here (use ';' between parameters)")
        overrides[f"{step}.{param}"] = values[0]
    if not overrides:
        raise RecipeError(f"{text!r}: write a setting such as quantize.bits=3")
    return overrides


def _model_steps(recipe: Recipe) -> tuple:
    return tuple(s for s in recipe.steps if getattr(s, "model_level", False))


def _knapsack(weights: np.ndarray, losses: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact multiple-choice knapsack by dynamic programming: f[k] = the least summed loss with one choice per
    group (row) and summed integer weight ≤ k; `arg[g, k]` the choice of group g on that optimum."""
    n_groups, n_choices = weights.shape
    f = np.zeros(cap + 1)
    arg = np.full((n_groups, cap + 1), -1, dtype=np.int32)
    for g in range(n_groups):
        best = np.full(cap + 1, np.inf)
        for c in range(n_choices):
            w = int(weights[g, c])
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = f[: cap + 1 - w] + losses[g, c]
            better = cand < best
            best[better] = cand[better]
            arg[g, better] = c
        f = best
    return f, arg


def _backtrack(arg: np.ndarray, weights: np.ndarray, k: int) -> list[int]:
    picks = [0] * arg.shape[0]
    for g in range(arg.shape[0] - 1, -1, -1):
        c = int(arg[g, k])
        picks[g] = c
        k -= int(weights[g, c])
    return picks


def plan_allocation(model: Model, reference: Model, choices: Sequence, budget_bpw: float | None = None,
                    max_loss: float | None = None, *, base: Recipe | None = None, size: EvalSize = EvalSize(),
                    quality: Quality | None = None, progress: Progress | None = None, use_cache: bool = True,
                    name: str | None = None) -> dict:
    """Measure every layer group at every choice (alone, the rest float), then pick one choice per group:
    least summed loss with bits per weight ≤ `budget_bpw`, or fewest bytes with summed loss ≤ `max_loss`.
    Losses are assumed additive across groups, and a negative measured loss (noise: compressing a layer rarely
    helps) counts as 0. Returns the recipe and the plan: per group its choice, bytes and loss; the predicted
    bits per weight and loss."""
    if (budget_bpw is None) == (max_loss is None):
        raise SquashError("give exactly one of a size budget (bits per weight) or a loss target")
    if budget_bpw is not None and not (isinstance(budget_bpw, (int, float)) and budget_bpw > 0):
        raise SquashError(f"budget {budget_bpw!r} bits per weight: must be a positive number")
    if max_loss is not None and not (isinstance(max_loss, (int, float)) and math.isfinite(max_loss)):
        raise SquashError(f"loss target {max_loss!r}: must be a finite number")
    options = _choice_recipes(choices, base_recipe(base))
    quality = quality or Quality(reference, size)
    groups = layer_groups(reference, options[0][1])
    n_float, _ = float_weight_bytes(reference.module)
    _, float_state_bytes = stored_weight_bytes(Model(module=reference.module, kind=reference.kind,
                                                     name=reference.name, config={}))
    fixed = float_state_bytes - sum(g["float_bytes"] for g in groups)  # norms, biases, excluded layers, buffers
    total = len(groups) * len(options)
    nbytes = np.zeros((len(groups), len(options)))
    losses = np.zeros((len(groups), len(options)))
    for gi, g in enumerate(groups):
        for ci, (label, r) in enumerate(options):
            if progress:
                progress(gi * len(options) + ci, total, f"allocation: {g['name']} at {label}")
            p = cached_point(model, reference, group_recipe(r, g, groups), size, quality=quality, use_cache=use_cache)
            nbytes[gi, ci] = sum(p["tensors"].values())
            losses[gi, ci] = p["loss"]
    if progress:
        progress(total, total, "allocation")
    clipped = np.maximum(losses, 0.0)
    smallest = fixed + nbytes.min(axis=1).sum()
    if budget_bpw is not None:
        room = budget_bpw * n_float / 8 - fixed
        unit = max(1.0, room / DP_CELLS)
        w = np.ceil(nbytes / unit).astype(np.int64)
        cap = int(math.floor(room / unit)) if room > 0 else -1
        if cap < 0 or w.min(axis=1).sum() > cap:
            raise SquashError(f"a budget of {budget_bpw:g} bits per weight is below the smallest these choices reach "
                              f"({8 * smallest / n_float:.3f}, every group at its smallest setting)")
        # ties on loss go to the larger choice: among equally harmless options, keep the finer one
        eps = 1e-9 * max(float(clipped.max()), 1e-12) / max(cap, 1)
        f, arg = _knapsack(w, clipped - eps * w, cap)
        k = cap
    else:
        unit = max(1.0, nbytes.max(axis=1).sum() / DP_CELLS)
        w = np.ceil(nbytes / unit).astype(np.int64)
        cap = int(w.max(axis=1).sum())
        f, arg = _knapsack(w, clipped, cap)
        ok = np.flatnonzero(f <= max_loss + 1e-12)
        if not ok.size:
            raise SquashError(f"no mix of these settings keeps the summed loss within {max_loss:g} "
                              f"(the least is {clipped.min(axis=1).sum():.4g}, every group at its best setting)")
        k = int(ok[0])
    picks = _backtrack(arg, w, k)
    plan_groups = [{"group": g["name"], "modules": g["modules"], "weights": g["weights"],
                    "choice": options[c][0], "bytes": int(nbytes[gi, c]),
                    "bpw": float(8 * nbytes[gi, c] / max(g["weights"], 1)),
                    "loss": float(losses[gi, c]),
                    "losses": {options[j][0]: float(losses[gi, j]) for j in range(len(options))}}
                   for gi, (g, c) in enumerate(zip(groups, picks))]
    recipe = _mixed_recipe(options, groups, picks, name or f"mixed-{_slug(reference.name)}")
    chosen_bytes = fixed + sum(nbytes[gi, c] for gi, c in enumerate(picks))
    return {
        "recipe": recipe,
        "budget_bpw": budget_bpw,
        "max_loss": max_loss,
        "choices": [label for label, _ in options],
        "groups": plan_groups,
        "fixed_bytes": int(fixed),
        "predicted": {"bpw": float(8 * chosen_bytes / n_float), "weight_bytes": int(chosen_bytes),
                      "loss": float(sum(clipped[gi, c] for gi, c in enumerate(picks)))},
    }


def allocate(model: Model, reference: Model, choices: Sequence, budget_bpw: float | None = None,
             max_loss: float | None = None, **kwargs) -> Recipe:
    """The mixed-precision recipe of plan_allocation (see there)."""
    return plan_allocation(model, reference, choices, budget_bpw, max_loss, **kwargs)["recipe"]


def _mixed_recipe(options: list[tuple[str, Recipe]], groups: list[dict], picks: list[int], name: str) -> Recipe:
    """The setting chosen for most weights as the recipe's steps; a [[layers]] rule for each group chosen
    otherwise, after the base recipe's own rules (which were in force when the groups were measured)."""
    weight_of: dict[int, int] = {}
    for g, c in zip(groups, picks):
        weight_of[c] = weight_of.get(c, 0) + g["weights"]
    default = max(weight_of, key=lambda c: (weight_of[c], -c))
    base = options[default][1]
    rules = list(base.layers)
    for g, c in zip(groups, picks):
        if c != default:
            steps = tuple(s for s in options[c][1].steps if not getattr(s, "model_level", False))
            rules.append(LayerRule(g["name"], steps))
    return replace(base, name=name, layers=tuple(rules))


# ---------------------------------------------------------------- recipes as TOML


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise RecipeError(f"cannot write {v!r} ({type(v).__name__}) to a TOML recipe")


def _toml_steps(steps, header: str) -> list[str]:
    lines = []
    for s in steps:
        lines += [header, f"step = {_toml_value(s.name)}"]
        lines += [f"{f.name} = {_toml_value(getattr(s, f.name))}" for f in fields(s)]
        lines.append("")
    return lines


def recipe_to_toml(recipe: Recipe, comment: str | None = None) -> str:
    """The recipe as a TOML file that squash.load_recipe reads back to an equal Recipe; every step parameter is
    written out, so the file means the same even if defaults change. `comment` goes on top as # lines."""
    lines = [f"# {line}".rstrip() for line in (comment or "").splitlines()]
    lines += [f"name = {_toml_value(recipe.name)}", f"version = {_toml_value(recipe.version)}",
              f"exclude = {_toml_value(list(recipe.exclude))}", f"min_weights = {_toml_value(recipe.min_weights)}", ""]
    lines += _toml_steps(recipe.steps, "[[steps]]")
    for rule in recipe.layers:
        lines += ["[[layers]]", f"match = {_toml_value(rule.match)}", ""]
        lines += _toml_steps(rule.steps, "[[layers.steps]]")
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- the whole run


def _slug(name: str) -> str:
    stem = Path(str(name)).name
    stem = stem[:-5] if stem.endswith(".gguf") else stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "model"


def fmt_loss(kind: str, v: float | None) -> str:
    if v is None:
        return "?"
    if kind == "causal-lm":
        return f"KL {v:.4g}"
    if kind == "encoder":
        return f"1−cos {v:.4g}"
    return f"accuracy drop {v:.2f} pt"


def _pareto(points: list[dict]) -> list[int]:
    """Indices of the points no other point beats on both size and loss."""
    keep = []
    for i, p in enumerate(points):
        if not any(q["bpw"] <= p["bpw"] and q["loss"] <= p["loss"] and (q["bpw"], q["loss"]) != (p["bpw"], p["loss"])
                   for q in points):
            keep.append(i)
    return keep


def _fit(points: list[dict], several_params: bool, n_boot: int) -> tuple[object | None, list[int], str | None]:
    from squash.eval.curve_fit import fit_curve

    idx = _pareto(points) if several_params else list(range(len(points)))
    x = [points[i]["bpw"] for i in idx]
    chunks = [points[i]["chunks"] for i in idx]
    try:
        if len({len(c) for c in chunks}) == 1 and len(chunks[0]) >= 2:
            return fit_curve(x, chunks=chunks, n_boot=n_boot), idx, None
        return fit_curve(x, [points[i]["loss"] for i in idx], n_boot=n_boot), idx, None
    except ValueError as e:
        return None, idx, f"no curve fitted: {e}"


def run_curve(model_name: str | Model, sweeps: Sequence[str] | str | None = None, recipe: Recipe | str | None = None,
              quick: bool = False, out_dir: Path | str = Path("."), progress: Progress | None = None, *,
              sensitivity_at: Recipe | str | None = None, budget_bpw: float | None = None,
              max_loss: float | None = None, use_cache: bool = True, n_boot: int | None = None,
              size: EvalSize | None = None, budget_mb: float | None = None) -> dict:
    """Sweep, measure (cached), fit, write curve-MODEL.png and curve-MODEL.json in `out_dir`; return the dict.

    sensitivity_at: also measure per-layer sensitivity at this setting ("lowest": the sweep's point with the
    fewest bits per weight; "quantize.bits=3"; a preset or TOML), written as sensitivity-MODEL.png.
    budget_bpw / max_loss: also allocate mixed precision over the sweep's settings, write mixed-MODEL.toml,
    compress with it and measure the result. budget_mb: the size budget in megabytes (10^6 bytes) of stored
    weights instead, turned into bits per weight of this model."""
    size = size or (QUICK if quick else EvalSize())
    base = base_recipe(recipe)
    settings = parse_sweeps(sweeps)
    specs = [sweeps] if isinstance(sweeps, str) else list(sweeps or [DEFAULT_SWEEP])
    specs = [s if isinstance(s, str) else f"{s[0]}.{s[1]}={','.join(map(_value_text, s[2]))}" for s in specs]
    recipes = [recipe_at(base, s) for s in settings]  # every recipe checked before the slow part
    if sum(x is not None for x in (budget_bpw, max_loss, budget_mb)) > 1:
        raise SquashError("give one size budget or a loss target for the allocation, not several")
    if budget_mb is not None and not budget_mb > 0:
        raise SquashError(f"budget {budget_mb!r} MB: must be a positive number")
    low = None
    if isinstance(sensitivity_at, Recipe):
        low = sensitivity_at
    elif sensitivity_at is not None and sensitivity_at != "lowest":
        text = str(sensitivity_at)
        low = recipe_at(base, parse_setting(text)) if "=" in text else load_recipe(text)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SquashError(f"{out_dir}: exists and is not a folder")
    # created by the first file written (_write_atomic), so a run that fails early leaves no empty folder

    if isinstance(model_name, Model):
        model = model_name
    else:
        from squash.models import load

        if progress:
            progress(0, len(recipes), f"loading {model_name}")
        model = load(model_name)
    if model.compressed:
        raise SquashError(f"{model.name} is already compressed; sweep its float source instead")
    if budget_mb is not None:
        budget_bpw = 8 * budget_mb * 1e6 / float_weight_bytes(model.module)[0]
    quality = Quality(model, size)
    slug = _slug(model.name)
    loss_info = quality.loss

    points = []
    for i, (s, r) in enumerate(zip(settings, recipes)):
        label = setting_label(s)

        def step(done, total, what, i=i, label=label):
            if progress:
                progress(i, len(recipes), f"{label} · {what}")

        if progress:
            progress(i, len(recipes), label)
        p = cached_point(model, model, r, size, quality=quality, use_cache=use_cache, progress=step)
        p = {"label": label, "setting": s, **{k: v for k, v in p.items() if k not in ("key", "tensors")}}
        points.append(p)
    if progress:
        progress(len(recipes), len(recipes), "fitting")

    several = len(specs) > 1
    fit, fitted, fit_note = _fit(points, several, N_BOOT if n_boot is None else n_boot)
    tol = loss_info["tolerance"]
    within = [p for p in points if p["loss"] <= tol]
    best = min(within, key=lambda p: (p["bpw"], p["loss"])) if within else None
    recommendation = None
    if best is not None:
        recommendation = {"label": best["label"], "setting": best["setting"], "bpw": best["bpw"],
                          "loss": best["loss"], "tolerance": tol, "recipe": best["recipe"]}

    result = {
        "model": model.name,
        "kind": model.kind,
        "source_sha256": model.source.get("sha256"),
        "squash_version": squash.__version__,
        "base_recipe": base.to_dict(),
        "sweep": specs,
        "eval_size": asdict(size),
        "evaluated_on": quality.describe(),
        "loss": {**loss_info},
        "points": points,
        "fit": fit.to_dict() if fit is not None else None,
        "fitted_points": [points[i]["label"] for i in fitted],
        "fit_note": fit_note,
        "recommendation": recommendation,
        "sensitivity": None,
        "allocation": None,
    }

    if sensitivity_at is not None:
        if low is None:
            low = min(zip(points, recipes), key=lambda pr: pr[0]["bpw"])[1]
        rows = sensitivity(model, model, low, size, quality=quality, progress=progress, use_cache=use_cache)
        sens_png = out_dir / f"sensitivity-{slug}.png"
        plot_sensitivity(rows, sens_png, title=f"{model.name}: each group alone at {low.name}",
                         loss_label=_axis_label(loss_info))
        result["sensitivity"] = {"recipe": low.to_dict(), "rows": rows, "plot": str(sens_png)}

    if budget_bpw is not None or max_loss is not None:
        options = [(setting_label(s), r) for s, r in zip(settings, recipes)]
        plan = plan_allocation(model, model, options, budget_bpw, max_loss, size=size, quality=quality,
                               progress=progress, use_cache=use_cache, name=f"mixed-{slug}")
        mixed = plan.pop("recipe")
        toml_path = out_dir / f"mixed-{slug}.toml"
        target = (f"within {budget_bpw:g} bits per weight" if budget_bpw is not None
                  else f"summed {loss_info['name']} ≤ {max_loss:g}")
        comment = "\n".join([f"squash curve: mixed precision for {model.name}, {target}",
                             f"predicted {plan['predicted']['bpw']:.3f} bits per weight, summed loss "
                             f"{plan['predicted']['loss']:.4g}; per group:"]
                            + [f"  {g['group']}: {g['choice']} ({g['bpw']:.2f} bits/weight, loss {g['loss']:.4g})"
                               for g in plan["groups"]])
        _write_atomic(toml_path, recipe_to_toml(mixed, comment))
        if progress:
            progress(0, 1, "measuring the mixed recipe")
        final = cached_point(model, model, load_recipe(toml_path), size, quality=quality, use_cache=use_cache)
        final = {"label": mixed.name, **{k: v for k, v in final.items() if k not in ("key", "tensors")}}
        below = [p for p in points if p["bpw"] <= final["bpw"] + 1e-9]
        above = [p for p in points if p["bpw"] > final["bpw"] + 1e-9]
        result["allocation"] = {
            **plan, "recipe": mixed.to_dict(), "recipe_file": str(toml_path), "measured": final,
            "uniform_below": max(below, key=lambda p: p["bpw"])["label"] if below else None,
            "uniform_above": min(above, key=lambda p: p["bpw"])["label"] if above else None,
            "meets_target": bool(final["bpw"] <= budget_bpw + 1e-9 if budget_bpw is not None
                                 else final["loss"] <= max_loss + 1e-12),
        }

    result["summary"] = summary_text(result, fit)
    png = out_dir / f"curve-{slug}.png"
    js = out_dir / f"curve-{slug}.json"
    result["files"] = {"plot": str(png), "json": str(js)}
    plot_curve(result, fit, png)
    _write_atomic(js, json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")
    return result


def json_safe(v):
    """The result with numpy scalars as Python numbers and NaN / ±inf as None (JSON has neither)."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _axis_label(loss_info: dict) -> str:
    return f"{loss_info['name']}" + (f" ({loss_info['unit']})" if loss_info["unit"] else "")


def summary_text(result: dict, fit) -> str:
    """The plain-words summary: what was measured, the curve, the recommendation, sensitivity, allocation."""
    kind, loss = result["kind"], result["loss"]
    pts = result["points"]
    lo, hi = min(p["bpw"] for p in pts), max(p["bpw"] for p in pts)
    lines = [f"{result['model']}: {len(pts)} points ({'; '.join(result['sweep'])} on recipe "
             f"{result['base_recipe']['name']!r}) from {hi:.2f} down to {lo:.2f} bits per weight (all stored bytes "
             f"counted); loss = {_axis_label(loss)}, on {result['evaluated_on']}."]
    lines.append(fit.summary() if fit is not None else (result["fit_note"] or "No curve fitted.") + "")
    if len(result["fitted_points"]) < len(pts):
        lines.append(f"(Fitted on the {len(result['fitted_points'])} points no other beats on both size and loss.)")
    tol = loss["tolerance"]
    rec = result["recommendation"]
    if rec:
        lines.append(f"Recommendation: {rec['label']} at {rec['bpw']:.3f} bits per weight, the smallest measured "
                     f"point within tolerance ({fmt_loss(kind, rec['loss'])}; tolerance {fmt_tolerance(kind, tol)}).")
    else:
        best = min(pts, key=lambda p: p["loss"])
        lines.append(f"No measured point is within tolerance ({fmt_tolerance(kind, tol)}); the best is "
                     f"{best['label']} at {best['bpw']:.3f} bits per weight ({fmt_loss(kind, best['loss'])}).")
    sens = result.get("sensitivity")
    if sens and sens["rows"]:
        rows = sens["rows"]
        worst = ", ".join(f"{r['group']} ({fmt_loss(kind, r['loss'])})" for r in rows[:3])
        least = f"; least {rows[-1]['group']} ({fmt_loss(kind, rows[-1]['loss'])})" if len(rows) > 3 else ""
        lines.append(f"Sensitivity at {sens['recipe']['name']}, one group at a time: most damaging {worst}{least}.")
    alloc = result.get("allocation")
    if alloc:
        m, pred = alloc["measured"], alloc["predicted"]
        target = (f"a budget of {alloc['budget_bpw']:g} bits per weight" if alloc["budget_bpw"] is not None
                  else f"a loss target of {alloc['max_loss']:g}")
        text = (f"Mixed precision for {target} ({alloc['recipe_file']}): measured {m['bpw']:.3f} bits per weight, "
                f"{fmt_loss(kind, m['loss'])} (predicted by adding per-group losses: {pred['bpw']:.3f}, "
                f"{fmt_loss(kind, pred['loss'])})")
        by_label = {p["label"]: p for p in pts}
        for key, word in (("uniform_below", "the nearest smaller uniform setting"),
                          ("uniform_above", "the nearest larger one")):
            if alloc.get(key):
                u = by_label[alloc[key]]
                text += f"; {word}, {u['label']}, has {u['bpw']:.3f} and {fmt_loss(kind, u['loss'])}"
        if not alloc["meets_target"]:
            text += (". The measured result misses the target: per-group losses do not add up exactly; "
                     "ask for a tighter target")
        lines.append(text + ".")
    return "\n".join(lines)


def plot_curve(result: dict, fit, path: Path) -> Path:
    """Measured points with ±1 standard error over chunks, every fitted family (the chosen one bold), the cliff
    and knee with their bootstrap intervals, the tolerance, the recommended and the mixed-precision points."""
    from matplotlib.figure import Figure

    from squash.eval.curve_fit import LABELS, predict

    pts = result["points"]
    kind, loss = result["kind"], result["loss"]
    fig = Figure(figsize=(8.5, 5.5), dpi=120)
    ax = fig.add_subplot()
    x = np.array([p["bpw"] for p in pts])
    y = np.array([p["loss"] for p in pts])
    ax.errorbar(x, y, yerr=[p["stderr"] for p in pts], fmt="o", color="black", ecolor="grey", capsize=3, ms=5,
                zorder=5, label="measured (±1 s.e. over evaluation chunks)")
    for p in pts:
        ax.annotate(", ".join(_value_text(v) for v in p["setting"].values()), (p["bpw"], p["loss"]),
                    textcoords="offset points", xytext=(5, 6), fontsize=7, color="dimgrey")
    if fit is not None and fit.chosen is not None:
        xs = np.linspace(min(fit.x), max(fit.x), 400)
        for f in fit.fits:
            if not f.ok:
                continue
            with np.errstate(all="ignore"):
                ys = predict(f.family, f.params, xs)
            chosen = f.family == fit.chosen
            weight = f" (Akaike weight {f.weight:.2f})" if f.weight is not None else ""
            ax.plot(xs, ys, lw=2.2 if chosen else 1.0, ls="-" if chosen else "--", alpha=1.0 if chosen else 0.6,
                    label=f"{LABELS[f.family]} fit{weight}{' — chosen' if chosen else ''}")
        if fit.cliff is not None:
            ax.axvline(fit.cliff, color="#c0392b", ls="--", lw=1.2, label=f"cliff {fit.cliff:.2f} bits")
            if fit.cliff_interval:
                ax.axvspan(*fit.cliff_interval, color="#c0392b", alpha=0.12)
        if fit.knee is not None:
            ky = float(predict(fit.chosen, fit.chosen_fit.params, [fit.knee])[0])
            edge = " (edge of data)" if fit.knee_at_edge else ""
            ax.plot([fit.knee], [ky], marker="D", color="#e67e22", ms=8, zorder=6, ls="none",
                    label=f"knee {fit.knee:.2f} bits{edge}")
            if fit.knee_interval:
                ax.axvspan(*fit.knee_interval, color="#e67e22", alpha=0.12)
    ax.axhline(loss["tolerance"], color="#27ae60", ls=":", lw=1.2, label=f"tolerance {loss['tolerance']:g}")
    rec = result.get("recommendation")
    if rec:
        ax.plot([rec["bpw"]], [rec["loss"]], marker="o", ms=14, mfc="none", mec="#27ae60", mew=2, ls="none",
                zorder=6, label=f"recommended: {rec['label']}")
    alloc = result.get("allocation")
    if alloc:
        m = alloc["measured"]
        ax.errorbar([m["bpw"]], [m["loss"]], yerr=[m["stderr"]], fmt="*", ms=14, color="#8e44ad", capsize=3,
                    zorder=7, label=f"mixed precision ({m['bpw']:.2f} bits)")
    ax.set_xlabel("bits per weight (all stored bytes counted)")
    ax.set_ylabel(_axis_label(loss))
    ax.set_title(f"{result['model']}: {'; '.join(result['sweep'])} on {result['base_recipe']['name']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save_figure(fig, Path(path))
    return Path(path)


# ---------------------------------------------------------------- the command


def add_parser(subparsers) -> None:
    s = subparsers.add_parser("curve", help="sweep a recipe parameter: size against quality loss, the fitted curve "
                                            "and its cliff")
    s.add_argument("model", help="a bundled name (see `squash models`), a transformers folder or a .gguf file")
    s.add_argument("--sweep", action="append", metavar="STEP.PARAM=V1,V2,…",
                   help=f"a recipe parameter and its values (repeat for a cartesian product; default {DEFAULT_SWEEP})")
    s.add_argument("--recipe", help="the base recipe, a preset name or a .toml file (default: round to nearest, "
                                    "groups of 64, asymmetric)")
    s.add_argument("--out", default=".", help="folder for curve-MODEL.png / .json (default: here)")
    s.add_argument("--quick", action="store_true", help="evaluate on a small slice of the evaluation data")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("--sensitivity", nargs="?", const="lowest", metavar="SETTING",
                   help="also measure each layer group alone at SETTING (e.g. quantize.bits=3; default: the sweep's "
                        "smallest point)")
    s.add_argument("--budget-bpw", type=float, metavar="X",
                   help="mixed precision: the least-loss mix of the sweep's settings within X bits per weight")
    s.add_argument("--budget-mb", type=float, metavar="MB",
                   help="mixed precision: as --budget-bpw, the budget in megabytes of stored weights")
    s.add_argument("--max-loss", "--max-kl", dest="max_loss", type=float, metavar="X",
                   help="mixed precision: the smallest mix whose summed loss (KL, 1−cos or accuracy points) is ≤ X")
    s.add_argument("--no-cache", action="store_true", help="measure every point again (the cache is rewritten)")
    s.set_defaults(func=main)


def main(args) -> int:
    from rich.table import Table
    from rich.text import Text

    from squash.cli import out, progress_bar

    if sum(x is not None for x in (args.budget_bpw, args.budget_mb, args.max_loss)) > 1:
        raise SquashError("give one of --budget-bpw, --budget-mb or --max-loss")
    with progress_bar("curve", args.json) as cb:
        result = run_curve(args.model, args.sweep, args.recipe, args.quick, Path(args.out), cb,
                           sensitivity_at=args.sensitivity, budget_bpw=args.budget_bpw, max_loss=args.max_loss,
                           use_cache=not args.no_cache, budget_mb=args.budget_mb)
    if args.json:
        print(json.dumps(json_safe(result), indent=2, allow_nan=False))
        return 0
    kind = result["kind"]
    params = list(result["points"][0]["setting"])
    table = Table(title=Text(f"{result['model']}  ·  {result['evaluated_on']}"))
    for col in params:
        table.add_column(col, justify="right")
    for col in ("bits/weight", SHORT[kind], "± s.e.", "also", "time"):
        table.add_column(col, justify="left" if col == "also" else "right", no_wrap=col != "also")
    for p in result["points"]:
        table.add_row(*(_value_text(v) for v in p["setting"].values()), f"{p['bpw']:.3f}", f"{p['loss']:.4g}",
                      f"{p['stderr']:.2g}", _also(kind, p["metrics"]),
                      "cached" if p["cached"] else f"{p['compress_seconds']:.1f} s")
    out.print(table)
    sens = result.get("sensitivity")
    if sens:
        t = Table(title=Text(f"sensitivity: each group alone at {sens['recipe']['name']}"))
        for col in ("group", "weights", SHORT[kind], "± s.e."):
            t.add_column(col, justify="left" if col == "group" else "right")
        for r in sens["rows"][:15]:
            t.add_row(Text(r["group"]), f"{r['weights']:,}", f"{r['loss']:.4g}", f"{r['stderr']:.2g}")
        out.print(t)
    out.print(Text(result["summary"]))
    files = [result["files"]["plot"], result["files"]["json"]]
    if sens:
        files.append(sens["plot"])
    if result.get("allocation"):
        files.append(result["allocation"]["recipe_file"])
    out.print(Text("wrote " + ", ".join(files)))
    return 0


SHORT = {"causal-lm": "KL", "encoder": "1 − cos", "classifier": "drop (pt)"}


def _also(kind: str, m: dict) -> str:
    if kind == "causal-lm":
        return f"ppl ×{m['perplexity_ratio']:.3f}, top-1 {100 * m['top1_agreement']:.1f}%"
    if kind == "encoder":
        return f"min cos {m['cosine_min']:.4f}"
    return f"acc {100 * m['accuracy']:.2f}% (float {100 * m['accuracy_float']:.2f}%)"


def fmt_tolerance(kind: str, tol: float) -> str:
    return {"causal-lm": f"KL ≤ {tol:g} nats/token", "encoder": f"1−cos ≤ {tol:g}",
            "classifier": f"accuracy drop ≤ {tol:g} pt"}[kind]
