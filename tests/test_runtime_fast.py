"""The fast runtime: squash's kernel against the dequantize-then-matmul reference, packing, the LLaMA decoder.

Tolerances: the kernel accumulates in float32 in a different order from the reference (float64 here), so
|y − y_ref| ≤ 1e-5·max|y_ref| for K ≤ 2048 (float32 rounding grows like √K·2⁻²⁴ relative to the terms);
whole models are compared at 1e-4 of the largest logit (errors pass through 2–30 layers).
"""
import pytest
import torch

import squash
from squash.recipe import Recipe
from squash.runtime import kernels
from squash.runtime.modules import QEmbedding, QLinear
from squash.runtime.packed import (PackedEmbedding, PackedLinear, PackedWeight, accelerate, dequantize_rows, pack,
                                   pack_nibbles, packed_matmul, unpack_nibbles, why_not_packable)
from squash.steps import Codebook, LowRank, Outliers, Prune, Quantize, codebook, lowrank, outliers, prune, quantize

KERNEL_RTOL = 1e-5
MODEL_RTOL = 1e-4
INT8_X_RTOL = 3e-2  # int8 activations per 32-chunk: each x off by ≤ 1/254 of its chunk's largest value


def _close(y, ref, rtol):
    err = float((y.double() - ref.double()).abs().max())
    assert err <= rtol * float(ref.abs().max()), f"max error {err:.3g} vs max |ref| {float(ref.abs().max()):.3g}"


def _random_packed(bits, N, K, block, per_row_grid=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 2**bits, (N, K), dtype=torch.uint8, generator=g)
    nb = -(-K // block)
    s = torch.rand(N, nb, generator=g) + 0.1
    z = torch.rand(N, nb, generator=g) * 2**bits
    grid = None if bits == 8 else torch.randn(N if per_row_grid else 1, 16, generator=g)
    return PackedWeight((N, K), bits, c if bits == 8 else pack_nibbles(c), grid, s, z, min(block, K)), c


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M,N,K,block", [(1, 37, 576, 64), (3, 50, 576, 128), (9, 20, 100, 32), (1, 8, 1536, 1536),
                                         (17, 33, 70, 64), (2, 1, 31, 31), (8, 5, 2048, 128)])
def test_kernel_matches_reference_on_random_codes(bits, M, N, K, block):
    pw, _ = _random_packed(bits, N, K, block, per_row_grid=(N % 2 == 1))
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    ref = x.double() @ dequantize_rows(pw, torch.arange(N)).double().T
    _close(packed_matmul(x, pw), ref, KERNEL_RTOL)                 # AVX-512, or AVX2 where the CPU has no AVX-512
    _close(packed_matmul(x, pw, vector=False), ref, KERNEL_RTOL)   # the scalar loop


def test_kernel_refuses_bad_layouts():
    pw, _ = _random_packed(4, 4, 128, 32)
    x = torch.randn(1, 128)
    with pytest.raises(RuntimeError, match="block"):
        kernels.qmatmul(x, pw.codes, 4, pw.grid, pw.scale[:, :2].contiguous(), pw.zero[:, :2].contiguous(), 48)
    with pytest.raises(RuntimeError, match="bytes a row"):
        kernels.qmatmul(torch.randn(1, 96), pw.codes, 4, pw.grid, pw.scale, pw.zero, 32)


def test_nibble_packing_round_trips():
    c = torch.randint(0, 16, (5, 77), dtype=torch.uint8)
    p = pack_nibbles(c)
    assert p.shape == (5, 48)  # 77 codes → 3 chunks of 32 → 48 bytes
    assert torch.equal(unpack_nibbles(p, 77), c)


def _rounded_x(x):
    """x rounded to int8 per 32-chunk, as the int8-activation kernel sees it: d = max|x|/127, q = round(x/d)."""
    M, K = x.shape
    xc = x.reshape(M, K // 32, 32)
    d = xc.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(xc / d), torch.zeros(()))
    return (q * d).reshape(M, K), q.reshape(M, K).to(torch.int8)


