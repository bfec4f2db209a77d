"""The steps of a recipe. Each is a frozen config plus a pure function of the same name."""
from squash.steps.decompose import LowRank, Outliers, lowrank, outliers
from squash.steps.quantize import Quantize, quantize

STEPS = {"quantize": Quantize, "lowrank": LowRank, "outliers": Outliers}

__all__ = ["LowRank", "Outliers", "Quantize", "STEPS", "lowrank", "outliers", "quantize"]
