"""Speed and resident memory, side by side in one run: squash's packed runtime against float32 in transformers,
llama.cpp (llama-cpp-python) and the Python peers (torchao, hqq, optimum-quanto, bitsandbytes) on the same
model, the same inputs, 2 threads.

Every configuration runs in its own subprocess, so its resident memory (RSS after loading minus RSS before)
and its timings are not disturbed by the others; configurations alternate across repeats so that a slow
spell of the machine hits all of them alike. Timings are medians over repeats with min–max.

    resident memory: RSS after running minus RSS before loading (libraries already imported): the weights as the
                     runtime holds them, plus its KV cache and buffers; "loaded" is the same right after loading
    language models: prefill tokens/s (a 128-token prompt from an empty cache) and decode tokens/s
                     (64 greedy tokens at batch 1 with a KV cache); bytes each decoded token reads (every
                     weight once) and the GB/s that implies
    encoders:        sentences/s encoding a batch of 32 sentences of up to 128 tokens
    classifier:      images/s for a batch of 256 and latency of one image

    .venv/bin/python bench/speed.py --model smollm2-135m [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
from results_dir import RESULTS  # noqa: E402
THREADS = 2


# ---------------------------------------------------------------- inside a worker process


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _prompt_ids(n: int) -> list[int]:
    import squash
    from squash.data import evaluation_text

    tok = squash.load("smollm2-135m").tokenizer
    return tok(evaluation_text()[:20000])["input_ids"][:n]


def worker(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    kind = cfg["kind"]
    prompt = _prompt_ids(cfg["prompt"]) if cfg["model"] == "smollm2-135m" else None
    _warm_imports(cfg)
    _trim()
    rss0 = _rss_mb()  # libraries loaded, no weights yet: the difference after loading is the model
    t = time.perf_counter()
    runner, weight_bytes, how = _load(cfg)
    load_s = time.perf_counter() - t
    resident = _LOADED["rss"] - rss0
    out = {"load_s": load_s, "loaded_mb": resident, "weight_bytes": weight_bytes, "runtime": how}
    out.update(runner(prompt))
    _trim()
    # what the model holds while it runs: its weights (a memory-mapped file counts once its pages are read),
    # the KV cache and working buffers of the prompt just run
    out["resident_mb"] = _rss_mb() - rss0
    out["peak_rss_mb"] = _peak_mb()
    return out


def _warm_imports(cfg: dict) -> None:
    """Import (and initialise) what loading will use, so that library code is not counted as the model."""
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModel, AutoModelForCausalLM  # noqa: F401

    import squash.io.squash_file  # noqa: F401
    from squash.runtime import kernels

    if cfg["kind"] == "squash":
        kernels.extension()
    if cfg["kind"] == "llama.cpp":
        import llama_cpp  # noqa: F401
    if cfg["kind"] == "peer":  # the peer's library is not its model
        sys.path.insert(0, str(HERE))
        import peers

        peers.METHODS[cfg["method"]].load()
    torch.nn.functional.linear(torch.randn(4, 64), torch.randn(64, 64))  # MKL's and oneDNN's first-call buffers
    if cfg["model"] != "smollm2-135m":  # smollm2's worker has loaded it already, for the prompt's tokens
        import squash

        # Building a transformers model the first time imports what its integrations need (accelerate, hqq,
        # torchao … about 180 MB here for minilm): libraries, not the model. Load and drop the float model once so
        # that every row starts from the same warm process.
        squash.load(cfg["model"])  # dropped at once


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_LOADED = {"rss": 0.0}


def _mark_loaded() -> None:
    """RSS once the weights are in memory, before tokenizers, caches and inputs are made."""
    _trim()
    _LOADED["rss"] = _rss_mb()


def _load(cfg: dict):
    import torch

    import squash
    from squash.models import tokenizer_for

    kind, model_name = cfg["kind"], cfg["model"]
    if kind == "llama.cpp":
        return _load_llama_cpp(cfg)
    if kind == "peer":  # a peer's quantized copy of the float model, run in transformers
        return _load_peer(cfg)
    if kind == "transformers":
        model = squash.load(model_name)
        weight_bytes = _param_bytes(model.module)
        how = "float32"
    else:  # squash: a .squash file on the packed runtime
        from squash.runtime.packed import load_packed

        model = load_packed(cfg["file"])
        weight_bytes = _module_bytes(model.module)
        how = _summarise(model.runtime)
    _mark_loaded()
    module = model.module
    if model.kind == "causal-lm":
        if kind == "transformers":
            return _hf_lm_runner(module, cfg), weight_bytes, how
        from squash.runtime.llama import Decoder

        return _decoder_runner(Decoder(module, max_len=cfg["prompt"] + cfg["decode"] + 8), cfg), weight_bytes, how
    if model.kind == "encoder":
        return _encoder_runner(module, tokenizer_for(model), cfg), weight_bytes, how
    return _classifier_runner(module, cfg), weight_bytes, how


def _load_peer(cfg: dict):
    import tempfile

    import squash

    sys.path.insert(0, str(HERE))
    import peers

    method = peers.METHODS[cfg["method"]]
    method.load()
    model = squash.load(cfg["model"])
    with tempfile.TemporaryDirectory() as tmp:
        res = method.run(model, peers.Variant(cfg["bits"], cfg["variant"]), peers.Context(quick=True, workdir=Path(tmp)))
    stored, how = res.stored_bytes, res.config
    module, kind, tok = res.module, model.kind, model.tokenizer
    del model, res  # the float model the peer copied from: not part of what the peer holds
    _mark_loaded()
    if kind == "causal-lm":
        return _hf_lm_runner(module, cfg), stored, how
    if kind == "encoder":
        return _encoder_runner(module, tok, cfg), stored, how
    return _classifier_runner(module, cfg), stored, how


def _summarise(runtime: dict) -> str:
    from collections import Counter

    return ", ".join(f"{n}× {k}" for k, n in Counter(v.split(":")[0] for v in runtime.values()).most_common())


def _param_bytes(module) -> int:
    seen, n = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


def _module_bytes(module) -> int:
    """Bytes of everything the model holds: packed weights (once when tied), float parameters and buffers."""
    from squash.runtime.packed import PackedConv, PackedEmbedding, PackedLinear, PackedW8A8Linear

    seen, n = set(), 0
    for m in module.modules():
        tensors = []
        if isinstance(m, (PackedLinear, PackedEmbedding, PackedConv)):
            tensors = m.pw.tensors() + ([m.bias] if getattr(m, "bias", None) is not None else [])
        elif isinstance(m, PackedW8A8Linear):
            tensors = [m.weight, m.scale] + ([m.bias] if m.bias is not None else [])
        for t in tensors + list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                n += t.numel() * t.element_size()
    return n


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _hf_lm_runner(module, cfg):
    import torch
    from transformers import DynamicCache

    def run(prompt):
        ids = torch.tensor([prompt])

        def prefill():
            with torch.inference_mode():
                return module(ids, past_key_values=DynamicCache(config=module.config), use_cache=True)

        def decode():
            with torch.inference_mode():
                out = module(ids, past_key_values=DynamicCache(config=module.config), use_cache=True)
                cache, nxt = out.past_key_values, out.logits[0, -1].argmax()
                per = []
                for _ in range(cfg["decode"]):
                    t = time.perf_counter()
                    out = module(nxt.view(1, 1), past_key_values=cache, use_cache=True)
                    cache, nxt = out.past_key_values, out.logits[0, -1].argmax()
                    per.append(time.perf_counter() - t)
                return per

        return _lm_measure(prefill, decode, len(prompt), cfg)

    return run


def _decoder_runner(dec, cfg):
    import torch

    def run(prompt):
        ids = torch.tensor(prompt)

        def prefill():
            return dec.forward(ids, 0)

        def decode():
            logits = dec.forward(ids, 0)
            per, pos = [], len(prompt)
            nxt = int(logits[-1].argmax())
            for _ in range(cfg["decode"]):
                t = time.perf_counter()
                logits = dec.forward(torch.tensor([nxt]), pos)
                nxt = int(logits[-1].argmax())
                per.append(time.perf_counter() - t)
                pos += 1
            return per

        return _lm_measure(prefill, decode, len(prompt), cfg)

    return run


def _lm_measure(prefill, decode, n_prompt: int, cfg) -> dict:
    prefill()  # warm-up (first calls allocate)
    decode_warm = decode()
    del decode_warm
    prefill_times = _timed(prefill, cfg["repeats"])
    decode_rates = []
    for _ in range(cfg["repeats"]):
        per = decode()
        decode_rates.append(len(per) / sum(per))
    return {"prefill_tps": [n_prompt / t for t in prefill_times], "decode_tps": decode_rates}


def _load_llama_cpp(cfg):
    import numpy as np

    sys.path.insert(0, str(HERE))
    from export_check import load_llama

    n_ctx = cfg["prompt"] + cfg["decode"] + 8
    llm = load_llama(Path(cfg["file"]), n_ctx)
    _mark_loaded()
    weight_bytes = _gguf_tensor_bytes(cfg["file"])

    def run(prompt):
        def prefill():
            llm.reset()
            llm.eval(prompt)

        def decode():
            llm.reset()
            llm.eval(prompt)
            per = []
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            for _ in range(cfg["decode"]):
                t = time.perf_counter()
                llm.eval([nxt])
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                per.append(time.perf_counter() - t)
            return per

        return _lm_measure(prefill, decode, len(prompt), cfg)

    return run, weight_bytes, cfg["label"].split()[-1]


def _gguf_tensor_bytes(path) -> int:
    from gguf import GGUFReader

    return int(sum(t.n_bytes for t in GGUFReader(path).tensors))


def _encoder_runner(module, tok, cfg):
    import torch

    from squash.data import evaluation_text, paragraphs

    texts = paragraphs(evaluation_text())[: cfg["batch"]]
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")

    def run(_):
        def forward():
            with torch.inference_mode():
                module(**enc)

        forward()
        times = _timed(forward, cfg["repeats"])
        return {"items_per_s": [len(texts) / t for t in times], "batch": len(texts),
                "tokens": int(enc["attention_mask"].sum())}

    return run


def _classifier_runner(module, cfg):
    import torch

    def run(_):
        x = torch.randn(cfg["batch"], 1, 8, 8)
        one = x[:1]

        def batch():
            with torch.inference_mode():
                module(x)

        def single():
            with torch.inference_mode():
                module(one)

        batch(), single()
        # a batch takes milliseconds: 10× the repeats, or one slow moment of the machine decides the median
        return {"items_per_s": [cfg["batch"] / t for t in _timed(batch, cfg["repeats"] * 10)],
                "latency_ms": [1e3 * t for t in _timed(single, cfg["repeats"] * 20)], "batch": cfg["batch"]}

    return run


# ---------------------------------------------------------------- the driver


def run_config(cfg: dict) -> dict:
    """One configuration in a fresh interpreter; its JSON result (or the error it died with)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True,
                          env=env, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def measure(configs: list[dict], rounds: int, progress=None) -> list[dict]:
    """Each configuration `rounds` times, interleaved (a b c a b c …); lists of samples are concatenated."""
    merged: list[dict] = [dict(c) for c in configs]
    for r in range(rounds):
        for i, cfg in enumerate(configs):
            if progress:
                progress(r * len(configs) + i, rounds * len(configs), cfg["label"])
            res = run_config(cfg)
            m = merged[i]
            if "error" in res:
                m["error"] = res["error"]
                continue
            for k, v in res.items():
                if isinstance(v, list):
                    m.setdefault(k, []).extend(v)
                elif k in ("resident_mb", "loaded_mb", "load_s", "peak_rss_mb"):
                    m.setdefault(k + "_all", []).append(v)
                    m[k] = statistics.median(m[k + "_all"])
                else:
                    m[k] = v
    return merged


