"""GGUF export: squash's codes and scales land in llama.cpp's block formats exactly where they fit, refits stay
close to squash's Ŵ, the file reads back (gguf-py; llama.cpp when installed), and bad input is refused.

A tiny random LLaMA (hidden 64, 2 layers, a byte-level BPE tokenizer trained here) keeps every test to seconds.

Tolerances. Exact tensors: the GGUF weight equals f16(s)·(c − z) (Q8_0, Q4_0, Q5_0) or f16(s)·c + f16(−s·z)
(Q4_1, Q5_1) to float32 precision, i.e. squash's Ŵ up to fp16 rounding of the scale and offset: |Δ| ≤ 2⁻¹¹·(|Ŵ| +
2·|s·z|). Refits: no worse than llama.cpp's own reference quantizer on the same Ŵ (1% slack for fp16 rounding), and
exact on every 32-block that holds no outlier.
"""
import hashlib
import json

import numpy as np
import pytest
import torch

from squash import SquashError, compress, load, load_squash, save
from squash.cli import main
from squash.io.gguf_export import (SMALL, TOLERANCE, _hint, _refit, _small_values, dequantize, export_gguf,
                                   input_importance, q4_k, q6_k, refit_candidates, refit_small, rope_permutation,
                                   weighted_error)
from squash.recipe import Recipe

FP16_EPS = 2.0**-11  # relative rounding of a float32 scale to float16


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer LLaMA (hidden 64, 4 heads, 2 KV heads, MLP 256) with a 300-token byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from squash.data import calibration_text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([calibration_text()[:40000]], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms away from 1 and peaked attention, so a misplaced norm or q/k row shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            if "q_proj" in n or "k_proj" in n:
                p.mul_(8)
    folder = tmp_path_factory.mktemp("tiny-llama") / "tiny-llama"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    return load(tiny_llama_dir)


def calib(model):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, model.config["hf_config"]["vocab_size"], (1, 64), generator=g),
             "use_cache": False} for _ in range(4)]


def recipe(*steps, name="t") -> Recipe:
    return Recipe.from_dict({"name": name, "steps": [dict(s) for s in steps]})


Q = {"step": "quantize"}
RECIPES = {
    "q8_0": recipe({**Q, "bits": 8, "block": 32, "symmetric": True, "scale_dtype": "float16"}),
    "int8-channel": recipe({**Q, "bits": 8, "block": "channel", "symmetric": True}),  # float32 scales
    "q4_0-gptq": recipe({**Q, "bits": 4, "block": 32, "symmetric": True, "rounding": "gptq", "clip": "mse",
                         "scale_dtype": "float16"}),
    "q4_1": recipe({**Q, "bits": 4, "block": 32, "symmetric": False, "zero_dtype": "int", "scale_dtype": "float16"}),
    "g64-asym": recipe({**Q, "bits": 4, "block": 64, "symmetric": False, "zero_dtype": "int"}),
    "hqq-float-zero": recipe({**Q, "bits": 4, "block": 32, "symmetric": False, "clip": "hqq"}),
    "int3-sym": recipe({**Q, "bits": 3, "block": 32, "symmetric": True}),
    "int5-asym": recipe({**Q, "bits": 5, "block": 64, "symmetric": False, "zero_dtype": "int"}),
}
EXPECTED_TYPE = {"q8_0": "Q8_0", "int8-channel": "Q8_0", "q4_0-gptq": "Q4_0", "q4_1": "Q4_1", "g64-asym": "Q4_1",
                 "hqq-float-zero": "Q4_1", "int3-sym": "Q4_0", "int5-asym": "Q5_1"}


@pytest.fixture(scope="module")
def compressed(tiny_llama):
    cache = {}

    def get(name: str):
        if name not in cache:
            r = RECIPES[name] if name in RECIPES else REFITS[name]
            cache[name] = compress(tiny_llama, r, calib=calib(tiny_llama) if r.needs_calibration else None)
        return cache[name]

    return get