needs_vnni = pytest.mark.skipif(not kernels.has_vnni(), reason="no AVX-512 VNNI on this CPU")


@needs_vnni
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("M,N,K,block", [(1, 37, 576, 64), (3, 50, 576, 128), (5, 20, 96, 32), (1, 8, 1536, 1536),
                                         (9, 33, 64, 64), (4, 7, 160, 96), (2, 9, 576, 32), (7, 40, 1024, 256)])
def test_int8_activation_kernel_matches_its_formula(bits, symmetric, M, N, K, block):
    pw, _ = _random_packed(bits, N, K, block)
    pw.grid = None if bits == 8 else torch.arange(16.0)[None]  # uniform codes: G[c] = c
    if symmetric:
        pw.zero = torch.tensor([2.0 ** (bits - 1)])
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
    x[0, :32] = 0  # a chunk of zeros: d = 0
    xr, q = _rounded_x(x)
    w = dequantize_rows(pw, torch.arange(N)).double()
    y = kernels.qmatmul_i8(x, pw.codes, bits, pw.scale, pw.zero, pw.block)
    _close(y, xr.double() @ w.T, KERNEL_RTOL)                # the same products, summed in another order
    _close(y, x.double() @ w.T, INT8_X_RTOL)                 # and what the rounding of x costs
    assert torch.equal(kernels.extension().quantize_chunks(x, pw.block)[0], q)  # the same rounding, to the bit
    pw.int8_activations = True
    _close(packed_matmul(x, pw), y, 1e-6)                    # packed_matmul takes this path for few tokens


def test_int8_activations_only_where_the_kernel_fits():
    from squash.runtime.packed import int8_activations_ok

    w = torch.randn(16, 96)
    assert int8_activations_ok(pack(quantize(w, Quantize(bits=4, block=32, symmetric=False)))) == kernels.has_vnni()
    assert not int8_activations_ok(pack(quantize(w, Quantize(bits=4, block=32, grid="nf"))))  # not G[c] = c
    assert not int8_activations_ok(pack(quantize(torch.randn(16, 80), Quantize(bits=8, block="channel"))))  # K


@pytest.mark.skipif(not kernels.available() or not kernels.extension().has_avx512(), reason="no AVX-512")
@pytest.mark.parametrize("T,pos", [(1, 150), (3, 40), (5, 0), (1, 0)])
def test_decode_attention_matches_pytorch(T, pos):
    from squash.runtime.llama import _attention

    g = torch.Generator().manual_seed(T + pos)
    q, kc, vc = torch.randn(9, T, 64, generator=g), torch.randn(3, 200, 64, generator=g), torch.randn(3, 200, 64, generator=g)
    ref = _attention(q, kc[:, :pos + T], vc[:, :pos + T], T, pos).transpose(0, 1).reshape(T, -1)
    _close(kernels.extension().attend(q, kc, vc, pos), ref, KERNEL_RTOL)


# ------------------------------------------------------------ real compressed tensors


def _weights(digits):
    """Real weights: the digits CNN's first dense layer, plus a random matrix with odd sizes."""
    fc = dict(digits.module.named_parameters())
    real = next(p for n, p in fc.items() if p.dim() == 2 and p.shape[1] >= 64).detach().float()
    return {"real": real, "random": torch.randn(45, 200, generator=torch.Generator().manual_seed(3))}


