"""Mixed precision against uniform precision on smollm2-135m, measured in one run.

    .venv/bin/python bench/mixed_precision.py                 # about 25 minutes on 2 cores
    .venv/bin/python bench/mixed_precision.py --budget 3.5

1. Every layer group (each of the 30 decoder blocks; the token embedding tied to the output head) is compressed
   alone at each of the CHOICES (round to nearest, float16 scale, integer zero point; 2 to 8 bits, groups of 32
   to 128), the rest of the model float, and its damage measured as KL divergence on 2 windows of 512
   evaluation tokens.
2. A knapsack picks one setting per group: least summed KL within the size budget (bits per weight, every stored
   byte counted). The result is written as a TOML recipe (bench/results/mixed-smollm2-135m.toml).
3. The mixed recipe and every uniform setting of the same quantizer (bits 2-8 × groups of 16-256) near the budget
   are measured on the full evaluation text (16 windows of 512 tokens); the table compares the mixed recipe with
   the best uniform recipe at the same or a larger size.
Writes bench/results/mixed.json and bench/results/mixed.md. Points are cached (squash curve's cache).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import squash  # noqa: E402
from presets_table import RESULTS, cpu_name  # noqa: E402
from squash.eval.curve import Quality, cached_point, plan_allocation, recipe_at, recipe_to_toml  # noqa: E402
from squash.eval.quality import EvalSize  # noqa: E402
from squash.recipe import Recipe  # noqa: E402
from squash.steps import Quantize  # noqa: E402

BASE = Recipe([Quantize(bits=4, block=64, symmetric=False, scale_dtype="float16", zero_dtype="int")],
              name="rtn", min_weights=4096)
# bits and group size per layer group: every uniform recipe below the budget is one of the knapsack's options
CHOICES = ["quantize.bits=2", "quantize.bits=3;quantize.block=128", "quantize.bits=3",
           "quantize.bits=3;quantize.block=32", "quantize.bits=4;quantize.block=128", "quantize.bits=4",
           "quantize.bits=8"]
UNIFORM = [(bits, block) for bits in (3, 4) for block in (16, 32, 64, 128, 256)]
SENSITIVITY_SIZE = EvalSize(lm_window=512, lm_windows=2)


def log(done, total, what):
    print(f"  [{done}/{total}] {what}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--budget", type=float, default=3.5, help="bits per weight, everything counted")
    args = ap.parse_args()
    model = squash.load(args.model)
    plan = plan_allocation(model, model, CHOICES, budget_bpw=args.budget, base=BASE, size=SENSITIVITY_SIZE,
                           progress=log)
    mixed = plan["recipe"]
    RESULTS.mkdir(exist_ok=True)
    toml_path = RESULTS / f"mixed-{args.model}.toml"
    toml_path.write_text(recipe_to_toml(mixed, f"mixed precision at {args.budget} bits per weight, "
                                                "chosen by bench/mixed_precision.py"))
    full = EvalSize()
    quality = Quality(model, full)
    rows = []
    for label, recipe in [("mixed", mixed)] + [
            (f"uniform {b}-bit, groups of {g}", recipe_at(BASE, {("quantize", "bits"): b, ("quantize", "block"): g}))
            for b, g in UNIFORM]:
        p = cached_point(model, model, recipe, full, quality=quality)
        rows.append({"recipe": label, "bpw": p["bpw"], "kl": p["loss"], "kl_stderr": p.get("stderr"),
                     "perplexity_ratio": p.get("metrics", {}).get("perplexity_ratio")})
        print(f"{label}: {p['bpw']:.3f} bpw, KL {p['loss']:.4f}", file=sys.stderr, flush=True)
    m = rows[0]
    rivals = [r for r in rows[1:] if m["bpw"] <= r["bpw"]]
    best = min(rivals, key=lambda r: r["kl"]) if rivals else None
    close = [r for r in rivals if r["bpw"] <= m["bpw"] + 0.25]
    best_close = min(close, key=lambda r: r["kl"]) if close else None
    meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "command": "python bench/mixed_precision.py " + " ".join(sys.argv[1:]), "torch": torch.__version__}
    (RESULTS / "mixed.json").write_text(json.dumps({"meta": meta, "plan": {k: v for k, v in plan.items() if k != "recipe"},
                                                    "rows": rows}, indent=2, default=str))
    picks = {}
    for g in plan["groups"]:
        picks[g["choice"]] = picks.get(g["choice"], 0) + 1
    lines = [
        f"Measured {meta['date']} on {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, by "
        f"`{meta['command'].strip()}`. Budget {args.budget} bits per weight; the knapsack chose "
        + ", ".join(f"{n} group(s) at {c}" for c, n in sorted(picks.items())) + f" (recipe: `{toml_path.name}`).",
        "",
        "| recipe | bits/weight (all stored) | KL to float (nats/token) | perplexity ratio |",
        "|---|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["bpw"]):
        ratio = f"{r['perplexity_ratio']:.3f}" if r["perplexity_ratio"] else "—"
        name = f"**{r['recipe']}**" if r is m else r["recipe"]
        lines.append(f"| {name} | {r['bpw']:.3f} | {r['kl']:.4f} ± {r['kl_stderr'] or 0:.4f} | {ratio} |")
    if best_close is not None:
        verdict = "lower" if m["kl"] < best_close["kl"] else "NOT lower"
        lines += ["", f"Mixed at {m['bpw']:.3f} bits per weight: KL {m['kl']:.4f}, {verdict} than the best uniform "
                  f"recipe of the same or a larger size within 0.25 bits per weight ({best_close['recipe']}, "
                  f"{best_close['bpw']:.3f} bits per weight, KL {best_close['kl']:.4f})."]
    if best is not None and best is not best_close:
        lines.append(f"Larger uniform recipes do better: {best['recipe']} ({best['bpw']:.3f} bits per weight) "
                     f"reaches KL {best['kl']:.4f}.")
    (RESULTS / "mixed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
