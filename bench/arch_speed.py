"""Decode speed per architecture: does every decoder family squash compresses generate faster than its float
model in transformers?

For each family (LLaMA, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3, GPT-2, OPT) a model of about 100M
parameters is built from a transformers config with seeded random weights (speed does not depend on the values;
nothing is downloaded), compressed with a recipe (int8 by default), put on squash's packed runtime, and timed:

    float       transformers' forward with its KV cache, float32, greedy, batch 1
    squash      the lean decoder over the packed weights where it covers the architecture, else transformers'
                loop on the packed modules (what `squash generate` runs)
    float lean  the same lean decoder on the float model: how much of the gain is the decoder's lower overhead
                (transformers' per-token Python and dispatch) rather than the packed weights

32-token prompt, 32 new tokens, 2 threads, alternated, median of 3. Writes bench/results/arch_speed.md / .json.

    .venv/bin/python bench/arch_speed.py [--recipes int8 int4] [--families llama gpt2 ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_dir import RESULTS  # noqa: E402

VOCAB = 32000
BASE = dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4,
            num_hidden_layers=12, max_position_embeddings=2048)
FAMILIES = {
    "llama": dict(model_type="llama", **BASE, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", **BASE, sliding_window=1024),
    "qwen2": dict(model_type="qwen2", **BASE, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", **BASE, head_dim=64, tie_word_embeddings=True),
    "gemma2": dict(model_type="gemma2", **BASE, head_dim=64, sliding_window=512, query_pre_attn_scalar=64),
    "gemma3_text": dict(model_type="gemma3_text", **BASE, head_dim=64, sliding_window=512, query_pre_attn_scalar=64),
    "phi3": dict(model_type="phi3", **BASE, pad_token_id=0),
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "opt": dict(model_type="opt", hidden_size=768, ffn_dim=3072, num_attention_heads=12, num_hidden_layers=12,
                word_embed_proj_dim=768, max_position_embeddings=2048),
}
PROMPT, NEW, ROUNDS = 32, 32, 3


def build(family: str):
    import squash
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(FAMILIES[family])
    cfg = AutoConfig.for_model(kw.pop("model_type"), vocab_size=VOCAB, **kw)
    torch.manual_seed(0)
    module = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return squash.load(module), module


def main() -> int:
    import squash
    from squash.errors import SquashError
    from squash.eval.report import _runnable, hf_decode_tps
    from squash.runtime.llama import make_decoder

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="+", default=["int8"])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    started = time.perf_counter()
    for family in args.families:
        model, module = build(family)
        params = sum(p.numel() for p in module.parameters())
        prompt = torch.randint(0, VOCAB, (PROMPT,), generator=torch.Generator().manual_seed(1))
        for name in args.recipes:
            small = squash.compress(model, squash.load_recipe(name))
            fast, runtime = _runnable(small)
            try:
                make_decoder(fast, max_len=PROMPT + NEW + 2)
                how = "lean decoder"

                def run():
                    with torch.inference_mode():
                        return make_decoder(fast, max_len=PROMPT + NEW + 2).generate(prompt, NEW)[1].decode_tps
            except SquashError:
                how = "transformers loop on packed modules"

                def run():
                    return hf_decode_tps(fast, prompt, NEW)
            def run_float_lean():
                with torch.inference_mode():
                    return make_decoder(module, max_len=PROMPT + NEW + 2).generate(prompt, NEW)[1].decode_tps

            run(), hf_decode_tps(module, prompt, NEW), run_float_lean()  # warm-up
            rates = {"float": [], "squash": [], "float_lean": []}
            for _ in range(ROUNDS):
                rates["float"].append(hf_decode_tps(module, prompt, NEW))
                rates["squash"].append(run())
                rates["float_lean"].append(run_float_lean())
            f, s = statistics.median(rates["float"]), statistics.median(rates["squash"])
            fl = statistics.median(rates["float_lean"])
            row = {"family": family, "recipe": name, "parameters": params, "float_tps": f, "squash_tps": s,
                   "speedup": s / f, "float_lean_tps": fl, "speedup_vs_float_lean": s / fl, "runtime": how,
                   "packed": runtime}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del small, fast
        del model, module
    from presets_table import cpu_name  # one reader of /proc/cpuinfo for every bench script

    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "threads": 2,
            "torch": torch.__version__, "seconds": round(time.perf_counter() - started),
            "command": "python bench/arch_speed.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "arch_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"Measured {meta['date']}, 2 threads, torch {meta['torch']}, by `{meta['command'].strip()}` "
             f"({meta['seconds']} s). Random-weight models of each family built from transformers configs "
             f"(hidden 768, 12 layers, vocabulary {VOCAB:,}); greedy decoding at batch 1, {PROMPT}-token prompt, "
             f"{NEW} new tokens, median of {ROUNDS} alternated rounds, on {meta['cpu']}.", "",
             "| family | parameters | recipe | float32 transformers tok/s | squash tok/s | speed-up | "
             "float32 on squash's decoder tok/s | packed vs float, same decoder | squash runs on |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['parameters'] / 1e6:.0f} M | {r['recipe']} | {r['float_tps']:.1f} | "
                     f"{r['squash_tps']:.1f} | {r['speedup']:.2f}× | {r['float_lean_tps']:.1f} | "
                     f"{r['speedup_vs_float_lean']:.2f}× | {r['runtime']} |")
    (RESULTS / "arch_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