CASES = {
    "int8-channel": lambda w: quantize(w, Quantize(bits=8, block="channel")),
    "int8-g32-asym": lambda w: quantize(w, Quantize(bits=8, block=32, symmetric=False)),
    "int4-g64-intzero": lambda w: quantize(w, Quantize(bits=4, block=64, symmetric=False, zero_dtype="int",
                                                       scale_dtype="float16")),
    "int3-g32": lambda w: quantize(w, Quantize(bits=3, block=32, symmetric=False)),
    "int6-channel": lambda w: quantize(w, Quantize(bits=6, block="channel", symmetric=False)),
    "nf4-g64": lambda w: quantize(w, Quantize(bits=4, block=64, grid="nf")),
    "codebook4-row": lambda w: codebook(w, Codebook(bits=4, scope="row")),
    "int4+outliers+lowrank": lambda w: lowrank(w, LowRank(rank=4),
                                               quantize(w, Quantize(bits=4, block=32), outliers(w, Outliers(0.01)))),
    "int4-tensor": lambda w: quantize(w, Quantize(bits=4, block="tensor")),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("which", ["real", "random"])
def test_packed_linear_matches_reference_module(digits, case, which):
    w = _weights(digits)[which]
    ct = CASES[case](w)
    if why_not_packable(ct):
        pytest.skip(f"not packable: {why_not_packable(ct)}")
    from squash.runtime.modules import CompressedWeight

    bias = torch.randn(w.shape[0])
    ref_mod = QLinear(CompressedWeight(ct), bias)
    fast = PackedLinear(pack(ct), bias)
    for M in (1, 5, 12):
        x = torch.randn(M, w.shape[1], generator=torch.Generator().manual_seed(M))
        _close(fast(x), ref_mod(x), KERNEL_RTOL)
    _close(dequantize_rows(pack(ct), torch.arange(w.shape[0])), ct.dequantize(), 1e-6)


def test_masked_and_grouped_oddly_tensors_stay_on_the_reference_path():
    w = torch.randn(16, 96)
    assert "mask" in why_not_packable(quantize(w, Quantize(bits=8), prune(w, Prune(0.5))))
    assert "group of 48" in why_not_packable(quantize(w, Quantize(bits=4, block=48)))
    assert why_not_packable(quantize(w, Quantize(bits=8, block=40))) == "group of 40 (the kernel needs a multiple of 16 or whole rows)"
    assert why_not_packable(quantize(w, Quantize(bits=8, block=48))) is None


# ------------------------------------------------------------ whole models


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("recipe", ["int8", "rtn4", "nf4"])
def test_accelerated_llama_matches_reference_and_decoder_matches_transformers(tmp_path, recipe):
    from squash.runtime.llama import Decoder

    small = squash.compress(_tiny_llama(), squash.load_recipe(recipe))
    ids = torch.randint(128, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = small.module(ids).logits[0]
    report = accelerate(small.module, int8_activations=False)  # x stays float32: the exact path
    assert report and all(v.startswith("packed") for v in report.values()), report
    assert not any(isinstance(m, (QLinear, QEmbedding)) for m in small.module.modules())
    assert isinstance(small.module.model.embed_tokens, PackedEmbedding)
    with torch.inference_mode():
        _close(small.module(ids).logits[0], ref, MODEL_RTOL)
    dec = Decoder(small.module, max_len=64)
    _close(dec.forward(ids[0], 0, last_only=False), ref, MODEL_RTOL)
    plain = Decoder(small.module, max_len=64)  # the fused C++ steps against plain PyTorch calls
    _close(plain.forward(ids[0], 0, last_only=False, fused=False), ref, MODEL_RTOL)
    _close(plain.forward(ids[0, :3], 20, fused=False), dec.forward(ids[0, :3], 20), MODEL_RTOL)
    dec2 = Decoder(small.module, max_len=64)  # the cache: prefill 12, then one at a time, then 3 at once
    dec2.forward(ids[0, :12], 0)
    for t in range(12, 17):
        _close(dec2.forward(ids[0, t:t + 1], t)[0], ref[t], MODEL_RTOL)
    _close(dec2.forward(ids[0, 17:20], 17, last_only=False), ref[17:20], MODEL_RTOL)
    # with int8 activations (the default where the CPU has VNNI), decoding steps round x per 32-chunk
    rounded = squash.compress(_tiny_llama(), squash.load_recipe(recipe))
    accelerate(rounded.module)
    dec3 = Decoder(rounded.module, max_len=64)
    dec3.forward(ids[0, :12], 0)
    steps = torch.stack([dec3.forward(ids[0, t:t + 1], t)[0] for t in range(12, 20)])
    _close(steps, ref[12:20], INT8_X_RTOL)


def test_decoder_generates_what_transformers_generates():
    from squash.runtime.llama import Decoder

    model = _tiny_llama(seed=1)
    ids = torch.randint(128, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=15, do_sample=False,
                            pad_token_id=0)[0, 7:].tolist()
    ours, timing = Decoder(model, max_len=64).generate(ids[0], 15)
    assert ours == hf
    assert timing.decode_tokens == 14 and timing.prefill_tokens == 7
    with torch.inference_mode():
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=15, do_sample=False,
                            repetition_penalty=1.3, pad_token_id=0)[0, 7:].tolist()
    assert Decoder(model, max_len=64).generate(ids[0], 15, repetition_penalty=1.3)[0] == hf


def test_load_packed_drops_unpacked_codes(tmp_path):
    from squash.runtime.packed import load_packed

    from squash.models import Model

    module = _tiny_llama()
    hf = {k: v for k, v in module.config.to_dict().items() if not k.startswith("_")}
    model = Model(module=module, kind="causal-lm", name="tiny", config={"hf_config": hf})
    small = squash.compress(model, Recipe([Quantize(bits=4, block=32)]))
    path = tmp_path / "tiny.squash"
    squash.save(small, path)
    fast = load_packed(path)
    assert fast.runtime and all(v == "packed 4-bit" for v in fast.runtime.values())
    assert not fast.tensors  # every tensor lives packed
    held = {id(m.pw): m.pw.nbytes() for m in fast.module.modules() if isinstance(m, (PackedLinear, PackedEmbedding))}
    params = sum(ct.numel for ct in small.tensors.values())
    assert sum(held.values()) < 0.75 * params  # 4 bits a code + scales: well under a byte a weight


def test_w8a8_layers_run_on_int8_matmul_and_match_the_reference():
    from squash.runtime.modules import CompressedWeight
    from squash.runtime.packed import PackedW8A8Linear

    w = torch.randn(70, 96)
    ct = quantize(w, Quantize(bits=8, block="channel", activations=8))
    ref = QLinear(CompressedWeight(ct), torch.randn(70))
    fast = PackedW8A8Linear(ct, ref.bias)
    for M in (1, 3, 40):
        x = torch.randn(2, M, 96)
        # same integer products; only the float32 order of the final scaling differs
        _close(fast(x), ref(x), KERNEL_RTOL)
        # the fused C++ rounding and scaling do the PyTorch formula's float32 operations in its order: to the bit
        assert torch.equal(fast(x), fast(x, fused=False))
    ext = kernels.extension()
    for K in (1, 17, 96, 385):  # tails of the 16-lane loop; a row of zeros; a row with a tie at .5
        x = torch.randn(5, K)
        x[1] = 0
        x[2, 0], x[2, -1] = 127.0, 0.5
        for vector in (True, False):
            q, sx = ext.quantize_rows(x, vector)
            ref_sx = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
            assert torch.equal(sx, ref_sx)
            assert torch.equal(q, torch.clamp(torch.round(x / ref_sx), -127, 127).to(torch.int8))
            acc = torch.randint(-2**20, 2**20, (5, K), dtype=torch.int32)
            sw, b = torch.rand(K), torch.randn(K)
            # written over acc: the reference is taken first
            ref, ref_nobias = acc.float() * sx * sw + b, acc.float() * sx * sw
            assert torch.equal(ext.scale_int32(acc.clone(), sx, sw, b, vector, False), ref)
            assert torch.equal(ext.scale_int32(acc.clone(), sx, sw, torch.empty(0), vector, False), ref_nobias)
    net = torch.nn.Sequential(torch.nn.Linear(96, 70), torch.nn.ReLU(), torch.nn.Linear(70, 5))
    small = squash.compress(net, squash.load_recipe("w8a8"))
    x = torch.randn(4, 96)
    with torch.inference_mode():
        before = small.module(x)
        report = accelerate(small.module)
        _close(small.module(x), before, KERNEL_RTOL)
    assert set(report.values()) == {"int8×int8 matmul"}


GELU_TOL = 1e-6  # fused GELU: erf by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7), relative to max(1, |y|)


def test_gelu_fused_into_the_w8a8_output_pass():
    from torch.nn import functional as F

    from squash.runtime.packed import PackedW8A8Linear, fuse_gelu

    ext = kernels.extension()
    sx = torch.rand(6, 1) * 1e-4
    acc = torch.randint(-2**20, 2**20, (6, 333), dtype=torch.int32)
    acc[0, :5] = torch.tensor([0, 1, -1, 2**30, -2**30])  # zero, tiny, and far in both tails
    sw, b = torch.rand(333), torch.randn(333)
    ref = F.gelu(acc.double() * sx.double() * sw.double() + b.double())
    for vector in (True, False):
        y = ext.scale_int32(acc.clone(), sx, sw, b, vector, True)
        assert ((y.double() - ref).abs() <= GELU_TOL * ref.abs().clamp(min=1)).all()
    # in a BERT-shaped block: the intermediate layer's GELU moves into its W8A8 layer
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    bert = BertModel(cfg).eval()
    small = squash.compress(bert, squash.load_recipe("w8a8"))
    ids = torch.randint(0, 50, (3, 9))
    with torch.inference_mode():
        before = small.module(input_ids=ids).last_hidden_state
        report = accelerate(small.module)
        after = small.module(input_ids=ids).last_hidden_state
    fused = [n for n, how in report.items() if how.endswith("GELU fused")]
    assert fused == [f"encoder.layer.{i}.intermediate.dense" for i in range(2)]
    assert isinstance(small.module.encoder.layer[0].intermediate.intermediate_act_fn, torch.nn.Identity)
    _close(after, before, MODEL_RTOL)
    assert fuse_gelu(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())) == []  # float layers: untouched


