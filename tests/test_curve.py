"""`squash curve` on digits-cnn: sweeps, the point cache, sensitivity, mixed precision, recipes as TOML."""
import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from squash import RecipeError, SquashError, compress, load_recipe, presets
from squash.eval import curve
from squash.eval.quality import QUICK, EvalSize, lm_quality
from squash.recipe import LayerRule, Recipe
from squash.steps import Outliers, Prune, Quantize

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def point_cache(tmp_path_factory):
    """Every test in this module caches its points in one temporary folder, never the user's cache."""
    folder = tmp_path_factory.mktemp("curve-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(curve, "point_cache_dir", lambda: folder)
        mp.setattr(curve, "N_BOOT", 40)  # fewer bootstrap refits: the fit itself is tested in test_curve_fit.py
        yield folder


# ---------------------------------------------------------------- sweeps and recipes


@pytest.mark.parametrize("spec,expected", [
    ("quantize.bits=8,6,4", ("quantize", "bits", [8, 6, 4])),
    ("prune.sparsity=0.3,0.5,0.7", ("prune", "sparsity", [0.3, 0.5, 0.7])),
    ("quantize.block=32,64,channel", ("quantize", "block", [32, 64, "channel"])),
    (" quantize.symmetric = true, false ", ("quantize", "symmetric", [True, False])),
    ("quantize.grid='nf',uniform", ("quantize", "grid", ["nf", "uniform"])),
])
def test_parse_sweep_reads_ints_floats_and_strings(spec, expected):
    assert curve.parse_sweep(spec) == expected


@pytest.mark.parametrize("spec,needle", [
    ("bits=8,4", "STEP.PARAMETER"),
    ("quantise.bits=8,4", "unknown step 'quantise'"),
    ("quantize.bitz=8,4", "no parameter 'bitz'"),
    ("entropy.level=1", "takes no parameters"),
    ("quantize.bits=", "comma-separated values"),
    ("quantize.bits=8,,4", "comma-separated values"),
    ("quantize.bits=8,4,8", "repeated"),
    ("quantize.bits=8,nan", "finite"),
])
def test_parse_sweep_refuses_bad_specs(spec, needle):
    with pytest.raises(RecipeError, match=needle):
        curve.parse_sweep(spec)


def test_several_sweeps_give_the_cartesian_product():
    grid = curve.parse_sweeps(["quantize.bits=8,4", "quantize.block=32,64,128"])
    assert len(grid) == 6 and grid[0] == {"quantize.bits": 8, "quantize.block": 32}
    assert grid[-1] == {"quantize.bits": 4, "quantize.block": 128}
    with pytest.raises(RecipeError, match="twice"):
        curve.parse_sweeps(["quantize.bits=8", "quantize.bits=4"])


def test_recipe_at_replaces_adds_and_refuses():
    r = curve.recipe_at(None, {"quantize.bits": 4})
    assert r.steps == (Quantize(bits=4, block=64, symmetric=False, scale_dtype="float16", zero_dtype="int"),)
    # a step the recipe lacks goes in its place in the step order (prune before quantize)
    r = curve.recipe_at(None, {"prune.sparsity": 0.5, "quantize.bits": 3})
    assert [s.name for s in r.steps] == ["prune", "quantize"] and r.steps[0] == Prune(sparsity=0.5)
    base = Recipe(steps=(Outliers(fraction=0.01), Quantize(bits=4)), exclude=("fc2",), name="b",
                  layers=(LayerRule("fc1", (Quantize(bits=8),)),))
    r = curve.recipe_at(base, {("quantize", "bits"): 3})
    assert r.steps == (Outliers(fraction=0.01), Quantize(bits=3)) and r.exclude == ("fc2",)
    assert r.layers == base.layers  # per-layer exceptions stay
    with pytest.raises(RecipeError, match="bits"):
        curve.recipe_at(None, {"quantize.bits": 9})
    with pytest.raises(RecipeError, match="codebook"):
        curve.recipe_at(None, {"codebook.bits": 3})  # codebook replaces quantize: cannot be added next to it
    with pytest.raises(RecipeError, match="quantize.bitz"):
        curve.recipe_at(None, {"quantize.bitz": 3})


def test_recipe_toml_round_trip(tmp_path):
    recipe = Recipe(
        steps=(Outliers(fraction=0.003), Quantize(bits=4, block=64, symmetric=False, zero_dtype="int",
                                                  scale_dtype="float16", clip="mse", damp=1e-05)),
        exclude=("fc2",), name='mixed "digits"', min_weights=100,
        layers=(LayerRule("fc1", (Quantize(bits=8, block="channel"),)),
                LayerRule("conv2", (Prune(sparsity=0.25), Quantize(bits=3, block=16)))),
    )
    path = tmp_path / "r.toml"
    path.write_text(curve.recipe_to_toml(recipe, comment="made by a test\nsecond line"))
    assert path.read_text().startswith("# made by a test\n# second line\n")
    assert load_recipe(path) == recipe
    for name in presets():  # every preset survives the trip too
        path.write_text(curve.recipe_to_toml(load_recipe(name)))
        assert load_recipe(path) == load_recipe(name)


# ---------------------------------------------------------------- quality per chunk


class TinyLM(torch.nn.Module):
    """Enough of a causal LM for the quality code: token ids (1, T) → .logits (1, T, V)."""

    def __init__(self, vocab=97, dim=16):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab)

    def forward(self, x):
        return SimpleNamespace(logits=self.head(torch.tanh(self.emb(x).cumsum(1))))


