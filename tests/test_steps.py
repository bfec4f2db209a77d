"""Steps 1-3 against float references: each method's error against the math's bound or the plain baseline."""
import pytest
import torch

from squash import load_squash, save
from squash.models import load
from squash.recipe import Recipe, compress
from squash.steps import LowRank, Outliers, Quantize, lowrank, outliers, quantize
from squash.steps.normalize import hqq_zero, scale_zero
from squash.steps.quantize import grid_levels
from squash.tensor import to_blocks


@pytest.fixture(scope="module")
def layer():
    """A real layer and its calibration statistics: minilm-l6's first FFN input projection, H = Σ xᵀx from
    calibration text (captured once, in float)."""
    from squash.calibrate import calibration_batches, hessians

    model = load("minilm-l6")
    lin = model.module.encoder.layer[0].intermediate.dense
    batches = calibration_batches(model, samples=8)

    def run():
        with torch.inference_mode():
            for b in batches[:4]:
                model.module(**b)

    h = hessians(run, {"ffn": lin})["ffn"]
    x_probe = torch.linalg.cholesky(h + 1e-3 * torch.eye(h.shape[0]))  # ‖E·L‖² = tr(E·H·Eᵀ)
    return lin.weight.detach().clone(), h, x_probe


def out_err(w, w_hat, h):
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) = ‖(W − Ŵ)X‖², the layer's output error on the calibration inputs."""
    e = (w - w_hat).double()
    return ((e @ h.double()) * e).sum().item()


def test_gptq_beats_round_to_nearest_on_a_real_layer(layer):
    w, h, _ = layer
    for bits in (3, 4):
        base = dict(bits=bits, block=64, symmetric=False, zero_dtype="int", scale_dtype="float16")
        rtn = out_err(w, quantize(w, Quantize(**base)).dequantize(), h)
        gptq = out_err(w, quantize(w, Quantize(**base, rounding="gptq"), None, h).dequantize(), h)
        gptq_ao = out_err(w, quantize(w, Quantize(**base, rounding="gptq", act_order=True), None, h).dequantize(), h)
        assert gptq < 0.8 * rtn, (bits, gptq, rtn)
        assert gptq_ao < 0.8 * rtn, (bits, gptq_ao, rtn)


CODES_AGREE = 0.995  # C++ and Python GPTQ loops: float32 sums in another order can flip a rounding tie, whose
#                       error then feeds the row's later columns; the output error must agree to 1%


@pytest.mark.parametrize("cfg", [dict(bits=4, block=64, symmetric=False, zero_dtype="int", scale_dtype="float16"),
                                 dict(bits=4, block=64, symmetric=False, act_order=True, clip="mse"),
                                 dict(bits=3, block=32, symmetric=True), dict(bits=8, block="channel"),
                                 dict(bits=4, block=256, symmetric=False)])
def test_gptq_column_loop_in_cpp_matches_python(layer, cfg, monkeypatch):
    import importlib

    from squash.runtime import kernels

    qmod = importlib.import_module("squash.steps.quantize")  # the module (squash.steps.quantize is also a function)
    if not kernels.available():
        pytest.skip("no C++ kernel here")
    w, h, _ = layer
    w = w[:200]  # rows are independent in the loop: a slice keeps the test short
    fast = quantize(w, Quantize(**cfg, rounding="gptq"), None, h)
    monkeypatch.setattr(qmod, "USE_KERNEL", False)
    slow = quantize(w, Quantize(**cfg, rounding="gptq"), None, h)
    agree = (fast.codes == slow.codes).float().mean().item()
    assert agree >= CODES_AGREE, agree
    e_fast, e_slow = out_err(w, fast.dequantize(), h), out_err(w, slow.dequantize(), h)
    assert abs(e_fast - e_slow) <= 0.01 * e_slow, (e_fast, e_slow)


def test_calibration_weighted_clipping_beats_absmax(layer):
    w, h, _ = layer
    base = dict(bits=3, block=64, symmetric=False)
    plain = out_err(w, quantize(w, Quantize(**base)).dequantize(), h)
    mse = out_err(w, quantize(w, Quantize(**base, clip="mse"), None, h).dequantize(), h)
    assert mse < plain


def test_clip_search_without_data_lowers_weight_error():
    w = torch.randn(64, 256) * torch.rand(64, 1)
    w[0, 0] = 2.0  # an outlier widens one group's range
    for sym in (True, False):
        plain = quantize(w, Quantize(bits=3, block=32, symmetric=sym)).dequantize()
        mse = quantize(w, Quantize(bits=3, block=32, symmetric=sym, clip="mse")).dequantize()
        assert (w - mse).pow(2).sum() < (w - plain).pow(2).sum()


