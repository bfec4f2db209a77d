"""The bundled models at int8 against their float references, with the budgets of the foundation issue."""
import pytest
import torch

from squash import compress, evaluate, load, load_recipe, load_squash, save
from squash.eval.quality import EvalSize


def test_digits_cnn_is_trained_cached_and_accurate(digits):
    again = load("digits-cnn")  # from the cache this time
    assert digits.source["sha256"] == again.source["sha256"]
    report = evaluate(compress(digits, load_recipe("int8")), digits, repeats=1)
    assert report["quality"]["accuracy_float"] > 0.95
    assert report["quality"]["accuracy_float"] - report["quality"]["accuracy"] <= 0.005
    assert report["weight_bytes"] <= 0.30 * report["float_weight_bytes"]


def test_minilm_int8_keeps_cosine(minilm, tmp_path):
    small = compress(minilm, load_recipe("int8"))
    path = save(small, tmp_path / "minilm.squash")
    assert path.stat().st_size <= 0.30 * 4 * sum(p.numel() for p in minilm.module.parameters())
    report = evaluate(load_squash(path), minilm, EvalSize(paragraphs=64), repeats=1)
    assert report["quality"]["cosine"] >= 0.995


@pytest.mark.slow
def test_smollm2_int8_end_to_end(tmp_path):
    model = load("smollm2-135m")
    small = compress(model, load_recipe("int8"))
    # tied token embedding and output head share one compressed tensor
    assert small.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert small.module.lm_head.weight_q is small.module.model.embed_tokens.weight_q
    path = save(small, tmp_path / "smollm2.squash")
    float_bytes = 4 * sum(p.numel() for p in model.module.parameters())
    assert path.stat().st_size <= 0.30 * float_bytes
    back = load_squash(path)
    back.tokenizer = model.tokenizer
    report = evaluate(back, model, EvalSize(lm_window=256, lm_windows=2), repeats=1)
    q = report["quality"]
    assert abs(q["perplexity"] / q["perplexity_float"] - 1) <= 0.01
    assert q["kl"] < 0.02 and q["top1_agreement"] > 0.9
    # greedy continuation of a plain prompt stays English prose
    ids = model.tokenizer("The Python language is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        gen = back.module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                                   pad_token_id=model.tokenizer.eos_token_id)
    text = model.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(text.split()) >= 8 and text.isascii()
