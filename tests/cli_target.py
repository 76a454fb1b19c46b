"""A `module:function` target for the CLI tests."""

import torch

import workloads
from orchestrator import Trainer


def make_trainer(hidden: int = 8):
    return Trainer(model=lambda: torch.nn.Sequential(torch.nn.Linear(workloads.N_FEATURES, hidden),
                                                     torch.nn.ReLU(), torch.nn.Linear(hidden, workloads.N_CLASSES)),
                   optimizer=workloads.sgd, loss=workloads.cross_entropy, data=workloads.odd_data,
                   batch_size=16, num_workers=2, run_name="cli-target")