def test_hqq_zero_never_raises_the_l1_error():
    w = torch.randn(32, 128) ** 3
    blocks = to_blocks(w, (1, 64))
    s, z = scale_zero(blocks, 3, symmetric=False)
    z_opt = hqq_zero(blocks, s, z, 3)

    def l1(zz):
        q = torch.clamp(torch.round(blocks / s[..., None] + zz[..., None]), 0, 7)
        return (blocks - s[..., None] * (q - zz[..., None])).abs().sum(-1)

    assert (l1(z_opt) <= l1(z) + 1e-6).all() and l1(z_opt).sum() < l1(z).sum()
    ct = quantize(w, Quantize(bits=3, block=64, symmetric=False, clip="hqq"))
    assert (w - ct.dequantize()).abs().sum() < (w - quantize(w, Quantize(bits=3, block=64, symmetric=False)).dequantize()).abs().sum()


def test_activation_aware_scaling_is_inverted_exactly(layer):
    w, h, _ = layer
    cfg = Quantize(bits=4, block=64, symmetric=False, act_scale=True)
    ct = quantize(w, cfg, None, h)
    assert ct.col_scale is not None and ct.col_scale.dtype == torch.float16
    # Ŵ = s·(c − z)·diag(r): dividing r back out gives a tensor on the plain grid
    plain_part = ct.dequantize() / ct.col_scale.float()
    ct.col_scale = None
    assert torch.allclose(plain_part, ct.dequantize(), rtol=1e-5, atol=1e-7)
    scaled = out_err(w, quantize(w, cfg, None, h).dequantize(), h)
    plain = out_err(w, quantize(w, Quantize(bits=4, block=64, symmetric=False)).dequantize(), h)
    assert scaled <= plain * 1.001  # α = 0 is a candidate: never worse than no scaling (up to float16 of r)


@pytest.mark.parametrize("kind,bits", [("nf", 4), ("nf", 3), ("log", 4), ("log", 3)])
def test_custom_grids_are_indexed_by_codes(kind, bits):
    g = grid_levels(kind, bits)
    assert g.numel() == 2**bits and torch.all(g[1:] >= g[:-1]) and g.min() == -1 and g.max() == 1
    assert (g == 0).any()  # zero is exact on both grids
    w = torch.randn(16, 64)
    ct = quantize(w, Quantize(bits=bits, block=32, grid=kind))
    s = ct.scale.repeat_interleave(32, dim=1)
    ratio = ct.dequantize() / s
    assert torch.allclose(ratio, g[ct.codes.long()], atol=1e-6)  # every value is s·G[c]
    # nearest level: no other level is closer to w/s
    dist = (w / s)[..., None] - g
    assert torch.allclose(dist.abs().min(-1).values, (w / s - ratio).abs(), atol=1e-6)


def test_nf4_beats_uniform_on_normal_weights_and_log_suits_heavy_tails():
    torch.manual_seed(0)
    normal = torch.randn(256, 256)
    uni = quantize(normal, Quantize(bits=4, block=64)).dequantize()
    nf = quantize(normal, Quantize(bits=4, block=64, grid="nf")).dequantize()
    assert (normal - nf).pow(2).sum() < (normal - uni).pow(2).sum()
    heavy = torch.randn(256, 256).sign() * torch.exp(torch.randn(256, 256))  # log-normal magnitudes
    uni = quantize(heavy, Quantize(bits=4, block=64)).dequantize()
    log = quantize(heavy, Quantize(bits=4, block=64, grid="log")).dequantize()
    rel = lambda a: ((heavy - a).abs() / heavy.abs()).median()  # noqa: E731
    assert rel(log) < rel(uni)


def test_low_rank_correction_error_falls_as_rank_grows(layer):
    w, h, _ = layer
    q = Quantize(bits=3, block=64, symmetric=False)
    errs = []
    for rank in (1, 4, 16, 64):
        ct = lowrank(w, LowRank(rank=rank), quantize(w, q), h)
        assert ct.u.shape == (w.shape[0], rank)
        errs.append(out_err(w, ct.dequantize(), h))
    base = out_err(w, quantize(w, q).dequantize(), h)
    assert base > errs[0] > errs[1] > errs[2] > errs[3]