def test_lm_window_losses_agree_with_lm_quality():
    torch.manual_seed(0)
    ref, other = TinyLM().eval(), TinyLM().eval()
    windows = torch.randint(0, 97, (3, 24))
    per = curve.lm_window_losses(other, ref, windows)
    whole = lm_quality(other, ref, windows)
    assert len(per["kl"]) == 3 and all(k > 0 for k in per["kl"])
    assert sum(per["kl"]) / 3 == pytest.approx(whole["kl"], rel=1e-5)
    assert sum(per["top1"]) / 3 == pytest.approx(whole["top1_agreement"], rel=1e-6)
    assert math.exp(sum(per["nll"]) / 3) == pytest.approx(whole["perplexity"], rel=1e-5)
    assert math.exp(sum(per["nll_float"]) / 3) == pytest.approx(whole["perplexity_float"], rel=1e-5)


def test_point_key_depends_on_recipe_and_size_not_name(digits):
    a = curve.recipe_at(None, {"quantize.bits": 4})
    key = curve.point_key(digits, a, QUICK)
    assert curve.point_key(digits, Recipe(steps=a.steps, name="other name"), QUICK) == key
    assert curve.point_key(digits, curve.recipe_at(None, {"quantize.bits": 3}), QUICK) != key
    assert curve.point_key(digits, a, EvalSize()) != key


# ---------------------------------------------------------------- the sweep


