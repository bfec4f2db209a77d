"""Compress each bundled model with each given preset, evaluate against the float model, write a table.

    .venv/bin/python bench/presets_table.py                       # int8 on the three bundled models
    .venv/bin/python bench/presets_table.py --recipes int8 int4   # more presets

Writes bench/results/presets.json (raw reports) and bench/results/presets.md (the README's table), with the
date, the machine and the command beside them. Every number is measured in this run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import squash
from squash.eval.quality import EvalSize

from results_dir import RESULTS  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def quality_cell(r: dict) -> str:
    q = r["quality"]
    if "perplexity" in q:
        return (f"perplexity {q['perplexity']:.3f} vs {q['perplexity_float']:.3f} "
                f"({100 * (q['perplexity'] / q['perplexity_float'] - 1):+.2f}%), KL {q['kl']:.4f}")
    if "cosine" in q:
        return f"cosine to float {q['cosine']:.4f} (min {q['cosine_min']:.4f})"
    return f"accuracy {100 * q['accuracy']:.2f}% vs {100 * q['accuracy_float']:.2f}% ({100 * (q['accuracy'] - q['accuracy_float']):+.2f} pt)"


PROMPT = "What is a Python dictionary? Answer in one sentence."


@torch.inference_mode()
def continuation(model, tokenizer, max_new_tokens: int = 40) -> str:
    """Greedy answer to a fixed chat prompt: does the compressed model still talk sense?"""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, repetition_penalty=1.1, pad_token_id=tokenizer.eos_token_id)
    return " ".join(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "minilm-l6", "digits-cnn"])
    ap.add_argument("--recipes", nargs="+", default=["int8"])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = squash.load(name)
            for recipe_name in args.recipes:
                recipe = squash.load_recipe(recipe_name)
                t = time.perf_counter()
                small = squash.compress(model, recipe)
                seconds = time.perf_counter() - t
                path = squash.save(small, Path(tmp) / f"{name}-{recipe_name}.squash")
                report = squash.evaluate(small, model, EvalSize())
                report.update(file_bytes=path.stat().st_size, compress_seconds=seconds)
                if model.kind == "causal-lm":
                    report["sample"] = continuation(small, model.tokenizer)
                rows.append(report)
                print(f"{name} {recipe_name}: {quality_cell(report)}", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "command": "python bench/presets_table.py " + " ".join(sys.argv[1:]), "torch": torch.__version__}
    (RESULTS / "presets.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2))
    lines = [
        f"Measured {meta['date']} on {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, by "
        f"`{meta['command'].strip()}`.",
        "",
        "| model | recipe | bits/weight (all stored) | file | of float32 | quality against float | forward latency float → compressed | compress time |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lat = r["latency"]
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['bits_per_weight']:.3f} | {r['file_bytes'] / 1e6:.2f} MB | "
            f"{100 * r['file_bytes'] / r['float_weight_bytes']:.1f}% | {quality_cell(r)} | "
            f"{lat['float']['median_ms']:.1f} → {lat['compressed']['median_ms']:.1f} ms | {r['compress_seconds']:.1f} s |"
        )
    samples = [r for r in rows if "sample" in r]
    if samples:
        lines += ["", f"Greedy answers to “{PROMPT}” (40 new tokens):", ""]
        lines += [f"- **{r['model']} {r['recipe']}**: {r['sample']}" for r in samples]
    (RESULTS / "presets.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