def test_the_gpu_path_formula_matches_the_kernel():
    # No GPU here: the device path (rebuild Ŵ from the packed arrays where they live, then matmul) is run on
    # the CPU by calling it directly, so the formula it uses is checked even where no GPU is lent.
    from torch.nn import functional as F

    pw, _ = _random_packed(4, 40, 200, 64)
    x = torch.randn(3, 200)
    w = dequantize_rows(pw, torch.arange(40))
    _close(F.linear(x, w), packed_matmul(x, pw), KERNEL_RTOL)
    moved = PackedLinear(pw, None).to(torch.float32)  # a dtype-only .to keeps the packed arrays as they are
    assert moved.pw.codes.dtype == torch.uint8


@pytest.mark.parametrize("bits", [8, 4])
def test_many_tokens_take_the_tiled_path_and_match(bits):
    from squash.runtime import packed

    pw, _ = _random_packed(bits, 600, 200, 64, per_row_grid=True)
    x = torch.randn(packed.TILED_FROM + 3, 200)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(packed, "TILE_FLOATS", 256 * 200)  # 600 rows: three tiles, the last partial
    _close(packed_matmul(x, pw), x.double() @ dequantize_rows(pw, torch.arange(600)).double().T, KERNEL_RTOL)
    monkey.undo()  # and in one tile
    ref = x.double() @ dequantize_rows(pw, torch.arange(600)).double().T
    _close(packed_matmul(x, pw), ref, KERNEL_RTOL)
    _close(packed_matmul(x, pw, vector=False), ref, KERNEL_RTOL)
    tile = kernels.dequantize(200, pw.codes, bits, pw.grid, pw.scale, pw.zero, 64, 5, 17)
    _close(tile, dequantize_rows(pw, torch.arange(5, 17)), 1e-6)


