"""squash: compress trained neural networks from float weights to int8 and below, and measure what it costs.

    model = squash.load("smollm2-135m")                  # the float reference, left untouched
    small = squash.compress(model, squash.load_recipe("int8"))
    print(squash.evaluate(small, reference=model))
    squash.save(small, "smollm2-int8.squash")
"""
__version__ = "0.1.0"

from squash.errors import FormatError, RecipeError, SquashError  # noqa: E402
from squash.models import Model, load  # noqa: E402
from squash.recipe import Recipe, compress, load_recipe, presets  # noqa: E402
from squash.steps import Quantize, quantize  # noqa: E402
from squash.tensor import CompressedTensor  # noqa: E402
from squash.io.squash_file import load_squash, save  # noqa: E402
from squash.eval.report import evaluate  # noqa: E402

__all__ = [
    "CompressedTensor", "FormatError", "Model", "Quantize", "Recipe", "RecipeError", "SquashError",
    "compress", "evaluate", "load", "load_recipe", "load_squash", "presets", "quantize", "save",
]
