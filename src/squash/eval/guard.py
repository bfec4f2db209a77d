"""The guard every run passes: a compressed model is compared with its float model before it is written, and a
loss no one would accept refuses the run, naming the layers that went wrong.

Per layer: each compressed layer runs on the very input its float original saw (one held-out batch, captured
with forward hooks on the float model), and its output error is measured as

    output SQNR = 10·log10(‖y‖² / ‖y − ŷ‖²)  dB,

beside the weight's own SQNR 10·log10(‖W‖² / ‖W − Ŵ‖²). The first catches a stand-in that computes something
other than the float layer (a lost embedding scale, a transposed weight) as well as damaged scales.

End to end, the report's quality against LIMITS: for weight-only 8-bit models (every code 8 bits, nothing
pruned) KL ≤ 0.05 nats/token and perplexity ratio ≤ 1.5, cosine ≥ 0.99, accuracy drop ≤ 2 points; for any
recipe KL ≤ 2, perplexity ratio ≤ 5, cosine ≥ 0.8, accuracy drop ≤ 20 points (past these a model produces
gibberish, the cliff `squash curve` shows). A layer whose output error exceeds its output (SQNR < 0 dB) fails
too, unless the recipe fine-tunes (distillation moves layers away from their float outputs on purpose).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from squash.models import Model
from squash.recipe import float_matrix, sqnr_db


@dataclass(frozen=True)
class Limits:
    kl: float
    perplexity_ratio: float
    cosine: float
    accuracy_drop: float


EIGHT_BIT = Limits(kl=0.05, perplexity_ratio=1.5, cosine=0.99, accuracy_drop=0.02)
ANY = Limits(kl=2.0, perplexity_ratio=5.0, cosine=0.8, accuracy_drop=0.20)
LAYER_FLOOR_DB = 0.0


def limits_for(model: Model) -> tuple[str, Limits]:
    """EIGHT_BIT where every compressed tensor is weight-only 8-bit codes with no mask, else ANY."""
    eight = all(ct.codes is not None and ct.bits >= 8 and ct.mask is None and not ct.extra.get("activation_bits")
                for ct in model.tensors.values())
    return ("8-bit", EIGHT_BIT) if eight else ("any recipe", ANY)


@torch.inference_mode()
def layer_table(model: Model, reference: Model, inputs: dict | None) -> dict[str, dict]:
    """{layer: {"weight_sqnr_db", "output_sqnr_db"}} for every compressed layer (tied layers under each name);
    output SQNR only where `inputs` (one batch for the float model) reach the layer."""
    names = [n.removesuffix(".weight") for n in list(model.tensors) + list(model.tied)]
    table = {}
    for name in names:
        stored = model.tied.get(f"{name}.weight", f"{name}.weight")
        ct = model.tensors.get(stored)
        w_db = None
        if ct is not None:
            try:
                w = float_matrix(reference.module, stored, ct)
                if tuple(w.shape) == tuple(ct.shape):  # structured pruning changes shapes: no weight-to-weight SQNR
                    w_db = sqnr_db(w, ct.dequantize())
            except AttributeError:
                pass
        table[name] = {"weight_sqnr_db": w_db, "output_sqnr_db": None}
    if inputs is None:
        return table
    seen: dict[str, tuple] = {}
    hooks = []
    for name in names:
        try:
            float_layer = reference.module.get_submodule(name)
        except AttributeError:
            continue

        def grab(mod, args, kwargs, out, name=name):
            if name not in seen:  # a layer called more than once (shared) is judged on its first call
                seen[name] = (args, kwargs, out)

        hooks.append(float_layer.register_forward_hook(grab, with_kwargs=True))
    try:
        reference.module(**inputs)
    finally:
        for h in hooks:
            h.remove()
    for name, (args, kwargs, out) in seen.items():
        layer = model.module.get_submodule(name)
        if not isinstance(out, torch.Tensor):
            continue
        try:
            got = layer(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a stand-in that cannot even run on its float input
            table[name]["output_sqnr_db"] = -math.inf
            continue
        table[name]["output_sqnr_db"] = _output_sqnr(out, got)
    return table


def _output_sqnr(y: torch.Tensor, got) -> float:
    if not isinstance(got, torch.Tensor) or got.shape != y.shape or not torch.isfinite(got).all():
        return -math.inf
    noise = (y.float() - got.float()).pow(2).sum().item()
    signal = y.float().pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


def problems(report: dict, model: Model) -> list[str]:
    """What in `report` (squash.eval.report.evaluate, with its "layers" table) no one would accept; empty when
    the model passes."""
    which, lim = limits_for(model)
    q = report.get("quality", {})
    found = []
    if "kl" in q:
        ratio = q["perplexity"] / q["perplexity_float"] if q["perplexity_float"] else math.inf
        if not math.isfinite(q["kl"]) or q["kl"] > lim.kl:
            found.append(f"KL {q['kl']:.4g} nats/token (limit {lim.kl} for {which})")
        if not math.isfinite(ratio) or ratio > lim.perplexity_ratio:
            found.append(f"perplexity {q['perplexity_float']:.4g} → {q['perplexity']:.4g} "
                         f"(×{ratio:.3g}; limit ×{lim.perplexity_ratio} for {which})")
    if "cosine" in q and not (q["cosine"] >= lim.cosine):
        found.append(f"cosine to float {q['cosine']:.4f} (limit {lim.cosine} for {which})")
    if "accuracy" in q and not (q["accuracy_float"] - q["accuracy"] <= lim.accuracy_drop):
        found.append(f"accuracy {100 * q['accuracy_float']:.1f}% → {100 * q['accuracy']:.1f}% "
                     f"(limit −{100 * lim.accuracy_drop:.0f} points for {which})")
    finetuned = any(s.get("step") == "finetune" for s in (model.recipe or {}).get("steps", []))
    broken = [n for n, r in report.get("layers", {}).items()
              if r["output_sqnr_db"] is not None and r["output_sqnr_db"] < LAYER_FLOOR_DB]
    if broken and not finetuned:
        found.append(f"{len(broken)} layer(s) whose output error exceeds the output itself (SQNR < 0 dB)")
    return found


def worst_layers(report: dict, n: int = 3) -> list[tuple[str, float]]:
    """The n layers with the lowest output SQNR (weight SQNR where no output was measured)."""
    rows = []
    for name, r in report.get("layers", {}).items():
        db = r["output_sqnr_db"] if r["output_sqnr_db"] is not None else r["weight_sqnr_db"]
        if db is not None:
            rows.append((name, db))
    return sorted(rows, key=lambda x: x[1])[:n]


def refusal(report: dict, model: Model) -> str | None:
    """One line saying why the run is refused and which layers are worst, or None when it passes."""
    found = problems(report, model)
    if not found:
        return None
    worst = ", ".join(f"{name} ({db:.1f} dB)" for name, db in worst_layers(report))
    return (f"the compressed model is broken: {'; '.join(found)}. Worst layers by output SQNR: {worst or 'none measured'}")


def layer_inputs(model: Model, tokenizer) -> dict | None:
    """One held-out batch for the layer check (the report's latency input), or None for a plain module."""
    from squash.eval.report import example_input

    try:
        return example_input(model, tokenizer)
    except ValueError:
        return None
