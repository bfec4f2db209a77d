"""The steps of a recipe. Each is a frozen config plus a pure function of the same name.

Tensor steps are called step(w, ct, h) → CompressedTensor for every weight; model-level steps (`model_level`:
structured pruning, fine-tuning) change the model itself and are run by compress() around them.
"""
from squash.steps.channels import PruneChannels, prune_channels
from squash.steps.codebook import Codebook, Entropy, codebook, kmeans_1d
from squash.steps.decompose import LowRank, Outliers, lowrank, outliers
from squash.steps.finetune import Finetune, finetune
from squash.steps.prune import Prune, prune
from squash.steps.quantize import Quantize, quantize

STEPS = {"prune_channels": PruneChannels, "outliers": Outliers, "prune": Prune, "quantize": Quantize,
         "codebook": Codebook, "lowrank": LowRank, "entropy": Entropy, "finetune": Finetune}

__all__ = ["Codebook", "Entropy", "Finetune", "LowRank", "Outliers", "Prune", "PruneChannels", "Quantize", "STEPS",
           "codebook", "finetune", "kmeans_1d", "lowrank", "outliers", "prune", "prune_channels", "quantize"]
