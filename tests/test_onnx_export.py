"""ONNX export: the weights stay integers in the file, and ONNX Runtime computes what squash's own compressed
model computes.

Tolerance: ONNX Runtime sees the same weights bit for bit (DequantizeLinear computes s·(c − z) exactly as squash
does; MatMulNBits dequantizes the same codes, scales and zero points), so the only differences are float32
rounding in a different accumulation order (its GEMM / MatMulNBits kernels against torch's), about 1e-7 relative
per product, growing a little through the layers: measured ≤ 5e-7 of the largest output here. The tests allow
1e-4 of the largest output (≈ 200× that), while a wrong scale, zero point or nibble order errs by 1e-2 or more.
"""
import dataclasses
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

import squash
from squash import Quantize, Recipe, SquashError
from squash.io.onnx_export import export_onnx, session_options

REL_TOL = 1e-4
INT_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Compression", "Weights stored as integers, not floats, "
         "and dequantized by the runtime on the fly."]


def session(path):
    return ort.InferenceSession(str(path), session_options(threads=2), providers=["CPUExecutionProvider"])


def assert_close(got, ref):
    ref = np.asarray(ref)
    diff = np.abs(got - ref).max()
    assert diff <= REL_TOL * np.abs(ref).max(), f"max abs diff {diff:.3e} vs max |ref| {np.abs(ref).max():.3e}"


def assert_integer_storage(path, info, model):
    """Every compressed tensor's codes are an integer initializer, and no float initializer has a compressed
    weight's shape (or its transpose): the float copies are gone."""
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    shapes, bases = set(), []
    for name, entry in info["tensors"].items():
        if entry["storage"].startswith("unused"):
            continue
        base = name.removesuffix(".weight")
        bases.append(base + ".")
        assert inits[base + ".codes"].data_type in INT_TYPES, (name, entry["storage"])
        rows, cols = model.tensors[name].matrix_shape
        shapes |= {tuple(entry["shape"]), (rows, cols), (cols, rows)}
    # float initializers other than the compressed tensors' own scales, zero points, outliers
    floats = {tuple(t.dims) for n, t in inits.items() if t.data_type in FLOAT_TYPES and not n.startswith(tuple(bases))}
    assert not shapes & floats, shapes & floats
    return proto


@pytest.fixture(scope="module")
def digits_x():
    from squash.digits import digits_split

    return digits_split()["x_test"]


@pytest.fixture(scope="module")
def digits_float_bytes(digits, tmp_path_factory):
    return export_onnx(digits, tmp_path_factory.mktemp("float") / "digits.onnx")["file_bytes"]


def run_digits(path, x):
    return session(path).run(["logits"], {"input": x.numpy()})[0]


def test_digits_int8(digits, digits_x, digits_float_bytes, tmp_path):
    small = squash.compress(digits, squash.load_recipe("int8"))
    info = export_onnx(small, tmp_path / "d.onnx")
    assert info["storage"] == {"int8-dq": 4} and not info["contrib_ops"]
    assert info["file_bytes"] == (tmp_path / "d.onnx").stat().st_size
    assert_integer_storage(tmp_path / "d.onnx", info, small)
    assert info["file_bytes"] < 0.3 * digits_float_bytes
    got = run_digits(tmp_path / "d.onnx", digits_x)
    with torch.inference_mode():
        ref = small.module(digits_x).numpy()
    assert_close(got, ref)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("int4", ["auto", "qdq", "uint8"])
def test_digits_int4_preset_reloaded(digits, digits_x, digits_float_bytes, tmp_path, int4):
    """The int4 preset (outliers + GPTQ, groups of 64, 4-bit zero points), written and read back as the cli's
    export verb would: fc1 (512 inputs) and conv2 (144 = 64 + 64 + 16, a ragged group) are compressed."""
    small = squash.compress(digits, squash.load_recipe("int4"))
    squash.save(small, tmp_path / "d.squash")
    loaded = squash.load_squash(tmp_path / "d.squash")
    info = export_onnx(loaded, tmp_path / "d.onnx", int4=int4)
    proto = assert_integer_storage(tmp_path / "d.onnx", info, loaded)
    assert info["tensors"]["fc1.weight"]["extras"] == ["sparse"]
    ops = {(n.domain, n.op_type) for n in proto.graph.node}
    if int4 == "auto":
        assert info["tensors"]["fc1.weight"]["storage"] == "matmulnbits-4"
        assert ("com.microsoft", "MatMulNBits") in ops
    else:
        assert not any(d == "com.microsoft" for d, _ in ops)  # standard operators only
        assert info["tensors"]["fc1.weight"]["storage"] == ("uint4-dq" if int4 == "qdq" else "uint8-dq")
    assert info["file_bytes"] < (0.3 if int4 != "uint8" else 0.4) * digits_float_bytes
    got = run_digits(tmp_path / "d.onnx", digits_x)
    with torch.inference_mode():
        ref = small.module(digits_x).numpy()
    assert_close(got, ref)


DIGITS_RECIPES = {
    # ragged groups of 48 (512 = 10·48 + 32) on blocks of 16 for MatMulNBits
    "g48": (Recipe(steps=(Quantize(bits=4, block=48, symmetric=False, zero_dtype="int"),)), "matmulnbits-4"),
    "sym4": (Recipe(steps=(Quantize(bits=4, block=32),)), "matmulnbits-4"),
    "int2": (Recipe(steps=(Quantize(bits=2, block=32, symmetric=False, zero_dtype="int"),)), "matmulnbits-2"),
    "rtn3": (squash.load_recipe("rtn3"), "matmulnbits-4"),
    "hqq": (Recipe(steps=(Quantize(bits=4, block=64, symmetric=False, clip="hqq"),)), "matmulnbits-4"),  # float z
    "tensor8": (Recipe(steps=(Quantize(bits=8, block="tensor", symmetric=False, zero_dtype="int"),)), "uint8-dq"),
    "w8a8": (squash.load_recipe("w8a8"), "int8-dq"),
    "nf4": (squash.load_recipe("nf4"), "uint8-codes-graph"),
    "int4-lowrank": (squash.load_recipe("int4-lowrank"), "matmulnbits-4"),
}