def test_bits_sweep_writes_plot_and_json_and_a_rerun_is_cached(digits, tmp_path, monkeypatch, point_cache):
    result = curve.run_curve(digits, ["quantize.bits=8,5,3,2"], quick=True, out_dir=tmp_path)
    png, js = tmp_path / "curve-digits-cnn.png", tmp_path / "curve-digits-cnn.json"
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    data = json.loads(js.read_text())
    bits = [p["setting"]["quantize.bits"] for p in data["points"]]
    bpw = [p["bpw"] for p in data["points"]]
    assert bits == [8, 5, 3, 2] and bpw == sorted(bpw, reverse=True) and len(set(bpw)) == 4
    # 8 bits + a float16 scale and an 8-bit zero per 64 weights (8.375), plus the float biases
    assert 8.375 < bpw[0] < 8.6
    for p in data["points"]:
        assert len(p["chunks"]) == 8 and p["loss"] == pytest.approx(sum(p["chunks"]) / 8)
        assert p["metrics"]["images"] == 360 and not p["cached"]
    assert data["points"][0]["loss"] == 0  # 8 bits changes no prediction on this model
    assert data["loss"]["name"] == "accuracy drop" and data["loss"]["tolerance"] == 1.0
    assert data["fit"]["chosen"] in ("exponential", "logistic", "power") and data["fit"]["x"]
    assert data["recommendation"]["bpw"] < bpw[0]
    assert "Recommendation:" in data["summary"] and "bits per weight" in data["summary"]
    assert len(list(point_cache.glob("*.json"))) >= 4

    calls = []
    monkeypatch.setattr(curve, "compress", lambda *a, **k: calls.append(1) or pytest.fail("compressed again"))
    again = curve.run_curve(digits, ["quantize.bits=8,5,3,2"], quick=True, out_dir=tmp_path)
    assert not calls and all(p["cached"] for p in again["points"])
    assert [p["loss"] for p in again["points"]] == [p["loss"] for p in result["points"]]
    assert [p["bpw"] for p in again["points"]] == bpw