def test_truncated_svd_keeps_the_energy_asked_for():
    torch.manual_seed(0)
    w = torch.randn(128, 16) @ torch.randn(16, 96) + 0.01 * torch.randn(128, 96)  # nearly rank 16
    ct = lowrank(w, LowRank(energy=0.99))
    assert ct.codes is None and ct.extra["rank"] <= 16
    rel = (w - ct.dequantize()).pow(2).sum() / w.pow(2).sum()
    assert rel <= 0.01 + 1e-3
    assert ct.stored_bytes() < 4 * w.numel()


def test_outliers_are_kept_exactly_and_help():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    idx = torch.randperm(w.numel())[:40]
    w.view(-1)[idx] = 1.0  # far outside the bulk
    q = Quantize(bits=3, block=64)
    ct = quantize(w, q, outliers(w, Outliers(fraction=0.005)))
    assert set(ct.sparse_index.tolist()) >= set(idx.tolist())
    assert torch.allclose(ct.dequantize().view(-1)[idx], w.view(-1)[idx], atol=1e-3)
    plain = quantize(w, q).dequantize()
    assert (w - ct.dequantize()).pow(2).sum() < 0.5 * (w - plain).pow(2).sum()


def test_w8a8_rounds_activations_per_token(digits):
    from squash.runtime.modules import quantize_activations

    x = torch.randn(5, 40) * torch.logspace(-2, 2, 5)[:, None]  # tokens of very different size
    xq = quantize_activations(x, 8)
    s = x.abs().amax(-1, keepdim=True) / 127
    assert ((x - xq).abs() <= s / 2 + 1e-7).all()
    from squash import load_recipe

    w8 = compress(digits, load_recipe("int8"))
    a8 = compress(digits, load_recipe("w8a8"))
    x = torch.rand(16, 1, 8, 8)
    ref = digits.module(x)
    assert not torch.equal(a8.module(x), w8.module(x))  # activations are really rounded
    assert torch.allclose(a8.module(x), ref, atol=0.05 * ref.abs().max())


def test_every_encoding_round_trips_through_the_file(tmp_path, digits):
    recipe = Recipe([Outliers(fraction=0.01), Quantize(bits=3, block=16, symmetric=False, zero_dtype="int",
                                                       scale_dtype="float16", rounding="gptq", act_scale=True),
                     LowRank(rank=2)])
    small = compress(digits, recipe)
    nf = compress(digits, Recipe([Quantize(bits=4, block=32, grid="nf")]))
    for model in (small, nf):
        path = save(model, tmp_path / "m.squash")
        back = load_squash(path)
        for name, ct in model.tensors.items():
            for f in ct.ARRAYS:
                a, b = getattr(ct, f), getattr(back.tensors[name], f)
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (name, f)
        x = torch.rand(4, 1, 8, 8)
        assert torch.equal(back.module(x), model.module(x))


def test_calibration_inputs_carry_no_growing_cache():
    """Re-running a block on captured inputs must not see keys and values of earlier runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from squash.calibrate import block_inputs, first_output

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    batches = [{"input_ids": torch.randint(0, 64, (1, 6)), "use_cache": False}]
    (args, kwargs), = block_inputs(model, model.model.layers[0], batches)
    block = model.model.layers[0]
    with torch.inference_mode():
        a = first_output(block(*args, **kwargs))
        b = first_output(block(*args, **kwargs))
    assert torch.equal(a, b)
    assert all(v is None for k, v in kwargs.items() if "past_key" in k)


def test_layers_the_data_never_reaches_fall_back_to_rounding(digits):
    from squash import load_recipe

    small = compress(digits, load_recipe("int4"), calib=[])
    w = digits.module.fc1.weight
    assert small.tensors["fc1.weight"].dequantize().abs().sum() > 0.5 * w.abs().sum()  # not zeroed as "dead"


def test_svd_rank_from_a_size_target():
    w = torch.randn(96, 160)
    ct = lowrank(w, LowRank(bits_per_weight=2.0))
    assert ct.extra["rank"] == int(2.0 * 96 * 160 / (16 * (96 + 160)))
    assert ct.bits_per_weight() <= 2.0


@pytest.mark.parametrize("cfg", [Quantize(bits=4, block=16, grid="nf"), Quantize(bits=3, block=16, symmetric=False,
                                                                                  zero_dtype="fixed8")])
def test_embedding_lookup_matches_the_dequantized_table(cfg):
    from squash.runtime.modules import CompressedWeight, QEmbedding

    table = torch.randn(50, 40)
    ct = quantize(table, cfg)
    ct.col_scale = (torch.rand(40) + 0.5).half()
    emb = QEmbedding(CompressedWeight(ct), None)
    ids = torch.tensor([[0, 7, 49], [3, 3, 12]])
    assert torch.allclose(emb(ids), ct.dequantize()[ids], atol=1e-6)