@pytest.mark.parametrize("M", [1, 5, 20])  # the decode step, a few tokens, the tiled path
@pytest.mark.parametrize("col_scale", [False, True])
def test_outliers_are_added_by_the_kernel_in_every_path(M, col_scale):
    from dataclasses import replace

    from squash.runtime import packed

    w = torch.randn(300, 256, generator=torch.Generator().manual_seed(5))
    ct = quantize(w, Quantize(bits=4, block=64, symmetric=False), outliers(w, Outliers(0.01)))
    if col_scale:
        ct = replace(ct, col_scale=torch.rand(256, generator=torch.Generator().manual_seed(6)) + 0.5)
    ref = ct.dequantize().double()
    pw = pack(ct)
    assert pw.sparse_rows.numel() == ct.sparse_index.numel() > 0 and pw.sparse_cols.dtype == torch.int32
    assert bool((pw.sparse_rows[1:] >= pw.sparse_rows[:-1]).all())
    x = torch.randn(M, 256, generator=torch.Generator().manual_seed(M))
    _close(packed_matmul(x, pw), x.double() @ ref.T, KERNEL_RTOL)
    _close(packed_matmul(x, pw, vector=False), x.double() @ ref.T, KERNEL_RTOL)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(packed, "TILE_FLOATS", 128 * 256)  # three tiles, the last partial: outliers per tile
    _close(packed_matmul(x, pw), x.double() @ ref.T, KERNEL_RTOL)
    monkey.undo()
    if packed.int8_activations_ok(pw):
        pw.int8_activations = True
        _close(packed_matmul(x, pw), x.double() @ ref.T, INT8_X_RTOL)
    rows = torch.tensor([3, 3, 299, 0, 3])  # repeats, as token ids repeat in an embedding lookup
    _close(dequantize_rows(pw, rows), ref[rows], 1e-6)
    dense = ref - replace(ct, sparse_index=None, sparse_value=None).dequantize().double()  # S alone
    _close(packed._sparse_rows(pw, rows), dense[rows], 1e-6)  # the PyTorch (GPU) path


