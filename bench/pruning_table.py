"""Steps 4-6 measured: pruning, codebooks, entropy coding and fine-tuning, each model before and after distillation.

    .venv/bin/python bench/pruning_table.py                     # every job below (about 40 minutes on 2 cores)
    .venv/bin/python bench/pruning_table.py --only digits-cnn   # one model

Each job compresses with a recipe's tensor steps, evaluates ("before fine-tuning"), then distils the float model
into it with the recipe's finetune step and evaluates again ("after"). Sizes count every stored byte (codes,
masks, scales, codebooks, float leftovers); entropy-coded streams are compared with their entropy bound.
Writes bench/results/pruning.json and bench/results/pruning.md (the README's table).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import squash  # noqa: E402
from presets_table import RESULTS, cpu_name, quality_cell  # noqa: E402
from squash.entropy import coded_streams  # noqa: E402
from squash.eval.quality import EvalSize  # noqa: E402
from squash.recipe import Recipe  # noqa: E402
from squash.steps import Finetune, Prune, Quantize, finetune  # noqa: E402

LM_FINETUNE = Finetune(steps=60, batch=2, seq_len=256, lr=1e-5, lr_scale=1e-4)


def jobs() -> list[tuple[str, Recipe]]:
    sparse50 = Recipe([Prune(sparsity=0.5, score="sparsegpt"), Quantize(bits=8, rounding="gptq"), LM_FINETUNE],
                      name="sparse50-int8", min_weights=4096)
    two_four = squash.load_recipe("sparse-2of4-int8")
    two_four = replace(two_four, steps=(*two_four.steps, LM_FINETUNE))
    return [
        ("digits-cnn", squash.load_recipe("deep-compression")),
        ("minilm-l6", squash.load_recipe("int4-distilled")),
        ("smollm2-135m", sparse50),
        ("smollm2-135m", two_four),
    ]


def entropy_cell(model) -> str:
    coded = bound = 0.0
    for ct in model.tensors.values():
        if ct.entropy:
            for s in coded_streams(ct).values():
                coded += s.nbytes()
                bound += s.bound_bytes()
    return "—" if not coded else f"{coded / 1e3:.1f} kB vs bound {bound / 1e3:.1f} kB ({100 * (coded / bound - 1):+.2f}%)"


def run(name: str, recipe: Recipe, size: EvalSize, tmp: Path) -> dict:
    model = squash.load(name)
    tune = recipe.model_step("finetune")
    tensor_only = replace(recipe, steps=tuple(s for s in recipe.steps if s.name != "finetune"))
    t = time.perf_counter()
    small = squash.compress(model, tensor_only)
    seconds = time.perf_counter() - t
    before = squash.evaluate(small, model, size, repeats=1)
    print(f"{name} {recipe.name} before: {quality_cell(before)}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    last = [0.0]

    def progress(done, total, what):
        if time.perf_counter() - last[0] > 30 or done == total:
            last[0] = time.perf_counter()
            print(f"  fine-tune {done}/{total} {what}", file=sys.stderr, flush=True)

    ft = finetune(small, model, tune, progress)
    ft_seconds = time.perf_counter() - t
    small.recipe = recipe.to_dict()
    path = squash.save(small, tmp / f"{name}-{recipe.name}.squash")
    reloaded = squash.load_squash(path)
    after = squash.evaluate(reloaded, model, size, repeats=1)  # measured on the file as written and read back
    print(f"{name} {recipe.name} after: {quality_cell(after)}", file=sys.stderr, flush=True)
    return {"model": name, "recipe": recipe.name, "recipe_steps": recipe.to_dict()["steps"], "before": before,
            "after": after, "finetune": ft, "compress_seconds": seconds, "finetune_seconds": ft_seconds,
            "file_bytes": path.stat().st_size, "entropy": entropy_cell(reloaded)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", help="model names to run (default: all)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe in jobs():
            if not args.only or name in args.only:
                rows.append(run(name, recipe, EvalSize(), Path(tmp)))
    RESULTS.mkdir(exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "command": "python bench/pruning_table.py " + " ".join(sys.argv[1:]), "torch": torch.__version__}
    for r in rows:
        r["meta"] = meta
    out = RESULTS / "pruning.json"
    if args.only and out.is_file():  # a partial run replaces its own rows and keeps the others
        fresh = {(r["model"], r["recipe"]) for r in rows}
        order = [(m, r.name) for m, r in jobs()]
        kept = [r for r in json.loads(out.read_text())["runs"] if (r["model"], r["recipe"]) not in fresh]
        rows = sorted(kept + rows, key=lambda r: order.index((r["model"], r["recipe"]))
                      if (r["model"], r["recipe"]) in order else len(order))
    out.write_text(json.dumps({"runs": rows}, indent=2))
    runs = sorted({(r["meta"]["date"], r["meta"]["command"].strip()) for r in rows})
    lines = [
        f"Measured on {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, by "
        + "; ".join(f"`{cmd}` ({date})" for date, cmd in runs) + ".",
        "",
        "| model | recipe | smaller than float32 | bits/weight | quality before fine-tuning | after fine-tuning | "
        "held-out distillation loss | entropy-coded streams | compress + fine-tune |",
        "|---|---|---:|---:|---|---|---|---|---:|",
    ]
    for r in rows:
        a, ft = r["after"], r["finetune"]
        lines.append(
            f"| {r['model']} | {r['recipe']} | {1 / a['size_ratio']:.1f}× | {a['bits_per_weight']:.3f} | "
            f"{quality_cell(r['before'])} | {quality_cell(a)} | {ft['held_out_loss_before']:.4f} → "
            f"{ft['held_out_loss_after']:.4f} | {r['entropy']} | {r['compress_seconds']:.0f} + {r['finetune_seconds']:.0f} s |")
    md = RESULTS / "pruning.md"
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
