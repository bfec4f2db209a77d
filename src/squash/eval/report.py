"""The report of a run: float against compressed, side by side, measured in one process.

Size: weight bytes (float32 for the reference; codes, scales and float leftovers for the compressed model) and
bits per weight counting everything stored. Quality: see quality.py. Speed: latency of one forward pass on a
fixed input, median of repeats with min and max, float and compressed alternated so drift hits both alike; the
compressed model runs on the packed runtime (runtime/packed.py) where its layers can be packed.
"""
from __future__ import annotations

import inspect
import statistics
import time

import torch

from squash.data import evaluation_text, paragraphs
from squash.eval.quality import (MODULE_BATCHES, EvalSize, Progress, classifier_quality, encoder_quality,
                                 has_example_input, lm_quality, lm_windows, module_inputs, module_quality)
from squash.models import Model, tokenizer_for
from squash.recipe import float_weight_bytes, stored_weight_bytes


def evaluate(model: Model, reference: Model, size: EvalSize = EvalSize(), repeats: int = 5,
             progress: Progress | None = None) -> dict:
    """Everything the report shows, as a JSON-able dict."""
    n_float, bytes_float = float_weight_bytes(reference.module)
    _, stored = stored_weight_bytes(model)
    report = {
        "model": model.name,
        "kind": model.kind,
        "recipe": (model.recipe or {}).get("name"),
        "weights": n_float,
        "float_weight_bytes": bytes_float,
        "weight_bytes": stored,
        "size_ratio": stored / bytes_float,
        "bits_per_weight": 8 * stored / n_float,  # per weight of the float model (structured pruning removes some)
        "compressed_tensors": len(model.tensors),
        "tied": len(model.tied),
    }
    tokenizer = tokenizer_for(model) or reference.tokenizer
    if model.kind == "causal-lm":
        report["quality"] = lm_quality(model.module, reference.module, lm_windows(tokenizer, size), progress)
    elif model.kind == "encoder":
        report["quality"] = encoder_quality(model.module, reference.module, tokenizer, size, progress)
    elif model.kind == "classifier":
        report["quality"] = classifier_quality(model.module, reference.module)
    elif has_example_input(model):
        report["quality"] = module_quality(model.module, reference.module, module_inputs(model, MODULE_BATCHES))
    from squash.eval.guard import layer_inputs, layer_table

    report["layers"] = layer_table(model, reference, layer_inputs(model, tokenizer))
    report["layers_float"] = {n: why.removeprefix("float: ") for n, why in model.layers.items() if why.startswith("float")}
    if model.kind == "module" and not has_example_input(model):  # no example input to time it on
        report["latency"] = {}
        return report
    fast, runtime = _runnable(model)  # one packed copy serves both speed measurements
    report["latency"] = latency(model, reference, tokenizer, repeats, (fast, runtime))
    if model.kind == "causal-lm":
        report["decode"] = decode_speed(fast, reference.module, tokenizer, repeats=max(1, min(repeats, 3)))
    return report


def example_input(model: Model, tokenizer) -> dict:
    """The fixed input latency is measured on: 128 tokens (LM), 8 paragraphs (encoder), 64 images (classifier)."""
    if model.kind == "causal-lm":
        ids = tokenizer(evaluation_text(), return_tensors="pt")["input_ids"][:, :128]
        return {"input_ids": ids}
    if model.kind == "encoder":
        texts = paragraphs(evaluation_text())[:8]
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    if model.kind == "classifier":
        from squash.digits import digits_split

        return {"x": digits_split()["x_test"][:64]}
    if model.kind == "module" and has_example_input(model):
        first = next(iter(inspect.signature(model.module.forward).parameters))
        return {first: module_inputs(model)[0]}
    raise ValueError(f"no example input for a {model.kind} model")


@torch.inference_mode()
def latency(model: Model, reference: Model, tokenizer, repeats: int = 5, runnable=None) -> dict:
    """Forward latency in ms of both models on the same input, alternated; median, min, max."""
    if model.kind == "module" and not has_example_input(model):
        return {}
    inputs = example_input(model, tokenizer)
    compressed, runtime = runnable or _runnable(model)
    times = {"float": [], "compressed": []}
    for m in (reference.module, compressed):  # warm-up
        m(**inputs)
    for _ in range(repeats):
        for key, m in (("float", reference.module), ("compressed", compressed)):
            t = time.perf_counter()
            m(**inputs)
            times[key].append(1000 * (time.perf_counter() - t))
    out = {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in times.items()}
    out["threads"] = torch.get_num_threads()
    out["runtime"] = runtime
    out["speedup"] = out["float"]["median_ms"] / out["compressed"]["median_ms"]
    return out


DECODE_TOKENS = 32


@torch.inference_mode()
def decode_speed(compressed: torch.nn.Module, reference: torch.nn.Module, tokenizer, tokens: int = DECODE_TOKENS,
                 repeats: int = 3) -> dict:
    """What a user of a language model feels: greedy decoding at batch 1 after a 32-token prompt, tokens/s.
    The float model runs in transformers with its KV cache; the compressed one on squash's lean decoder over
    the packed weights, or transformers' loop on the packed modules where the decoder does not cover the
    architecture. Alternated, median of `repeats`."""
    from squash.errors import SquashError
    from squash.runtime.llama import make_decoder

    prompt = tokenizer(evaluation_text()[:2000], return_tensors="pt")["input_ids"][0, :32]
    try:
        make_decoder(compressed, max_len=len(prompt) + tokens + 2)
        how = "squash's lean decoder"

        def run_compressed():
            return make_decoder(compressed, max_len=len(prompt) + tokens + 2).generate(prompt, tokens)[1].decode_tps
    except SquashError:
        how = "transformers' loop on the packed modules"

        def run_compressed():
            return hf_decode_tps(compressed, prompt, tokens)
    rates = {"float": [], "compressed": []}
    for _ in range(repeats):
        rates["float"].append(hf_decode_tps(reference, prompt, tokens))
        rates["compressed"].append(run_compressed())
    out = {k: statistics.median(v) for k, v in rates.items()}
    return {"float_tps": out["float"], "compressed_tps": out["compressed"], "speedup": out["compressed"] / out["float"],
            "tokens": tokens, "threads": torch.get_num_threads(), "runtime": how}


@torch.inference_mode()
def hf_decode_tps(module: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    """Greedy tokens/s of a transformers causal LM with its KV cache, after the prompt (prefill not counted)."""
    out = module(prompt[None], use_cache=True)
    cache, nxt = out.past_key_values, out.logits[0, -1].argmax()
    t = time.perf_counter()
    for _ in range(tokens):
        out = module(nxt.view(1, 1), past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[0, -1].argmax()
    return tokens / (time.perf_counter() - t)


def _runnable(model: Model):
    """The compressed module as squash runs it: a copy on the packed runtime (squash's kernel), or the
    reference modules where the kernel cannot be built here."""
    import copy

    from squash.errors import SquashError
    from squash.runtime.packed import accelerate

    try:
        fast = copy.deepcopy(model.module)
        how = accelerate(fast)
    except SquashError:
        return model.module, "reference (dequantize, then float matmul)"
    packed = sum(not v.startswith("reference") for v in how.values())
    return fast, f"packed runtime ({packed} of {len(how)} layers packed)"