def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


# ---------------------------------------------------------------- what is measured


def bench_cache() -> Path:
    from squash.models import cache_dir

    d = cache_dir() / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def squash_file(model_name: str, recipe: str) -> Path:
    """The model compressed with `recipe`, cached (compressing smollm2 with GPTQ takes minutes)."""
    import squash

    path = bench_cache() / f"{model_name}-{recipe}.squash"
    if not path.exists():
        small = squash.compress(squash.load(model_name), squash.load_recipe(recipe))
        squash.save(small, path)
    return path


LLAMA_TYPES = {"F32": 0, "Q4_0": 2, "Q8_0": 7, "Q2_K": 10, "Q3_K_M": 12, "Q4_K_M": 15, "Q6_K": 18}


def llama_cpp_file(qtype: str) -> Path:
    """smollm2 as llama.cpp's own quantizer makes it from the float32 GGUF (squash's export of the float model)."""
    import ctypes

    f32 = bench_cache() / "smollm2-135m-F32.gguf"
    if not f32.exists():
        import squash
        from squash.io.gguf_export import export_gguf

        export_gguf(squash.load("smollm2-135m"), f32, target="f32")
    if qtype == "F32":
        return f32
    out = bench_cache() / f"smollm2-135m-{qtype}.gguf"
    if not out.exists():
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_TYPES[qtype]
        params.nthread = THREADS
        tmp = out.with_suffix(".tmp")
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize to {qtype} returned {rc}")
        os.replace(tmp, out)
    return out