def test_an_interrupted_sweep_resumes_where_it_stopped(digits, tmp_path, monkeypatch):
    real, calls = curve.compress, []

    def dies_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(curve, "compress", dies_on_the_second)
    sweep = ["quantize.block=16,32,128"]
    with pytest.raises(KeyboardInterrupt):
        curve.run_curve(digits, sweep, quick=True, out_dir=tmp_path)
    assert not (tmp_path / "curve-digits-cnn.json").exists()
    calls.clear()
    monkeypatch.setattr(curve, "compress", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = curve.run_curve(digits, sweep, quick=True, out_dir=tmp_path)
    assert len(calls) == 2 and [p["cached"] for p in result["points"]] == [True, False, False]
    assert result["fit"]["chosen"] is None and "constant" in result["summary"]  # 8 bits: no loss at any block size


def test_a_corrupt_cache_file_is_measured_again(digits, tmp_path, point_cache):
    recipe = curve.recipe_at(None, {"quantize.bits": 6})
    first = curve.cached_point(digits, digits, recipe, QUICK)
    path = point_cache / f"{curve.point_key(digits, recipe, QUICK)}.json"
    assert path.is_file() and curve.cached_point(digits, digits, recipe, QUICK)["cached"]
    path.write_text('{"key": "truncated", "bpw"')
    again = curve.cached_point(digits, digits, recipe, QUICK)
    assert not again["cached"] and again["bpw"] == first["bpw"] and again["loss"] == first["loss"]
    assert curve.cached_point(digits, digits, recipe, QUICK)["cached"]  # and written back whole


def test_bad_input_fails_before_any_work(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(curve, "compress", lambda *a, **k: pytest.fail("compressed"))
    with pytest.raises(RecipeError, match="bits"):
        curve.run_curve(digits, ["quantize.bits=8,9"], out_dir=tmp_path)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SquashError, match="not a folder"):
        curve.run_curve(digits, ["quantize.bits=8,4"], out_dir=tmp_path / "a-file")
    with pytest.raises(SquashError, match="not several"):
        curve.run_curve(digits, ["quantize.bits=8,4"], out_dir=tmp_path, budget_bpw=4, max_loss=1)


# ---------------------------------------------------------------- sensitivity and mixed precision


def test_sensitivity_gives_one_row_per_layer_sorted_by_damage(digits, tmp_path):
    low = curve.recipe_at(None, {"quantize.bits": 2})
    rows = curve.sensitivity(digits, digits, low, QUICK)
    assert sorted(r["group"] for r in rows) == ["conv1", "conv2", "fc1", "fc2"]
    assert [r["loss"] for r in rows] == sorted((r["loss"] for r in rows), reverse=True)
    assert rows[0]["loss"] > 0  # some layer alone at 2 bits costs accuracy
    # only that layer was compressed: the rest stays float, so bits per weight stays near 32
    assert all(r["bpw"] > 20 for r in rows if r["group"] != "fc1")
    assert curve.plot_sensitivity(rows, tmp_path / "s.png").read_bytes()[:8] == PNG


def test_allocate_within_a_budget_is_checked_by_measuring(digits, tmp_path):
    choices = [8, 4, 3, 2]
    uniform = {b: curve.cached_point(digits, digits, curve.recipe_at(None, {"quantize.bits": b}), QUICK)
               for b in choices}
    budget = 4.0  # between uniform 2 bits (3.16) and 3 bits (4.15)
    plan = curve.plan_allocation(digits, digits, choices, budget_bpw=budget, size=QUICK)
    recipe = plan["recipe"]
    assert {g["group"] for g in plan["groups"]} == {"conv1", "conv2", "fc1", "fc2"}
    assert recipe.layers and plan["predicted"]["bpw"] <= budget

    path = tmp_path / "mixed.toml"
    path.write_text(curve.recipe_to_toml(recipe))
    assert load_recipe(path) == recipe
    final = curve.measure_point(digits, digits, load_recipe(path), QUICK)
    assert final["bpw"] <= budget + 1e-9
    assert final["bpw"] == pytest.approx(plan["predicted"]["bpw"])  # stored bytes add up exactly
    assert final["bpw"] > uniform[2]["bpw"]
    assert final["loss"] <= uniform[2]["loss"]  # no worse than uniform at the nearest lower setting
    assert curve.allocate(digits, digits, choices, budget_bpw=budget, size=QUICK) == recipe


def test_allocate_for_a_loss_target_and_impossible_budgets(digits):
    plan = curve.plan_allocation(digits, digits, [8, 4, 3, 2], max_loss=0.5, size=QUICK)
    small = compress(digits, plan["recipe"])
    assert plan["predicted"]["loss"] <= 0.5
    from squash.recipe import total_bits
    assert total_bits(small) < 9.0  # smaller than everything at 8 bits
    with pytest.raises(SquashError, match="below the smallest"):
        curve.allocate(digits, digits, [8, 4], budget_bpw=1.0, size=QUICK)
    with pytest.raises(SquashError, match="exactly one"):
        curve.allocate(digits, digits, [8, 4], size=QUICK)


# ---------------------------------------------------------------- the command


def parse(argv):
    parser = argparse.ArgumentParser()
    curve.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_curve_command_with_sensitivity_and_budget(tmp_path, capsys):
    args = parse(["curve", "digits-cnn", "--sweep", "quantize.bits=8,4,3,2", "--out", str(tmp_path), "--quick",
                  "--json", "--sensitivity", "--budget-bpw", "4.0"])
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["label"] for p in data["points"]] == [f"quantize.bits={b}" for b in (8, 4, 3, 2)]
    assert len(data["sensitivity"]["rows"]) == 4
    alloc = data["allocation"]
    assert alloc["measured"]["bpw"] <= 4.0 + 1e-9 and Path(alloc["recipe_file"]).name == "mixed-digits-cnn.toml"
    assert load_recipe(alloc["recipe_file"]).to_dict() == alloc["recipe"]
    for name in ("curve-digits-cnn.png", "curve-digits-cnn.json", "sensitivity-digits-cnn.png"):
        assert (tmp_path / name).is_file()

    args = parse(["curve", "digits-cnn", "--sweep", "quantize.bits=8,4,3,2", "--out", str(tmp_path), "--quick"])
    assert args.func(args) == 0
    shown = capsys.readouterr().out
    assert "quantize.bits" in shown and "cached" in shown and "Recommendation: quantize.bits=" in shown

    with pytest.raises(RecipeError, match="unknown step"):
        args = parse(["curve", "digits-cnn", "--sweep", "quantise.bits=8,4"])
        args.func(args)
