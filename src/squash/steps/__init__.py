"""The steps of a recipe. Each is a frozen config plus a pure function of the same name."""
from squash.steps.quantize import Quantize, quantize

STEPS = {"quantize": Quantize}

__all__ = ["Quantize", "quantize", "STEPS"]