def read_back(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized by gguf-py, as (rows, cols) in Hugging Face row order."""
    import gguf

    reader = gguf.GGUFReader(path)
    heads = int(reader.fields["llama.attention.head_count"].contents())
    kv = int(reader.fields["llama.attention.head_count_kv"].contents())
    out = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        w = np.asarray(w, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)] if w.ndim > 1 else -1)
        for key, n in ((".attn_q.", heads), (".attn_k.", kv)):
            if key in t.name:
                w = w[np.argsort(rope_permutation(w.shape[0], n))]  # undo llama.cpp's row order
        out[t.name] = w
    return out


def types_of(path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


GGUF_OF = {"model.embed_tokens.weight": "token_embd.weight", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
           "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_key(hf: str) -> str:
    if hf in GGUF_OF:
        return GGUF_OF[hf]
    layer, rest = hf.split(".")[2], ".".join(hf.split(".")[3:5])
    return f"blk.{layer}.{GGUF_OF[rest]}.weight"


def expand(per_block: torch.Tensor, ct) -> np.ndarray:
    rows, cols = ct.matrix_shape
    br, bc = ct.block
    return per_block.float().repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols].numpy()


@pytest.mark.parametrize("name", list(RECIPES))
def test_codes_that_fit_are_written_exactly(tmp_path, compressed, name):
    small = compressed(name)
    out = tmp_path / "m.gguf"
    report = export_gguf(small, out)
    types, back = types_of(out), read_back(out)
    assert "output.weight" not in types  # tied head: llama.cpp reads token_embd
    for hf, ct in small.tensors.items():
        key = gguf_key(hf)
        assert types[key] == EXPECTED_TYPE[name], key
        w_hat = ct.dequantize().reshape(ct.matrix_shape).numpy()
        s, z = expand(ct.scale, ct), expand(ct.zero_point(), ct)
        c = ct.codes.float().numpy()
        s16 = s.astype(np.float16).astype(np.float32)
        if types[key] in ("Q4_1", "Q5_1"):
            expected = s16 * c + (-s * z).astype(np.float16).astype(np.float32)
        else:
            expected = s16 * (c - z)
        np.testing.assert_allclose(back[key], expected, rtol=1e-6, atol=1e-9)
        assert np.all(np.abs(back[key] - w_hat) <= FP16_EPS * (np.abs(w_hat) + 2 * np.abs(s * z)) + 1e-12), key
    rows = {r["type"]: r for r in report["summary"]}
    assert rows[EXPECTED_TYPE[name]]["exact"] == len(small.tensors) and rows[EXPECTED_TYPE[name]]["refit"] == 0
    assert not any("did not fit" in n for n in report["notes"])
    # float tensors: the norms, as F32, bit for bit
    state = small.module.state_dict()
    np.testing.assert_array_equal(back["output_norm.weight"], state["model.norm.weight"].numpy())
    np.testing.assert_array_equal(back["blk.1.ffn_norm.weight"], state["model.layers.1.post_attention_layernorm.weight"].numpy())
    assert types["blk.0.attn_norm.weight"] == "F32"


REFITS = {
    "int4-outliers": recipe({"step": "outliers", "fraction": 0.01},
                            {**Q, "bits": 4, "block": 64, "symmetric": False, "zero_dtype": "int", "scale_dtype": "float16"}),
    "nf4": recipe({**Q, "bits": 4, "block": 32, "grid": "nf"}),
    "ragged-48": recipe({**Q, "bits": 8, "block": 48, "symmetric": True}),
    "int6-lowrank": recipe({**Q, "bits": 6, "block": 32, "symmetric": True}, {"step": "lowrank", "rank": 2}),
}


def weighted_reference_error(w: np.ndarray, qtype: str, c: np.ndarray | None) -> float:
    """llama.cpp's reference quantizer's error on w, under the weighted_error measure."""
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    return weighted_error(w, gguf.quants.dequantize(gguf.quants.quantize(w, t), t), c)


@pytest.mark.parametrize("name", list(REFITS))
def test_refits_stay_close_to_squash(tmp_path, compressed, name):
    """Each refit tensor lands in the first of its candidate types whose output change (inputs weighted by
    their calibration statistics) is within the tolerance, no worse there than llama.cpp's own quantizer."""
    small = compressed(name)
    out = tmp_path / "m.gguf"
    report = export_gguf(small, out)
    types, back = types_of(out), read_back(out)
    by_name = {r["name"]: r for r in report["tensors"]}
    stats = input_importance(small)
    for hf, ct in small.tensors.items():
        key = gguf_key(hf)
        rows, cols = ct.matrix_shape
        w_hat = ct.dequantize().reshape(rows, cols).numpy()
        c = stats.get(hf)
        assert (c is None) == (hf == "model.embed_tokens.weight" and "lm_head.weight" not in small.tied)
        err = float(((back[key] - w_hat) ** 2).sum())
        change = weighted_error(w_hat, back[key], c)
        assert by_name[key]["how"] == "refit"
        assert by_name[key]["rel_rms"] == pytest.approx(np.sqrt(err / (w_hat**2).sum()), rel=1e-4)
        assert by_name[key]["output_change"] == pytest.approx(change, rel=1e-4, abs=1e-12)
        candidates = refit_candidates(ct, cols)
        assert types[key] in candidates, key
        assert change <= TOLERANCE or types[key] == "F16", key
        for smaller in candidates[: candidates.index(types[key])]:  # each smaller type was tried and fell short
            if smaller in ("Q4_K", "Q6_K"):
                continue  # the K-quants' own search; checked against ggml below where they are chosen
            v = _refit(smaller, w_hat, _hint(ct, None), c)[1]  # rows are independent: Hugging Face order will do
            assert weighted_error(w_hat, v, c) > TOLERANCE, (key, smaller)
        if types[key] in ("Q4_1", "Q5_1", "Q8_0"):  # (gguf-py has no K-quant quantizer to compare with)
            assert change <= 1.01 * weighted_reference_error(w_hat, types[key], c) + 1e-12, key
        if name == "int4-outliers" and types[key] in ("Q4_1", "Q5_1", "Q8_0"):  # blocks without an outlier: exact
            hit = np.zeros(rows * cols, bool)
            hit[ct.sparse_index.long().numpy()] = True
            clean = ~hit.reshape(rows, cols // 32, 32).any(-1)
            d = np.abs(back[key] - w_hat).reshape(rows, cols // 32, 32)[clean]
            ref = np.abs(w_hat).reshape(rows, cols // 32, 32)[clean]
            sz = np.abs(expand(ct.scale, ct) * expand(ct.zero_point(), ct)).reshape(rows, cols // 32, 32)[clean]
            assert clean.mean() > 0.5 and np.all(d <= FP16_EPS * (ref + 2 * sz) + 1e-12)
    # the user is told that llama.cpp will not run squash's own values, and which recipe would
    assert any("did not fit a llama.cpp type" in n and "gguf-q4_0" in n for n in report["notes"])


def test_refit_tolerance_picks_the_type(tmp_path, compressed):
    """A loose tolerance keeps every refit at squash's own width; none at all sends every refit to F16."""
    small = compressed("int4-outliers")
    loose = export_gguf(small, tmp_path / "loose.gguf", tolerance=1.0)
    strict = export_gguf(small, tmp_path / "strict.gguf", tolerance=0.0)
    for hf, ct in small.tensors.items():
        cols = ct.matrix_shape[1]
        key = gguf_key(hf)
        assert next(r for r in loose["tensors"] if r["name"] == key)["type"] == ("Q4_K" if cols % 256 == 0 else "Q4_1")
        assert next(r for r in strict["tensors"] if r["name"] == key)["type"] == "F16"
    assert (tmp_path / "loose.gguf").stat().st_size < (tmp_path / "strict.gguf").stat().st_size


def test_refits_without_input_statistics_still_export(tmp_path, compressed, monkeypatch):
    """No tokenizer to make calibration windows from (a file written before squash stored tokenizers, its
    source model gone): the refits round unweighted and the report says so; statistics that are not finite are
    dropped the same way."""
    import squash.io.gguf_export as ge

    path = tmp_path / "m.squash"
    save(compressed("int4-outliers"), path)
    small = load_squash(path)
    small.source = {**small.source, "name": str(tmp_path / "moved-away")}
    small.assets = {}
    report = export_gguf(small, tmp_path / "a.gguf")
    assert any(n.startswith("refits are unweighted: no input statistics") for n in report["notes"])
    assert not any("weighted by their inputs" in n for n in report["notes"])
    assert all(r["type"] in ("Q4_K", "Q4_1", "Q5_1", "Q6_K", "Q8_0", "F16") for r in report["tensors"] if r["how"] == "refit")

    real = ge.input_importance

    def broken(model, **kw):
        stats = real(compressed("int4-outliers"), **kw)
        stats["model.layers.0.mlp.up_proj.weight"][3] = np.nan
        return stats

    monkeypatch.setattr(ge, "input_importance", broken)
    report = export_gguf(compressed("int4-outliers"), tmp_path / "b.gguf")
    assert any("refits of 1 tensors are unweighted" in n for n in report["notes"])
    assert all(np.isfinite(r["output_change"]) for r in report["tensors"])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_1", "Q8_0"])
def test_importance_weights_steer_the_refit(qtype):
    """With column weights, the refit's weighted error is no worse than the plain refit's, and clearly better
    when the weights are skewed and blocks hold an outlier. (Not a theorem: the weighted refit searches other
    candidates than the plain one; it holds on this fixed sample, as it should on any such data.)"""
    g = np.random.default_rng(0)
    x = g.standard_normal((64, 256)).astype(np.float32)
    x[g.random(x.shape) < 0.01] *= 12  # outliers: the blocks where rounding must choose what to lose
    c = np.exp(2 * g.standard_normal(256)).astype(np.float32)  # E[x_j²] of a few channels dominate
    t = SMALL[qtype]
    plain = _small_values(t, *refit_small(t, x))
    weighted = _small_values(t, *refit_small(t, x, weight=c))
    e_plain, e_weighted = weighted_error(x, plain, c), weighted_error(x, weighted, c)
    assert e_weighted <= e_plain * (1 + 1e-6)
    if qtype != "Q8_0":  # 255 levels hold the outliers anyway: little for the weights to steer
        assert e_weighted < 0.9 * e_plain, (e_weighted, e_plain)
    # and the K-quants, as ggml's *_impl quantizers use an importance matrix
    for kq, fn in (("Q4_K", lambda w: q4_k(x, weight=w)), ("Q6_K", lambda w: q6_k(x, w))):
        e0 = weighted_error(x, dequantize(fn(None), kq, *x.shape), c)
        e1 = weighted_error(x, dequantize(fn(c), kq, *x.shape), c)
        assert e1 < e0, (kq, e1, e0)


def test_forced_types(tmp_path, compressed):
    small = compressed("q4_1")
    back_exact = None
    for forced, want in (("q8_0", {"Q8_0"}), ("q4_k", {"Q4_K", "Q4_1"}), ("q6_k", {"Q6_K", "Q8_0"}), ("f16", {"F16"})):
        out = tmp_path / f"{forced}.gguf"
        report = export_gguf(small, out, target=forced)
        types = types_of(out)
        got = {types[gguf_key(hf)] for hf in small.tensors}
        assert got == want, forced
        if forced == "q8_0":  # 4-bit codes with an integer zero point fit Q8_0: still exact
            assert all(r["how"] == "exact" for r in report["tensors"] if r["type"] == "Q8_0")
            back_exact = read_back(out)
        if forced == "q4_k":  # only the down projection's rows (256) cut into K-quant super-blocks
            assert types["blk.0.ffn_down.weight"] == "Q4_K" and types["blk.0.ffn_up.weight"] == "Q4_1"
    ct = small.tensors["model.layers.0.mlp.up_proj.weight"]
    w_hat = ct.dequantize().numpy()
    assert np.abs(back_exact["blk.0.ffn_up.weight"] - w_hat).max() <= FP16_EPS * 2 * np.abs(w_hat).max() + 1e-7
    with pytest.raises(SquashError, match="choose one of"):
        export_gguf(small, tmp_path / "x.gguf", target="q2_k")


def test_metadata_is_built_from_the_config_and_tokenizer_or_copied(tmp_path, compressed, tiny_llama):
    import gguf

    small = compressed("q8_0")
    first = tmp_path / "first.gguf"
    report = export_gguf(small, first)
    assert report["metadata_from"] == "config and tokenizer"
    f = gguf.GGUFReader(first).fields
    cfg = tiny_llama.config["hf_config"]
    assert f["general.architecture"].contents() == "llama"
    assert f["llama.embedding_length"].contents() == 64
    assert f["llama.attention.head_count_kv"].contents() == 2
    assert f["llama.block_count"].contents() == 2
    assert f["llama.vocab_size"].contents() == cfg["vocab_size"]
    assert f["general.file_type"].contents() == 7  # mostly Q8_0
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(f["tokenizer.ggml.tokens"].data) == cfg["vocab_size"]
    assert json.loads(f["squash.recipe"].contents())["steps"][0]["bits"] == 8

    # a second export copies every key of a given GGUF (tokenizer, general.*), and rewrites the recipe
    again = tmp_path / "again.gguf"
    report = export_gguf(compressed("q4_1"), again, metadata_from=first)
    g = gguf.GGUFReader(again).fields
    assert report["metadata_from"] == str(first)
    assert g["tokenizer.ggml.tokens"].contents() == f["tokenizer.ggml.tokens"].contents()
    assert g["tokenizer.ggml.merges"].contents() == f["tokenizer.ggml.merges"].contents()
    assert g["general.name"].contents() == f["general.name"].contents()
    assert g["general.file_type"].contents() == 3  # mostly Q4_1
    assert json.loads(g["squash.recipe"].contents())["steps"][0]["symmetric"] is False


def test_llama_cpp_runs_the_export_like_squash(tmp_path, compressed, tiny_llama):
    """llama.cpp's logits on the exported file match squash's forward pass: names, q/k row order, norms and
    hyper-parameters are right. F32 weights isolate the format from llama.cpp's activation rounding."""
    llama_cpp = pytest.importorskip("llama_cpp")
    small = compressed("q4_1")
    ids = calib(tiny_llama)[0]["input_ids"][0, :48].tolist()
    with torch.inference_mode():
        want = torch.log_softmax(small.module(torch.tensor([ids])).logits[0].float(), -1).numpy()
    for forced, tol in (("f32", 2e-3), (None, 0.05)):  # None: the Q4_1 export itself
        out = tmp_path / f"{forced}.gguf"
        export_gguf(small, out, target=forced)
        llm = load_llama(llama_cpp, out, n_ctx=64)
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
        got = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        assert np.abs(got - want).max() < tol, (forced, np.abs(got - want).max())
        del llm


def load_llama(llama_cpp, path, n_ctx: int, **kw):
    """llama.cpp with its extra (repacking) buffer types off: they crash with an illegal instruction on some
    CPUs. Llama() does not take the parameter, so it is set on the default model parameters it starts from.
    `kw` goes to Llama() (type_k=0, type_v=0: a float32 KV cache instead of float16)."""
    import llama_cpp.llama as llama_mod

    original = llama_mod.llama_cpp.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    llama_mod.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, verbose=False, **kw)
    finally:
        llama_mod.llama_cpp.llama_model_default_params = original


def test_cli_export_and_refusals(tmp_path, capsys, compressed, digits):
    path = save(compressed("q4_0-gptq"), tmp_path / "tiny.squash")
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp_path / "tiny.gguf"
    assert main(["export", str(path), "--to", "gguf", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["file_type"] == "Q4_0" and out.is_file()
    assert {r["type"]: r["exact"] for r in report["summary"]}["Q4_0"] == 15  # 7 per layer, and the embedding
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # the input is never modified
    back = load_squash(path)
    assert main(["export", str(path), "--to", "gguf", "-o", str(tmp_path / "t2.gguf")]) == 0
    assert "Q4_0" in capsys.readouterr().out
    refit = save(compressed("int4-outliers"), tmp_path / "refit.squash")  # the table shows what refits do
    assert main(["export", str(refit), "--to", "gguf", "-o", str(tmp_path / "t3.gguf")]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "did not fit a llama.cpp type" in shown and "largest output change" in shown

    # a model llama.cpp cannot run (a CNN): one line, exit 2, nothing written
    d = save(compress(digits, Recipe.from_dict({"name": "int8", "steps": [{"step": "quantize"}]})), tmp_path / "d.squash")
    bad = tmp_path / "d.gguf"
    assert main(["export", str(d), "--to", "gguf", "-o", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "decoder language models" in err and len(err.strip().splitlines()) == 1
    assert not bad.exists() and not list(tmp_path.glob(".d.gguf*"))
    with pytest.raises(SquashError, match="decoder language models"):
        export_gguf(load_squash(d), tmp_path / "d2.gguf")
    assert not (tmp_path / "d2.gguf").exists()
    # wrong suffix, the input as output, a missing folder
    assert main(["export", str(path), "--to", "gguf", "-o", str(tmp_path / "x.bin")]) == 2
    assert main(["export", str(path), "--to", "gguf", "-o", str(path)]) == 2
    assert main(["export", str(path), "--to", "gguf", "-o", str(tmp_path / "no" / "x.gguf")]) == 2
    capsys.readouterr()
    assert back.tensors  # still loads
