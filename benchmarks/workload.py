"""The model, data and settings both sides of the fit-vs-DDP benchmark use.

``REALISTIC`` is the configuration of a real GPU job, on CPU: two DataLoader worker processes per
rank, bf16 autocast, two micro-batches per optimizer step, and a warm-up then cosine schedule
stepped at every optimizer step.
"""

from __future__ import annotations

import math

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


REALISTIC = {"loader_workers": 2, "precision": "bf16-mixed", "accumulate_grad_batches": 2, "warmup_steps": 20}


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_steps: int = REALISTIC["warmup_steps"]) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then cosine down to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_steps(epochs: int, world: int = 2) -> int:
    """Optimizer steps of the realistic configuration over ``epochs`` (the schedule's length)."""
    return epochs * (TRAIN // world // BATCH) // REALISTIC["accumulate_grad_batches"]
