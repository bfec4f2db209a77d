"""digits-cnn: a small CNN trained here on scikit-learn's bundled 8×8 digits, seeded and cached.

The data set (1,797 images) is split once, stratified with seed 0, into 80% train and 20% test; the test part
is what accuracy is measured on. Training takes seconds on 2 cores and is cached as safetensors + JSON.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ARCH = {"channels": [16, 32], "hidden": 64, "classes": 10}
TRAIN = {"seed": 0, "epochs": 40, "batch": 64, "lr": 3e-3, "test_fraction": 0.2}


class DigitsCNN(nn.Module):
    """(B, 1, 8, 8) → conv3×3 → ReLU → conv3×3 → ReLU → maxpool 2 → (B, c2·4·4) → linear → ReLU → linear → (B, 10)."""

    def __init__(self, channels=(16, 32), hidden=64, classes=10):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)  # (B, c2, 4, 4)
        x = torch.relu(self.fc1(x.flatten(1)))  # (B, hidden)
        return self.fc2(x)


def digits_split() -> dict[str, torch.Tensor]:
    """x_train, y_train, x_test, y_test; pixels scaled to [0, 1], images (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=TRAIN["test_fraction"], random_state=TRAIN["seed"], stratify=y.numpy())
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}


def train_digits_cnn() -> DigitsCNN:
    """Adam on the train split, seeded; deterministic on one machine."""
    data = digits_split()
    gen = torch.Generator().manual_seed(TRAIN["seed"])
    torch.manual_seed(TRAIN["seed"])
    model = DigitsCNN(ARCH["channels"], ARCH["hidden"], ARCH["classes"])
    opt = torch.optim.Adam(model.parameters(), lr=TRAIN["lr"])
    n = len(data["y_train"])
    for _ in range(TRAIN["epochs"]):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, TRAIN["batch"]):
            batch = order[i : i + TRAIN["batch"]]
            loss = nn.functional.cross_entropy(model(data["x_train"][batch]), data["y_train"][batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def load_digits_cnn(folder: Path) -> tuple[DigitsCNN, dict]:
    """The cached model, trained first if the cache is missing or unreadable."""
    weights, meta = folder / "model.safetensors", folder / "config.json"
    config = {"arch": ARCH, "train": TRAIN}
    model = DigitsCNN(ARCH["channels"], ARCH["hidden"], ARCH["classes"])
    try:
        if json.loads(meta.read_text()) == config:
            model.load_state_dict(load_file(weights))
            return model.eval(), config
    except Exception:  # a missing or damaged cache is rebuilt, never trusted
        pass
    model = train_digits_cnn()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, weights)
    meta.write_text(json.dumps(config))
    return model, config
