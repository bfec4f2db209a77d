"""The conformance suite every architecture passes: tiny random-initialised models built from transformers
configs (no downloads), each written as a real transformers folder with a small BPE tokenizer trained here on the
calibration text, then compressed, measured, saved, reloaded without the source and run.

Budgets (on the evaluation text, QUICK sizes):
    int8   KL ≤ 0.01 nats/token (LM) or cosine ≥ 0.999 (encoder); every layer's output SQNR ≥ 30 dB
    int4   (GPTQ preset) KL ≤ 0.25 or cosine ≥ 0.97; the guard passes
    file   save → load (source folder deleted) → identical outputs; the tokenizer comes from the file
    packed the packed runtime's logits within 2% RMS of the reference path's (int8 activations off: 1e-4)
"""
from __future__ import annotations

import math
import shutil

import pytest
import torch

import squash
from squash.eval.guard import problems
from squash.eval.quality import QUICK
from squash.recipe import survey

VOCAB = 384
DECODERS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2, num_hidden_layers=2, sliding_window=32),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, head_dim=32),
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, num_hidden_layers=2, head_dim=16, sliding_window=32,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=1, num_hidden_layers=3, head_dim=16, sliding_window=32,
                        query_pre_attn_scalar=16, layer_types=["sliding_attention", "sliding_attention",
                                                               "full_attention"]),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, num_hidden_layers=2, pad_token_id=0),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=2,
                word_embed_proj_dim=64, max_position_embeddings=256),
}
ENCODERS = {
    "bert": dict(model_type="bert", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_hidden_layers=2, max_position_embeddings=256),
    "distilbert": dict(model_type="distilbert", dim=64, hidden_dim=128, n_heads=4, n_layers=2,
                       max_position_embeddings=256),
    "roberta": dict(model_type="roberta", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_hidden_layers=2, max_position_embeddings=260, pad_token_id=1),
}
ARCHS = {**DECODERS, **ENCODERS}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer of VOCAB tokens trained on the calibration text (seconds, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from squash.data import calibration_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([calibration_text()[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _folder(root, arch: str, tokenizer):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    kw = dict(ARCHS[arch])
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, initializer_range=0.1, **kw)
    if arch in DECODERS:
        cfg.bos_token_id, cfg.eos_token_id = 1, 2
    torch.manual_seed(0)
    cls = AutoModelForCausalLM if arch in DECODERS else AutoModel
    module = cls.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms and biases away from their init, so that a dropped offset or bias would show
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    folder = root / arch
    module.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def arch_models(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("archs")
    return {arch: _folder(root, arch, tiny_tokenizer) for arch in ARCHS}


def _calib(model, n: int = 4) -> list[dict]:
    from squash.calibrate import calibration_batches

    return calibration_batches(model, samples=n, seq_len=64) if model.kind == "causal-lm" else \
        calibration_batches(model, samples=1)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_layer_is_found_and_compressed(arch, arch_models):
    model = squash.load(arch_models[arch])
    targets, skipped = survey(model.module)
    assert targets, arch
    # every weight matrix is either compressed or left float with a reason; none of these is left float
    assert skipped == {}, skipped
    small = squash.compress(model, squash.load_recipe("int8"))
    covered = set(small.tensors) | set(small.tied)
    owners = {f"{n}.weight" for n, _, _ in targets}
    assert owners == covered
    assert all(v.startswith("compressed") for v in small.layers.values())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_int8_within_budget_and_every_layer_faithful(arch, arch_models):
    model = squash.load(arch_models[arch])
    small = squash.compress(model, squash.load_recipe("int8"))
    report = squash.evaluate(small, model, QUICK, repeats=1)
    q = report["quality"]
    if model.kind == "causal-lm":
        assert q["kl"] <= 0.01, q
        assert abs(q["perplexity"] / q["perplexity_float"] - 1) <= 0.01, q
    else:
        assert q["cosine"] >= 0.999, q
    assert report["layers"], arch
    for name, row in report["layers"].items():
        assert row["output_sqnr_db"] is not None, f"{name}: the layer check never reached it"
        assert row["output_sqnr_db"] >= 30.0, (name, row)
    assert problems(report, small) == []


@pytest.mark.parametrize("arch", list(ARCHS))
def test_int4_gptq_within_budget(arch, arch_models):
    model = squash.load(arch_models[arch])
    small = squash.compress(model, squash.load_recipe("int4"), calib=_calib(model))
    report = squash.evaluate(small, model, QUICK, repeats=1)
    q = report["quality"]
    if model.kind == "causal-lm":
        assert q["kl"] <= 0.25, q
    else:
        assert q["cosine"] >= 0.97, q
    assert problems(report, small) == []


@pytest.mark.parametrize("arch", list(ARCHS))
def test_file_is_self_contained(arch, arch_models, tmp_path):
    """Saved, the source folder gone, the file rebuilds the same model and its tokenizer."""
    source = tmp_path / "src"
    shutil.copytree(arch_models[arch], source)
    model = squash.load(source)
    small = squash.compress(model, squash.load_recipe("rtn4"))
    path = squash.save(small, tmp_path / "m.squash")
    shutil.rmtree(source)
    again = squash.load_squash(path)
    from squash.models import tokenizer_for

    tok = tokenizer_for(again)
    text = "The for statement iterates over the items of a sequence."
    assert tok(text)["input_ids"] == model.tokenizer(text)["input_ids"]
    enc = dict(tok([text], return_tensors="pt"))
    if model.kind == "causal-lm":
        enc = {"input_ids": enc["input_ids"]}
    with torch.inference_mode():
        a, b = small.module(**enc), again.module(**enc)
    key = "logits" if model.kind == "causal-lm" else "last_hidden_state"
    torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("arch", list(DECODERS))
def test_packed_runtime_matches_reference(arch, arch_models, tmp_path):
    from squash.runtime.packed import load_packed

    model = squash.load(arch_models[arch])
    small = squash.compress(model, squash.load_recipe("int8"))
    path = squash.save(small, tmp_path / "m.squash")
    fast = load_packed(path, int8_activations=False)
    # every layer runs packed but one whose own forward is kept (OPT's position table, indexed by the mask)
    assert all(v.startswith("packed") or "its own forward" in v for v in fast.runtime.values()), fast.runtime
    ids = model.tokenizer("Objects are Python's abstraction for data.", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ref, got = small.module(ids).logits, fast.module(ids).logits
    rel = ((ref - got).pow(2).mean() / ref.pow(2).mean()).sqrt().item()
    assert rel <= 1e-4, rel


FAST = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2", "opt"]


@pytest.mark.parametrize("arch", FAST)
def test_fast_decoder_matches_reference(arch, arch_models, tmp_path):
    """The lean decoder on packed weights against transformers' forward on the reference modules, over 44
    tokens (past the 32-token sliding windows), whole and token by token through the cache."""
    from squash.runtime.llama import make_decoder
    from squash.runtime.packed import load_packed

    model = squash.load(arch_models[arch])
    small = squash.compress(model, squash.load_recipe("int8"))
    fast = load_packed(squash.save(small, tmp_path / "m.squash"), int8_activations=False)
    ids = model.tokenizer(TEXT, return_tensors="pt")["input_ids"][0, :44]
    assert len(ids) == 44
    with torch.inference_mode():
        ref = small.module(ids[None]).logits[0]
    dec = make_decoder(fast.module, max_len=64)
    whole = dec.forward(ids, 0, last_only=False)
    _rel_close(whole, ref, 1e-4)
    dec = make_decoder(fast.module, max_len=64)
    steps = [dec.forward(ids[:30], 0)[-1]] + [dec.forward(ids[t:t + 1], t)[-1] for t in range(30, 44)]
    _rel_close(torch.stack(steps), ref[29:], 1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_generate_runs_on_the_lean_decoder(arch, arch_models, tmp_path, capsys):
    import squash.cli

    small = squash.compress(squash.load(arch_models[arch]), squash.load_recipe("int8"))
    path = squash.save(small, tmp_path / "m.squash")
    assert squash.cli.main(["generate", str(path), "Lists are", "--max-new-tokens", "5", "--raw"]) == 0
    err = capsys.readouterr().err
    assert "decode" in err and "unavailable" not in err


def test_positional_decoder_post_norm_opt():
    """OPT-350m norms after each residual (do_layer_norm_before off) and projects in and out of a narrower
    embedding: the decoder follows both."""
    from transformers import OPTConfig, OPTForCausalLM

    from squash.runtime.llama import make_decoder

    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=2,
                    word_embed_proj_dim=32, max_position_embeddings=128, do_layer_norm_before=False)
    torch.manual_seed(0)
    module = OPTForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = module(ids[None]).logits[0]
    dec = make_decoder(module, max_len=64)
    _rel_close(dec.forward(ids, 0, last_only=False), ref, 1e-5)
    dec = make_decoder(module, max_len=64)
    steps = [dec.forward(ids[:12], 0)[-1]] + [dec.forward(ids[t:t + 1], t)[-1] for t in range(12, 20)]
    _rel_close(torch.stack(steps), ref[11:], 1e-5)


TEXT = ("The for statement in Python differs a bit from what you may be used to in C or Pascal. Rather than always "
        "iterating over an arithmetic progression of numbers, it iterates over the items of any sequence.")


def _rel_close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    rel = ((got - want).pow(2).mean() / want.pow(2).mean()).sqrt().item()
    assert rel <= tol, rel


def test_guard_refuses_a_layer_with_corrupt_scales(arch_models, tmp_path, monkeypatch, capsys):
    """The CLI compresses, the guard finds the damaged layer, names it, exits 3 and writes nothing."""
    import squash.cli
    import squash.recipe

    real = squash.recipe.compress
    victim = "model.layers.1.mlp.down_proj.weight"

    def corrupting(*args, **kwargs):
        out = real(*args, **kwargs)
        out.tensors[victim].scale.mul_(-40.0)  # a sign flip and a 40× blow-up: what a bad scale write does
        return out

    monkeypatch.setattr(squash, "compress", corrupting)
    target = tmp_path / "bad.squash"
    code = squash.cli.main(["compress", str(arch_models["llama"]), "--recipe", "int8", "-o", str(target), "--quick"])
    err = capsys.readouterr().err
    assert code == 3
    assert "model.layers.1.mlp.down_proj" in err.split("Worst layers")[1].split(",")[0], err
    assert not target.exists()
    code = squash.cli.main(["compress", str(arch_models["llama"]), "--recipe", "int8", "-o", str(target), "--quick",
                            "--force"])
    assert code == 0 and target.exists()


def test_guard_passes_a_good_run_and_names_float_layers(arch_models, tmp_path, capsys):
    import json

    import squash.cli

    target = tmp_path / "ok.squash"
    code = squash.cli.main(["compress", str(arch_models["gpt2"]), "--recipe", "int8", "-o", str(target), "--quick",
                            "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert all(r["output_sqnr_db"] >= 30 for r in report["layers"].values())
    assert squash.cli.main(["inspect", str(target), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert any(t["name"].endswith("attn.c_attn.weight") for t in listed["tensors"])
    assert math.isfinite(report["quality"]["kl"])
    # a language model's report measures decoding: GPT-2 on the positional lean decoder
    assert report["decode"]["compressed_tps"] > 0 and "lean decoder" in report["decode"]["runtime"]


GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
             "gemma3_text": "gemma3", "phi3": "phi3", "gpt2": "gpt2"}


def _gguf_tensors(path) -> dict:
    """Every tensor of a GGUF file dequantized by gguf-py, as (rows, cols) or (n,), in the file's row order."""
    import gguf
    import numpy as np

    out = {}
    for t in gguf.GGUFReader(path).tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        out[t.name] = w.reshape([int(n) for n in reversed(t.shape)]) if len(t.shape) > 1 else w.reshape(-1)
    return out


@pytest.mark.parametrize("arch", list(GGUF_ARCH))
def test_gguf_export_reads_back(arch, arch_models, tmp_path):
    """The GGUF holds every compressed weight (rows in llama.cpp's order), every norm with the gain its module
    really applies (Gemma's 1 + w), names llama.cpp's architecture reads, and its hyper-parameters."""
    import gguf
    import numpy as np

    from squash.io.gguf_arch import ARCHS, allowed_tensors, rope_permutation
    from squash.io.gguf_export import export_gguf
    from squash.layers import rms_gain

    model = squash.load(arch_models[arch])
    small = squash.compress(model, squash.load_recipe("int8"))
    out = tmp_path / "m.gguf"
    report = export_gguf(small, out)
    fields = gguf.GGUFReader(out).fields
    name = GGUF_ARCH[arch]
    assert fields["general.architecture"].contents() == name
    cfg = small.module.config
    assert fields[f"{name}.block_count"].contents() == cfg.num_hidden_layers
    assert fields[f"{name}.embedding_length"].contents() == cfg.hidden_size
    if arch.startswith("gemma"):
        pattern = fields[f"{name}.attention.sliding_window_pattern"].contents()
        assert pattern == [t == "sliding_attention" for t in cfg.layer_types]
    got = _gguf_tensors(out)
    stems = allowed_tensors(ARCHS[small.config["hf_config"]["model_type"]])
    assert all(".".join(p for p in n.split(".")[:-1] if not p.isdigit() and p != "blk") in stems for n in got)
    written = {t["source"]: t["name"] for t in report["tensors"]}
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    for source, ct in small.tensors.items():
        w = got[written[source]]
        if ARCHS[small.config["hf_config"]["model_type"]].interleave_qk:
            for key, n in ((".attn_q.", heads), (".attn_k.", kv)):
                if key in written[source]:
                    w = w[np.argsort(rope_permutation(w.shape[0], n))]  # back to transformers' row order
        want = ct.dequantize().numpy()
        assert w.shape == want.shape, source
        rel = np.sqrt(((w - want) ** 2).sum() / (want**2).sum())
        assert rel <= 1e-3, (source, rel)  # int8 codes fit Q8_0: only the fp16 scale rounds
    norms = 0
    for mod_name, mod in small.module.named_modules():
        g = rms_gain(mod)
        if g is not None and f"{mod_name}.weight" in written:
            np.testing.assert_allclose(got[written[f"{mod_name}.weight"]], g.numpy(), rtol=1e-6, atol=1e-6)
            norms += 1
    assert norms >= (0 if arch == "gpt2" else 2 * cfg.num_hidden_layers + 1)


@pytest.mark.parametrize("arch", list(GGUF_ARCH))
def test_llama_cpp_runs_the_gguf_like_squash(arch, arch_models, tmp_path):
    """llama.cpp's logits on the export match squash's forward (F32 weights: the format, not the rounding).
    Needs llama-cpp-python (bench/setup.sh); 30 tokens, inside the 32-token sliding windows."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from squash.io.gguf_export import export_gguf
    from test_gguf_export import load_llama

    source = arch_models[arch]
    if arch == "phi3":  # llama.cpp gives a model *named* phi3 Phi-3's special tokens, which this vocabulary lacks
        source = shutil.copytree(source, tmp_path / "tiny-p3")
    small = squash.compress(squash.load(source), squash.load_recipe("int8"))
    out = tmp_path / "m.gguf"
    export_gguf(small, out, target="f32")
    ids = small.tokenizer(TEXT)["input_ids"][:30]
    with torch.inference_mode():
        want = torch.log_softmax(small.module(torch.tensor([ids])).logits[0].double(), -1).numpy()
    llm = load_llama(llama_cpp, out, n_ctx=64, type_k=0, type_v=0)  # a float32 KV cache (GGML_TYPE_F32)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    got = logits - logits.max(-1, keepdims=True)
    got = got - np.log(np.exp(got).sum(-1, keepdims=True))
    assert np.abs(got - want).max() < 2e-3, np.abs(got - want).max()


def test_gguf_export_refuses_what_llama_cpp_cannot_run(arch_models, tmp_path):
    from squash import SquashError
    from squash.io.gguf_export import export_gguf

    small = squash.compress(squash.load(arch_models["opt"]), squash.load_recipe("int8"))
    with pytest.raises(SquashError, match="model_type .*'opt'"):
        export_gguf(small, tmp_path / "opt.gguf")
    assert not list(tmp_path.iterdir())
