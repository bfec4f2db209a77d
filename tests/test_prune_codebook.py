"""Steps 4-6: pruning masks, structured pruning, k-means codebooks, entropy coding, fine-tuning."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import squash
from squash.entropy import decode, encode, entropy_bits, mask_nibbles, nibbles_to_mask
from squash.errors import RecipeError
from squash.recipe import Recipe
from squash.steps import Codebook, Entropy, Finetune, Prune, PruneChannels, Quantize, kmeans_1d
from squash.steps.channels import masked_forward_hooks, prune_channels
from squash.steps.finetune import held_out_loss, training_data


def weights(rows=48, cols=96, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def hessian(cols=96, seed=1):
    x = torch.randn(512, cols, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.1, 3, cols)
    return x.T @ x


# ---------------------------------------------------------------- prune


@pytest.mark.parametrize("score", ["magnitude", "activation", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_unstructured_mask_has_exactly_the_requested_sparsity(score, sparsity):
    w = weights()
    ct = Prune(sparsity=sparsity, score=score)(w, None, hessian())
    assert int((~ct.mask).sum()) == round(sparsity * w.numel())
    assert torch.all(ct.dequantize()[~ct.mask] == 0)


def test_row_scope_prunes_every_row_alike():
    ct = Prune(sparsity=0.5, scope="row", score="activation")(weights(), None, hessian())
    assert torch.all((~ct.mask).sum(1) == 48)


@pytest.mark.parametrize("score", ["magnitude", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_nm_mask_keeps_exactly_n_of_every_m(score, pattern):
    n, m = (int(x) for x in pattern.split(":"))
    ct = Prune(pattern=pattern, score=score)(weights(cols=96), None, hessian(96))
    groups = ct.mask.reshape(48, -1, m)
    assert torch.all(groups.sum(-1) == n)


def test_magnitude_prunes_the_smallest_weights():
    w = weights()
    ct = Prune(sparsity=0.5)(w, None)
    assert w.abs()[~ct.mask].max() <= w.abs()[ct.mask].min()


def test_sparsegpt_error_is_below_magnitude_pruning_on_the_layer_output():
    w, h = weights(), hessian()

    def out_err(ct):
        e = w - ct.dequantize()
        return torch.trace(e @ h @ e.T).item()

    assert out_err(Prune(0.5, score="sparsegpt")(w, None, h)) < 0.8 * out_err(Prune(0.5)(w, None, h))


def test_joint_prune_and_quantize_keeps_the_mask_and_beats_rounding_separately():
    w, h = weights(), hessian()
    pruned = Prune(0.5, score="sparsegpt")(w, None, h)
    joint = Quantize(bits=4, block=32, rounding="gptq")(w, pruned, h)
    separate = Quantize(bits=4, block=32)(w, pruned, h)
    assert torch.equal(joint.mask, pruned.mask) and torch.all(joint.dequantize()[~joint.mask] == 0)

    def out_err(ct):
        e = w - ct.dequantize()
        return torch.trace(e @ h @ e.T).item()

    assert out_err(joint) < out_err(separate)


def test_global_scope_uses_one_threshold_over_the_model(digits):
    small = squash.compress(digits, Recipe([Prune(0.8, scope="global")]))
    kept = torch.cat([ct.dequantize().reshape(-1) for ct in small.tensors.values()])
    pruned_total = sum(int((~ct.mask).sum()) for ct in small.tensors.values())
    assert pruned_total == round(0.8 * kept.numel())
    smallest_kept = min(float(ct.dequantize()[ct.mask.reshape(ct.shape)].abs().min()) for ct in small.tensors.values())
    largest_pruned = max(float(digits.module.get_parameter(n).reshape(ct.matrix_shape)[~ct.mask].abs().max())
                         for n, ct in small.tensors.items())
    assert largest_pruned <= smallest_kept + 1e-3  # float16 kept values


def test_bad_prune_settings_are_refused():
    for kwargs in ({"sparsity": 1.0}, {"pattern": "4:2"}, {"pattern": "2-4"}, {"score": "random"},
                   {"pattern": "2:4", "scope": "global"}):
        with pytest.raises(RecipeError):
            Prune(**kwargs)


def test_embeddings_are_not_pruned_unless_asked(minilm_small):
    small = squash.compress(minilm_small, Recipe([Prune(0.5), Quantize(bits=8)]))
    emb = [ct for n, ct in small.tensors.items() if "embeddings" in n]
    lin = [ct for n, ct in small.tensors.items() if "embeddings" not in n]
    assert emb and all(ct.mask is None for ct in emb) and all(ct.mask is not None for ct in lin)


# ---------------------------------------------------------------- structured


def test_structured_pruning_matches_the_masked_model_exactly(digits):
    config = PruneChannels(sparsity=0.5, score="magnitude")
    masked = copy.deepcopy(digits.module)
    handles = masked_forward_hooks(masked, config)
    shrunk = copy.deepcopy(digits.module)
    shapes = prune_channels(shrunk, config)
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():  # in float64, so that only the order of summation can differ
        torch.testing.assert_close(shrunk.double()(x), masked.double()(x), rtol=0, atol=1e-12)
    for h in handles:
        h.remove()
    n_full = sum(p.numel() for p in digits.module.parameters())
    n_shrunk = sum(p.numel() for p in shrunk.parameters())
    assert n_shrunk < 0.5 * n_full and shapes["fc1"] == [32, 16 * 16]


def test_structured_pruning_of_transformer_mlps_matches_the_masked_model(minilm_small):
    config = PruneChannels(sparsity=0.25, score="activation")
    from squash.calibrate import calibration_batches

    batches = calibration_batches(minilm_small)[:1]
    masked = copy.deepcopy(minilm_small.module)
    handles = masked_forward_hooks(masked, config, run=lambda: [masked(**b) for b in batches])
    shrunk = copy.deepcopy(minilm_small.module)
    prune_channels(shrunk, config, run=lambda: [shrunk(**b) for b in batches])
    with torch.no_grad():  # float64: only the order of summation can differ
        a = shrunk.double()(**batches[0]).last_hidden_state
        b = masked.double()(**batches[0]).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    for h in handles:
        h.remove()
    assert shrunk.encoder.layer[0].intermediate.dense.out_features == 3 * minilm_small.config["hf_config"]["intermediate_size"] // 4


def test_structurally_pruned_model_saves_and_loads(digits, tmp_path):
    small = squash.compress(digits, Recipe([PruneChannels(0.5, score="magnitude"), Quantize(bits=8)]))
    back = squash.load_squash(squash.save(small, tmp_path / "s.squash"))
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back.module(x), small.module(x))
    assert back.module.fc1.in_features == 16 * 16


# ---------------------------------------------------------------- codebook


def test_kmeans_is_deterministic_under_a_seed():
    x = weights(4, 500)
    a = kmeans_1d(x, torch.ones_like(x), 16, seed=3)
    b = kmeans_1d(x, torch.ones_like(x), 16, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_codebook_error_falls_as_bits_grow():
    w = weights()
    errs = [(w - Codebook(bits=b, weighted=False)(w, None).dequantize()).pow(2).mean().item() for b in range(1, 9)]
    assert all(later < earlier for earlier, later in zip(errs, errs[1:]))
    # Lloyd's fixed point: every centroid is the mean of its weights (up to a weight on a boundary that float32
    # rounding of the midpoint sends to the other side)
    ct = Codebook(bits=3, weighted=False, grid_dtype="float32")(w, None)
    for a in range(8):
        members = w[ct.codes == a]
        if members.numel():
            assert abs(members.mean().item() - ct.grid[a].item()) < 0.1 * (ct.grid[1] - ct.grid[0]).item()


def test_weighted_codebook_lowers_the_weighted_error():
    # half the inputs are strongly driven and hold small weights, half are nearly idle and hold large ones:
    # weighting by Σx² should spend the centroids on the driven half
    w = weights()
    w[:, :48] *= 0.1
    w[:, 48:] *= 3.0
    d = torch.cat([torch.full((48,), 100.0), torch.full((48,), 0.01)])
    h = torch.diag(d)

    def werr(ct):
        return ((w - ct.dequantize()).pow(2) * d).sum().item()

    assert werr(Codebook(bits=3)(w, None, h)) < werr(Codebook(bits=3, weighted=False)(w, None, h))


def test_row_codebooks_and_pruned_codebooks():
    w = weights()
    ct = Codebook(bits=2, scope="row")(w, None)
    assert ct.grid.shape == (48, 4) and len(ct.levels().unique()) > 4
    pruned = Prune(0.6)(w, None)
    shared = Codebook(bits=3)(w, pruned)
    assert torch.equal(shared.mask, pruned.mask) and torch.all(shared.dequantize()[~pruned.mask] == 0)


# ---------------------------------------------------------------- entropy coding


@pytest.mark.parametrize("probs", [[0.7, 0.1, 0.1, 0.05, 0.05], [1 / 16] * 16, [0.5, 0.5]])
def test_entropy_coding_round_trips_and_is_near_the_bound(probs):
    rng = np.random.default_rng(0)
    symbols = rng.choice(len(probs), size=200_000, p=probs)
    stream = encode(symbols, len(probs))
    assert np.array_equal(decode(stream), symbols)
    bound = stream.n * entropy_bits(stream.counts) / 8
    assert 4 * stream.words.size <= 1.01 * bound + 16


def test_mask_nibbles_round_trip():
    mask = torch.rand(7, 13, generator=torch.Generator().manual_seed(0)) > 0.4
    assert torch.equal(nibbles_to_mask(mask_nibbles(mask), (7, 13)), mask)


def test_entropy_step_shrinks_the_file_and_decodes_exactly(digits, tmp_path):
    plain = squash.compress(digits, Recipe([Prune(0.8, scope="global"), Codebook(bits=4, weighted=False)]))
    coded = squash.compress(digits, Recipe([Prune(0.8, scope="global"), Codebook(bits=4, weighted=False), Entropy()]))
    p1 = squash.save(plain, tmp_path / "plain.squash")
    p2 = squash.save(coded, tmp_path / "coded.squash")
    assert p2.stat().st_size < p1.stat().st_size
    back = squash.load_squash(p2)
    for name, ct in coded.tensors.items():
        assert torch.equal(back.tensors[name].dequantize(), ct.dequantize())
        assert torch.equal(back.tensors[name].mask, ct.mask)
    assert sum(ct.stored_bytes() for ct in coded.tensors.values()) < sum(ct.stored_bytes() for ct in plain.tensors.values())


def test_a_corrupt_entropy_stream_is_a_format_error(digits, tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    coded = squash.compress(digits, Recipe([Prune(0.8), Codebook(bits=4, weighted=False), Entropy()]))
    path = squash.save(coded, tmp_path / "c.squash")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    arrays = load_file(path)
    arrays["fc1.weight.codes.words"] = arrays["fc1.weight.codes.words"][:-3].clone()
    save_file(arrays, tmp_path / "bad.squash", metadata=meta)
    with pytest.raises(squash.FormatError):
        squash.load_squash(tmp_path / "bad.squash")


# ---------------------------------------------------------------- fine-tune


def test_finetune_lowers_the_held_out_distillation_loss(digits):
    small = squash.compress(digits, Recipe([Prune(0.9, scope="global"), Codebook(bits=2, weighted=False)]))
    config = Finetune(steps=60, batch=64, lr=1e-3, lr_scale=1e-3, temperature=2.0, held_out=256)
    _, held = training_data(small, config)
    before = held_out_loss("classifier", small.module, digits.module, held, 2.0)
    from squash.steps import finetune

    result = finetune(small, digits, config)
    after = held_out_loss("classifier", small.module, digits.module, held, 2.0)
    assert result["held_out_loss_before"] == pytest.approx(before)
    assert after < 0.7 * before
    for ct in small.tensors.values():  # still a mask of the same sparsity and a 4-level codebook
        assert ct.grid.numel() == 4 and ct.mask is not None


def test_finetune_resumes_from_its_checkpoint(digits, tmp_path):
    from squash.steps import finetune

    recipe = Recipe([Quantize(bits=4, block=16)])
    config = Finetune(steps=20, batch=32, checkpoint_every=10)
    a = squash.compress(digits, recipe)
    finetune(a, digits, config)

    b = squash.compress(digits, recipe)
    ckpt = tmp_path / "ft.ckpt"
    calls = []

    def stop_at_15(done, total, what):
        calls.append(done)
        if done == 15:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(b, digits, config, stop_at_15, ckpt)
    assert ckpt.is_file()
    c = squash.compress(digits, recipe)
    result = finetune(c, digits, config, checkpoint=ckpt)
    assert result["resumed_from"] == 10 and not ckpt.exists()
    for name, ct in a.tensors.items():
        torch.testing.assert_close(c.tensors[name].dequantize(), ct.dequantize(), rtol=0, atol=1e-6)


def test_deep_compression_preset_reaches_20x_on_digits(digits):
    small = squash.compress(digits, squash.load_recipe("deep-compression"))
    report = squash.evaluate(small, digits, repeats=1)
    assert report["size_ratio"] <= 1 / 20
    assert report["quality"]["accuracy"] >= report["quality"]["accuracy_float"] - 0.01


def test_model_level_steps_are_refused_in_layer_rules():
    with pytest.raises(RecipeError, match="whole model"):
        Recipe.from_dict({"steps": [{"step": "quantize"}],
                          "layers": [{"match": "fc1", "steps": [{"step": "quantize"}, {"step": "finetune"}]}]})
    with pytest.raises(RecipeError, match="replaces quantize"):
        Recipe([Quantize(), Codebook()])
    with pytest.raises(RecipeError, match="no step compresses"):
        Recipe([Finetune()])


def test_structured_pruning_of_a_gated_mlp_matches_the_masked_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval().double()
    config = PruneChannels(sparsity=0.5, score="magnitude")
    masked = copy.deepcopy(model)
    masked_forward_hooks(masked, config)
    shapes = prune_channels(model, config)
    ids = torch.randint(100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, masked(ids).logits, rtol=0, atol=1e-10)
    assert shapes["model.layers.0.mlp.down_proj"] == [32, 48] and shapes["model.layers.1.mlp.gate_proj"] == [48, 32]


# ---------------------------------------------------------------- found in review


def test_prune_only_recipe_leaves_embeddings_float(minilm_small):
    from squash.steps import Entropy as E

    small = squash.compress(minilm_small, Recipe([Prune(0.5), E()]))
    assert small.tensors and not any("embeddings" in n for n in small.tensors)


def test_global_pruning_may_remove_a_whole_layer():
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 256))
    with torch.no_grad():
        net[0].weight.mul_(1e-3)
    small = squash.compress(net, Recipe([Prune(0.3, scope="global")]))
    assert int(small.tensors["0.weight"].mask.sum()) == 0


def test_kmeans_handles_more_than_2_to_the_24_weights():
    w = torch.randn(4097, 4096, generator=torch.Generator().manual_seed(0))
    ct = Codebook(bits=1, weighted=False, iters=2)(w, None)
    assert ct.grid.numel() == 2 and ct.grid[0] < 0 < ct.grid[1]


def test_codes_point_at_the_nearest_stored_level():
    w = weights(64, 512)
    ct = Codebook(bits=4, weighted=False)(w, None)
    nearest = (w[..., None] - ct.grid.float()).abs().argmin(-1)
    assert torch.equal(ct.levels(), ct.grid.float()[nearest])


def test_w8a8_passes_gradients_straight_through():
    from squash.runtime.modules import quantize_activations

    x = torch.randn(3, 8, requires_grad=True)
    quantize_activations(x, 8).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_finetuned_scales_stay_positive_and_reported_loss_is_the_stored_models(digits):
    from squash.steps import finetune

    small = squash.compress(digits, Recipe([Quantize(bits=4, block=16, symmetric=False, scale_dtype="float16")]))
    config = Finetune(steps=40, batch=64, lr=1e-3, lr_scale=3e-2, held_out=256)
    result = finetune(small, digits, config)
    assert all(float(ct.scale.float().min()) > 0 for ct in small.tensors.values())
    _, held = training_data(small, config)
    assert result["held_out_loss_after"] == pytest.approx(held_out_loss("classifier", small.module, digits.module, held, 1.0))
