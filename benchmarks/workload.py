"""The model and data both sides of the fit-vs-DDP benchmark use."""

from __future__ import annotations

import torch

FEATURES, CLASSES = 256, 10
TRAIN, VAL = 16384, 2048
BATCH = 64
LR = 0.05


def _make(n: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    w = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(123))
    y = (x @ w).argmax(dim=1)
    return torch.utils.data.TensorDataset(x, y)


def load_data():
    return _make(TRAIN, 1), _make(VAL, 2)


def build_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, CLASSES),
    )


def make_optimizer(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)
