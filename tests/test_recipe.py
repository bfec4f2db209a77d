"""Recipes: presets load, TOML validation, per-layer rules, layers too small to compress."""
import pytest
import torch

from squash import RecipeError, SquashError, compress, load_recipe, presets
from squash.recipe import Recipe

PRESETS = {"int8", "int4", "int3", "int2", "w8a8", "nf4", "int4-lowrank", "rtn4", "rtn3"}


def test_every_named_preset_loads():
    assert PRESETS <= set(presets())
    for name in presets():
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.steps
        assert Recipe.from_dict(recipe.to_dict()) == recipe  # what the file header stores rebuilds it


def test_rtn_presets_share_the_group_size_of_their_counterparts():
    for bits in (4, 3):
        tuned = [s for s in load_recipe(f"int{bits}").steps if s.name == "quantize"][0]
        plain = load_recipe(f"rtn{bits}").steps[0]
        assert (plain.bits, plain.block, plain.rounding, plain.clip) == (bits, tuned.block, "nearest", "absmax")


def test_layer_rules_override_the_default_steps(digits):
    recipe = Recipe.from_dict({
        "steps": [{"step": "quantize", "bits": 4, "block": 16}],
        "layers": [{"match": "fc1", "steps": [{"step": "quantize", "bits": 8}]}],
    })
    small = compress(digits, recipe)
    assert small.tensors["fc1.weight"].bits == 8
    assert {small.tensors[n].bits for n in ("conv1.weight", "conv2.weight", "fc2.weight")} == {4}


def test_layer_rule_naming_nothing_is_refused(digits):
    recipe = Recipe.from_dict({"steps": [{"step": "quantize"}], "layers": [{"match": "fc9", "steps": [{"step": "quantize"}]}]})
    with pytest.raises(SquashError, match="fc9"):
        compress(digits, recipe)


def test_min_weights_keeps_small_layers_float(digits):
    small = compress(digits, Recipe.from_dict({"steps": [{"step": "quantize"}], "min_weights": 1000}))
    assert "conv1.weight" not in small.tensors  # 144 weights
    assert torch.equal(small.module.conv1.weight, digits.module.conv1.weight)
    assert "fc1.weight" in small.tensors


@pytest.mark.parametrize("bad,needle", [
    ({"steps": [{"step": "quantize", "grid": "nf", "symmetric": False}]}, "symmetric"),
    ({"steps": [{"step": "quantize", "clip": "hqq"}]}, "hqq"),
    ({"steps": [{"step": "lowrank"}]}, "rank"),
    ({"steps": [{"step": "lowrank", "rank": 4, "energy": 0.9}]}, "exactly one"),
    ({"steps": [{"step": "outliers", "fraction": 0.9}]}, "fraction"),
    ({"steps": [{"step": "quantize"}], "min_weights": -1}, "min_weights"),
    ({"steps": [{"step": "quantize"}], "layers": [{"steps": []}]}, "match"),
    ({"steps": [{"step": "quantize", "activations": 4}]}, "activations"),
])
def test_invalid_recipes_name_the_value(bad, needle):
    with pytest.raises(RecipeError, match=needle):
        Recipe.from_dict(bad)


def test_outliers_after_quantize_is_refused():
    with pytest.raises(RecipeError, match="out of order"):
        Recipe.from_dict({"steps": [{"step": "quantize"}, {"step": "outliers"}]})
