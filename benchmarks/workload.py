"""The model, data and settings both sides of the fit-vs-DDP benchmarks use.

A configuration is a dict of features, each key optional: ``loader_workers`` (DataLoader worker
processes per rank), ``precision`` (``"bf16-mixed"``: bf16 autocast), ``accumulate_grad_batches``
(micro-batches per optimizer step), ``warmup_steps`` (a warm-up then cosine schedule stepped at every
optimizer step), ``strategy`` (``"fsdp"``: Trainer.fit only) and ``sharing`` (the hand-written loop's loader workers'
torch sharing strategy; fit's use ``"file_system"``). ``{}`` is plain fp32 training.
``REALISTIC`` is the configuration of a real GPU job, on CPU; ``FEATURE_CONFIGS`` names each feature alone
(benchmarks/features.py).
"""

from __future__ import annotations

import functools
import math
from typing import Any

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

#: Each feature alone, then all of REALISTIC together, by the name a report prints.
FEATURE_CONFIGS = {
    "bf16-mixed": {"precision": "bf16-mixed"},
    "accumulate 2": {"accumulate_grad_batches": 2},
    "loader workers 2": {"loader_workers": 2},
    "warm-up + cosine per step": {"warmup_steps": REALISTIC["warmup_steps"]},
    "fsdp": {"strategy": "fsdp"},
    "realistic (all but fsdp)": REALISTIC,
}


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_steps: int = REALISTIC["warmup_steps"]) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then cosine down to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_steps(epochs: int, world: int = 2, config: dict[str, Any] = REALISTIC) -> int:
    """Optimizer steps of ``config`` over ``epochs`` (the schedule's length)."""
    return epochs * (TRAIN // world // BATCH) // config.get("accumulate_grad_batches", 1)


def fit_options(config: dict[str, Any], epochs: int) -> dict[str, Any]:
    """``config`` as Trainer keywords (the schedule built for ``epochs`` epochs on 2 workers)."""
    options = {key: config[key] for key in ("loader_workers", "precision", "accumulate_grad_batches", "strategy")
               if key in config}
    if "warmup_steps" in config:
        options.update(lr_scheduler_interval="step", lr_scheduler=functools.partial(
            warmup_cosine, total_steps=optimizer_steps(epochs, config=config), warmup_steps=config["warmup_steps"]))
    return options