def test_fused_projections_keep_each_parts_outliers():
    from squash.runtime.packed import concat_packed

    g = torch.Generator().manual_seed(8)
    parts = [torch.randn(n, 128, generator=g) for n in (40, 24, 56)]
    cts = [quantize(w, Quantize(bits=4, block=64, symmetric=False), outliers(w, Outliers(0.02))) if i != 1
           else quantize(w, Quantize(bits=4, block=64, symmetric=False)) for i, w in enumerate(parts)]
    fused = concat_packed([pack(ct) for ct in cts])
    ref = torch.cat([ct.dequantize() for ct in cts]).double()
    for M in (1, 20):
        x = torch.randn(M, 128, generator=g)
        _close(packed_matmul(x, fused), x.double() @ ref.T, KERNEL_RTOL)


@pytest.mark.parametrize("M", [1, 3])
def test_sparse_pass_split_over_threads_keeps_rows_whole(M):
    # enough values for the threaded split (nnz·M ≥ 2¹⁶): each thread must own whole rows
    from squash.runtime.packed import to_sparse

    g = torch.Generator().manual_seed(9)
    N, K = 3000, 400
    index = torch.randperm(N * K, generator=g)[:90000]
    value = torch.randn(90000, generator=g)
    rows, cols, vals = to_sparse(index, value, N, K)
    dense = torch.zeros(N * K, dtype=torch.float64).index_add_(0, index, value.double()).reshape(N, K)
    x = torch.randn(M, K, generator=g)
    y = torch.ones(M, N)
    kernels.sparse_add(y, x, rows, cols, vals)
    _close(y, 1 + x.double() @ dense.T, KERNEL_RTOL)


def test_sparse_passes_refuse_bad_arrays():
    pw = pack(quantize(torch.randn(10, 64), Quantize(bits=4, block=64), outliers(torch.randn(10, 64), Outliers(0.05))))
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.sparse_into(torch.zeros(1, 64), pw, rows=torch.tensor([10]))
    with pytest.raises(RuntimeError, match="one per value"):
        kernels.sparse_add(torch.zeros(1, 10), torch.zeros(1, 64), pw.sparse_rows[:-1], pw.sparse_cols, pw.sparse_value)
    with pytest.raises(ValueError, match="outside the matrix"):
        from squash.runtime.packed import to_sparse
        to_sparse(torch.tensor([640]), torch.ones(1), 10, 64)