def configs_for(model_name: str, quick: bool) -> list[dict]:
    """The configurations compared for one model (files are prepared here, outside the timed workers)."""
    # an encoder batch takes under a second: 10 timed repeats in each process (5 in quick mode) steady the median
    repeats = 3 if model_name != "minilm-l6" else (5 if quick else 10)
    base = {"model": model_name, "repeats": repeats, "prompt": 128, "decode": 32 if quick else 64,
            "batch": 32 if model_name == "minilm-l6" else 256}
    where = "transformers" if model_name != "digits-cnn" else "PyTorch"
    rows = [{"label": f"float32 ({where})", "kind": "transformers", "bits": 32}]
    if model_name == "smollm2-135m":
        int4 = "rtn4" if quick else "int4"
        rows += [{"label": "squash int8", "kind": "squash", "recipe": "int8", "bits": 8},
                 {"label": f"squash {int4}", "kind": "squash", "recipe": int4, "bits": 4}]
        for q, bits in ((("F32", 32),) if not quick else ()) + (("Q8_0", 8), ("Q4_0", 4)):  # quick: no F32
            rows.append({"label": f"llama.cpp {q}", "kind": "llama.cpp", "qtype": q, "bits": bits})
    elif model_name == "minilm-l6":
        rows += [{"label": "squash w8a8", "kind": "squash", "recipe": "w8a8", "bits": 8},
                 {"label": "squash int8", "kind": "squash", "recipe": "int8", "bits": 8}]
        if not quick:  # quick: the 8-bit rows only, to keep its 15 minutes
            rows.append({"label": "squash rtn4", "kind": "squash", "recipe": "rtn4", "bits": 4})
    else:
        rows += [{"label": "squash int8", "kind": "squash", "recipe": "int8", "bits": 8},
                 {"label": "squash w8a8", "kind": "squash", "recipe": "w8a8", "bits": 8}]
    # the peers, each a quantized copy of the float model run in PyTorch (transformers for the language model
    # and the encoder); quick mode keeps one 8-bit and one 4-bit peer
    peer_rows = [("torchao", 8, "int8wo"), ("hqq", 4, "hqq4")]
    if not quick:
        peer_rows += [("quanto", 8, "qint8"), ("bnb", 8, "int8"), ("quanto", 4, "qint4"), ("bnb", 4, "nf4")]
    for method, bits, variant in peer_rows:
        rows.append({"label": f"{method} {variant} ({where})", "kind": "peer", "method": method,
                     "variant": variant, "bits": bits})
    out = []
    for r in rows:
        cfg = {**base, **r}
        try:
            if r["kind"] == "squash":
                cfg["file"] = str(squash_file(model_name, r["recipe"]))
            elif r["kind"] == "llama.cpp":
                cfg["file"] = str(llama_cpp_file(r["qtype"]))
        except Exception as e:  # a peer that does not run here is reported, not dropped
            cfg["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        out.append(cfg)
    return out


def run_speed(model_name: str, quick: bool, out_dir: Path = RESULTS, progress=None) -> list[dict]:
    configs = configs_for(model_name, quick)
    runnable = [c for c in configs if "error" not in c]
    # quick: one process per configuration (3 timed repeats inside it); full: 3 processes each, interleaved
    measured = {c["label"]: c for c in measure(runnable, rounds=1 if quick else 3, progress=progress)}
    rows = [measured.get(c["label"], c) for c in configs]
    for r in rows:
        for key in ("prefill_tps", "decode_tps", "items_per_s", "latency_ms"):
            if isinstance(r.get(key), list) and r[key]:
                r[key] = summary(r[key])
    base = rows[0]
    for r in rows:
        for key in ("prefill_tps", "decode_tps", "items_per_s"):
            if isinstance(r.get(key), dict) and isinstance(base.get(key), dict):
                r[key + "_x"] = r[key]["median"] / base[key]["median"]
        if r.get("resident_mb") and base.get("resident_mb"):
            r["resident_frac"] = r["resident_mb"] / base["resident_mb"]
        if isinstance(r.get("decode_tps"), dict) and r.get("weight_bytes"):
            r["gb_per_s"] = r["weight_bytes"] * r["decode_tps"]["median"] / 1e9
    write(model_name, rows, quick, out_dir)
    return rows


def _fmt(d, digits=1):
    if not isinstance(d, dict):
        return "–"
    return f"{d['median']:.{digits}f} ({d['min']:.{digits}f}–{d['max']:.{digits}f})"


def table(model_name: str, rows: list[dict]) -> str:
    lm = model_name == "smollm2-135m"
    if lm:
        head = ("| runtime | decode tok/s (min–max) | × float32 | prefill tok/s | × float32 | resident MB | "
                "% of float32 | MB read per token | GB/s |\n|---|---|---|---|---|---|---|---|---|")
    else:
        head = ("| runtime | items/s (min–max) | × float32 | batch forward ms | one item ms | resident MB | "
                "% of float32 | weight MB |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | did not run: {r['error']} |" + " |" * (8 if lm else 6))
            continue
        res = f"{r['resident_mb']:.0f}"
        frac = f"{100 * r['resident_frac']:.0f}%" if r.get("resident_frac") else "–"
        if lm:
            lines.append(f"| {r['label']} | {_fmt(r['decode_tps'])} | {r.get('decode_tps_x', float('nan')):.2f}× | "
                         f"{_fmt(r['prefill_tps'], 0)} | {r.get('prefill_tps_x', float('nan')):.2f}× | {res} | {frac} | "
                         f"{r['weight_bytes'] / 2**20:.0f} | {r.get('gb_per_s', float('nan')):.1f} |")
        else:
            batch_ms = 1e3 * r["batch"] / r["items_per_s"]["median"]  # the median batch's forward time
            one = f"{r['latency_ms']['median']:.2f}" if isinstance(r.get("latency_ms"), dict) else "–"
            lines.append(f"| {r['label']} | {_fmt(r['items_per_s'])} | {r.get('items_per_s_x', float('nan')):.2f}× | "
                         f"{batch_ms:.1f} | {one} | {res} | {frac} | {r['weight_bytes'] / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    from presets_table import cpu_name

    return f"{cpu_name()}, {os.cpu_count()} cores, {THREADS} threads"


def write(model_name: str, rows: list[dict], quick: bool, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"model": model_name, "quick": quick, "date": time.strftime("%Y-%m-%d"), "machine": machine(),
            "command": f"bench/speed.py --model {model_name}{' --quick' if quick else ''}"}
    _atomic(out_dir / f"speed-{model_name}.json", json.dumps({**meta, "rows": rows}, indent=1))
    _atomic(out_dir / f"speed-{model_name}.md", table(model_name, rows))
    plot(model_name, rows, out_dir / f"speed-{model_name}.png")


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot(model_name: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "decode_tps" if model_name == "smollm2-135m" else "items_per_s"
    ok = [r for r in rows if isinstance(r.get(key), dict)]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for r in ok:
        bpw = 8 * r["weight_bytes"] / max(1, _params(model_name))
        d = r[key]
        ax.errorbar([bpw], [d["median"]], yerr=[[d["median"] - d["min"]], [d["max"] - d["median"]]], fmt="o",
                    label=r["label"], capsize=3)
    ax.set_xlabel("bytes held per weight × 8 (bits per weight in memory)")
    ax.set_ylabel("decode tokens/s (batch 1)" if key == "decode_tps" else "items/s")
    ax.set_title(f"{model_name}: speed against size, {THREADS} threads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _params(model_name: str) -> int:
    from squash.models import bundled_info

    return bundled_info(model_name).get("parameters") or 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    rows = run_speed(args.model, args.quick, progress=lambda i, n, what: print(f"[{i + 1}/{n}] {what}", flush=True))
    print(table(args.model, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
