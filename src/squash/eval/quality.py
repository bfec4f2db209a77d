"""Quality of a compressed model against its float reference, on evaluation data only.

Language models, over windows of the evaluation text:
    perplexity  PPL = exp(−(1/N) Σ log p(x_t | x_<t))
    KL          mean over positions of KL(p_float ‖ p_compressed) on the next-token distribution, in nats
    top-1       share of positions where both models put the same token first
Sentence encoders: mean over paragraphs of cos(e_float, e_compressed), e = mean-pooled last hidden states.
Classifiers: test accuracy on the held-out digits split.
Any other torch module: cosine of its outputs to the float module's on seeded random inputs of its example shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

from squash.data import evaluation_text, paragraphs
from squash.errors import SquashError

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class EvalSize:
    """How much evaluation data to use; `quick` sizes are for tests."""

    lm_window: int = 512
    lm_windows: int = 16
    paragraphs: int = 256
    encoder_max_len: int = 128


QUICK = EvalSize(lm_window=128, lm_windows=2, paragraphs=32)


def lm_windows(tokenizer, size: EvalSize) -> torch.Tensor:
    """(n, window) token ids: consecutive, non-overlapping windows from the start of the evaluation text."""
    ids = tokenizer(evaluation_text(), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = min(size.lm_windows, len(ids) // size.lm_window)
    return ids[: n * size.lm_window].reshape(n, size.lm_window)  # (n, window)


def saturating_exp(x: float) -> float:
    """exp, saturating at inf: a broken model's mean NLL of thousands of nats is a result to report, not a crash."""
    return math.exp(x) if x < 700 else math.inf


@torch.inference_mode()
def lm_quality(module, reference, windows: torch.Tensor, progress: Progress | None = None) -> dict:
    """Perplexity of both models, and KL / top-1 agreement of `module` against `reference`."""
    nll, nll_ref, kl, agree, count = 0.0, 0.0, 0.0, 0, 0
    for i, w in enumerate(windows):
        x = w[None]  # (1, T)
        logp = F.log_softmax(module(x).logits[0, :-1].float(), dim=-1)  # (T-1, V)
        logp_ref = F.log_softmax(reference(x).logits[0, :-1].float(), dim=-1)
        target = w[1:]
        nll -= logp.gather(1, target[:, None]).sum().item()
        nll_ref -= logp_ref.gather(1, target[:, None]).sum().item()
        kl += (logp_ref.exp() * (logp_ref - logp)).sum().item()
        agree += (logp.argmax(-1) == logp_ref.argmax(-1)).sum().item()
        count += len(target)
        if progress:
            progress(i + 1, len(windows), "evaluation text")
    return {
        "perplexity": saturating_exp(nll / count),
        "perplexity_float": saturating_exp(nll_ref / count),
        "kl": kl / count,
        "top1_agreement": agree / count,
        "tokens": count,
    }


@torch.inference_mode()
def sentence_embeddings(module, tokenizer, texts: list[str], max_len: int, batch: int = 32) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings, (n, dim)."""
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        hidden = module(**enc).last_hidden_state  # (B, T, C)
        mask = enc["attention_mask"][..., None].to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(F.normalize(pooled.float(), dim=-1))
    return torch.cat(out)


def encoder_quality(module, reference, tokenizer, size: EvalSize, progress: Progress | None = None) -> dict:
    texts = paragraphs(evaluation_text())[: size.paragraphs]
    e = sentence_embeddings(module, tokenizer, texts, size.encoder_max_len)
    if progress:
        progress(1, 2, "paragraphs")
    e_ref = sentence_embeddings(reference, tokenizer, texts, size.encoder_max_len)
    if progress:
        progress(2, 2, "paragraphs")
    cos = (e * e_ref).sum(-1)
    return {"cosine": cos.mean().item(), "cosine_min": cos.min().item(), "paragraphs": len(texts)}


@torch.inference_mode()
def classifier_quality(module, reference) -> dict:
    from squash.digits import digits_split

    data = digits_split()
    acc = (module(data["x_test"]).argmax(-1) == data["y_test"]).float().mean().item()
    acc_ref = (reference(data["x_test"]).argmax(-1) == data["y_test"]).float().mean().item()
    return {"accuracy": acc, "accuracy_float": acc_ref, "images": len(data["y_test"])}


MODULE_BATCHES = 4


def has_example_input(model) -> bool:
    """Whether a plain module was loaded with an example input (squash.load(module, example_input=...))."""
    return bool((model.config or {}).get("input"))


def module_inputs(model, batches: int = 1) -> list[torch.Tensor]:
    """Seeded standard-normal batches of a plain module's example input shape (config["input"]); [] without
    one. A module has no data squash knows, so its outputs are compared on these (say so where shown)."""
    spec = (model.config or {}).get("input")
    if not spec:
        return []
    g = torch.Generator().manual_seed(1234)
    dtype = getattr(torch, spec.get("dtype", "float32"))
    return [torch.randn(*spec["shape"], generator=g).to(dtype) for _ in range(batches)]


@torch.inference_mode()
def module_quality(module, reference, inputs: list[torch.Tensor]) -> dict:
    """Cosine between the compressed and the float module's outputs, per example (flattened), on `inputs`;
    and the relative RMS error ‖y − ŷ‖ / ‖y‖ over all of them."""
    cos, err, norm = [], 0.0, 0.0
    for x in inputs:
        y, y_hat = _first_tensor(reference(x)).float(), _first_tensor(module(x)).float()
        if y.dim() == 0 or y.shape != y_hat.shape:
            raise SquashError(f"the module's output has shape {tuple(y.shape)}; squash compares batched outputs")
        y, y_hat = y.reshape(y.shape[0], -1), y_hat.reshape(y.shape[0], -1)
        cos.append(F.cosine_similarity(y, y_hat, dim=-1))
        err += float((y - y_hat).pow(2).sum())
        norm += float(y.pow(2).sum())
    c = torch.cat(cos)
    rel = math.sqrt(err / norm) if norm > 0 else (0.0 if err == 0 else math.inf)
    return {"cosine": float(c.mean()), "cosine_min": float(c.min()), "relative_rms_error": rel,
            "examples": int(c.numel()), "inputs": "seeded standard-normal inputs of the example input's shape"}


def _first_tensor(out) -> torch.Tensor:
    """A module's output tensor: itself, a model output's first field, or a tuple's first element."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "values"):
        out = list(out.values())
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise SquashError(f"the module returns {type(out).__name__}; squash compares tensor outputs")