@pytest.mark.slow
@pytest.mark.parametrize("config", [Quantize(bits=8, block="channel"), Quantize(bits=4, block=128, symmetric=False),
                                    Quantize(bits=4, block=64, grid="nf")])
def test_kernel_on_smollm2_weights_with_ragged_groups(config):
    # Real LM weights: hidden size 576 is not a multiple of 128, so the last group of every row is 64 wide.
    model = squash.load("smollm2-135m")
    from squash.runtime.modules import CompressedWeight

    for name in ("model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
        w = model.module.get_submodule(name).weight.detach()
        ct = quantize(w, config)
        assert why_not_packable(ct) is None
        ref_mod, fast = QLinear(CompressedWeight(ct), None), PackedLinear(pack(ct), None)
        for M in (1, 7, 40):  # kernel, kernel with 7 tokens, tiled GEMM
            x = torch.randn(M, w.shape[1], generator=torch.Generator().manual_seed(M))
            _close(fast(x), ref_mod(x), KERNEL_RTOL)


def test_a_build_killed_midway_does_not_block_the_next_process():
    # PyTorch's extension loader waits forever on a lock file a killed build left in the folder
    import subprocess
    import sys

    kernels.extension()
    lock = kernels.build_dir() / "lock"
    lock.touch()
    try:
        done = subprocess.run([sys.executable, "-c", "from squash.runtime import kernels; print(kernels.available())"],
                              capture_output=True, text=True, timeout=300)
    finally:
        lock.unlink(missing_ok=True)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-500:]


CONV_CASES = {
    "int8-channel": lambda w: quantize(w, Quantize(bits=8, block="channel")),
    "int4-channel-asym": lambda w: quantize(w, Quantize(bits=4, block="channel", symmetric=False)),
    "int4+outliers": lambda w: quantize(w, Quantize(bits=4, block="channel"), outliers(w, Outliers(0.02))),
    "int8+lowrank": lambda w: lowrank(w, LowRank(rank=2), quantize(w, Quantize(bits=8, block="channel"))),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("conv", ["1d", "2d-groups", "2d-stride"])
def test_packed_conv_matches_the_reference_conv(case, conv):
    """A convolution on the packed runtime: Ŵ rebuilt by the kernel, then the same float convolution."""
    from torch import nn

    from squash.runtime.modules import CompressedWeight, QConv
    from squash.runtime.packed import PackedConv, full_weight

    torch.manual_seed(0)
    layer = {"1d": nn.Conv1d(6, 10, 5, padding=2), "2d-groups": nn.Conv2d(8, 12, 3, padding=1, groups=2),
             "2d-stride": nn.Conv2d(3, 16, 3, stride=2, bias=False)}[conv]
    ct = CONV_CASES[case](layer.weight.detach())
    assert why_not_packable(ct) is None
    ref = QConv(CompressedWeight(ct), layer.bias, layer)
    fast = PackedConv(pack(ct), ref)
    x = torch.randn((2, layer.in_channels, 17) if conv == "1d" else (2, layer.in_channels, 9, 11))
    with torch.inference_mode():
        _close(fast(x), ref(x), KERNEL_RTOL)
    # the GPU's formula (dequantize_rows: PyTorch operations) gives the kernel's Ŵ
    _close(dequantize_rows(fast.pw, torch.arange(fast.pw.shape[0])), full_weight(fast.pw), 1e-6)


def test_digits_cnn_runs_its_convolutions_packed(digits):
    """accelerate() packs a CNN's convolutions too; the model's outputs match the reference modules'."""
    import copy

    small = squash.compress(digits, squash.load_recipe("int8"))
    fast = copy.deepcopy(small.module)
    how = accelerate(fast, int8_activations=False)  # float activations: the linear layers' rounding is not tested here
    assert how["conv1"] == "packed 8-bit, convolution" and how["conv2"] == "packed 8-bit, convolution"
    x = torch.randn(7, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _close(fast(x), small.module(x), MODEL_RTOL)