@pytest.mark.parametrize("name", sorted(DIGITS_RECIPES))
def test_digits_other_encodings(digits, digits_x, tmp_path, name):
    recipe, fc1_storage = DIGITS_RECIPES[name]
    small = squash.compress(digits, recipe)
    info = export_onnx(small, tmp_path / "d.onnx")
    assert info["tensors"]["fc1.weight"]["storage"] == fc1_storage
    assert_integer_storage(tmp_path / "d.onnx", info, small)
    got = run_digits(tmp_path / "d.onnx", digits_x)
    with torch.inference_mode():
        ref = small.module(digits_x).numpy()
    if name != "w8a8":
        assert_close(got, ref)
        return
    # w8a8 rounds activations too: an activation within float error of a rounding boundary may round one step
    # the other way in ONNX Runtime (seen: one image of 360 on a freshly trained digits-cnn, 1.8e-3 of max |logit|).
    # Nearly every image matches exactly; none moves by more than a few activation steps.
    per_image = np.abs(got - ref).max(1) / np.abs(ref).max()
    assert (per_image <= REL_TOL).mean() >= 0.99, np.sort(per_image)[-5:]
    assert per_image.max() <= 1e-2, per_image.max()


BERT_RECIPES = {
    "int8": (squash.load_recipe("int8"), 0.3, {"int8-dq"}),
    "4bit-g32": (Recipe(steps=(Quantize(bits=4, block=32, symmetric=False, zero_dtype="int", scale_dtype="float16"),)),
                 0.2, {"matmulnbits-4", "gatherblockquantized-4"}),
}


@pytest.mark.parametrize("name", sorted(BERT_RECIPES))
def test_small_bert(minilm_small, minilm, tmp_path, name):
    from squash.eval.quality import sentence_embeddings

    recipe, size_ratio, kinds = BERT_RECIPES[name]
    small = squash.compress(minilm_small, recipe)
    info = export_onnx(small, tmp_path / "b.onnx")
    float_bytes = export_onnx(minilm_small, tmp_path / "f.onnx")["file_bytes"]
    assert info["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert set(info["storage"]) == kinds | {"unused (not in the graph)"}  # the pooler feeds no output
    assert info["storage"]["unused (not in the graph)"] == 1
    assert_integer_storage(tmp_path / "b.onnx", info, small)
    assert info["file_bytes"] < size_ratio * float_bytes

    tok = minilm.tokenizer
    sess = session(tmp_path / "b.onnx")
    for texts in (TEXTS, TEXTS[:1]):  # dynamic batch and sequence length
        enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden, emb = sess.run(None, {k: v.numpy() for k, v in enc.items()})
        with torch.inference_mode():
            ref = small.module(**enc).last_hidden_state.numpy()
        assert_close(hidden, ref)
        ref_emb = sentence_embeddings(small.module, tok, texts, 128).numpy()
        assert_close(emb, ref_emb)


def test_refuses_a_causal_lm_and_writes_nothing(digits, minilm, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    minilm.tokenizer.save_pretrained(tmp_path / "llama")
    lm = squash.load(tmp_path / "llama")
    assert lm.kind == "causal-lm"
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SquashError, match="causal-lm"):
        export_onnx(squash.compress(lm, squash.load_recipe("int8")), out / "lm.onnx")
    with pytest.raises(SquashError, match="module"):
        export_onnx(dataclasses.replace(digits, kind="module"), out / "m.onnx")
    with pytest.raises(SquashError, match="int4"):
        export_onnx(digits, out / "d.onnx", int4="nibbles")
    with pytest.raises(SquashError, match="does not exist"):
        export_onnx(digits, out / "missing" / "d.onnx")
    assert list(out.iterdir()) == []  # nothing written, no temporary file left


@pytest.mark.slow
def test_minilm_int8(minilm, tmp_path, record_property):
    from squash.data import evaluation_text, paragraphs
    from squash.eval.quality import sentence_embeddings

    small = squash.compress(minilm, squash.load_recipe("int8"))
    info = export_onnx(small, tmp_path / "minilm.onnx")
    float_bytes = sum(p.numel() * 4 for p in minilm.module.parameters())
    record_property("onnx_file_bytes", info["file_bytes"])
    print(f"\nminilm-l6 int8 ONNX: {info['file_bytes']:,} bytes ({info['file_bytes'] / float_bytes:.1%} of the "
          f"float32 parameters), storage {info['storage']}")
    assert info["storage"]["int8-dq"] == len(small.tensors) - 1  # all but the unused pooler
    assert_integer_storage(tmp_path / "minilm.onnx", info, small)
    assert info["file_bytes"] < 0.27 * float_bytes

    texts = paragraphs(evaluation_text())[:32]
    tok = minilm.tokenizer
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    _, emb = session(tmp_path / "minilm.onnx").run(None, {k: v.numpy() for k, v in enc.items()})
    ref = sentence_embeddings(small.module, tok, texts, 128).numpy()
    cos = (emb * ref).sum(-1) / np.linalg.norm(emb, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.9999, cos.min()
    assert math.isclose(float(np.linalg.norm(emb, axis=-1).mean()), 1.0, rel_tol=1e-5)
