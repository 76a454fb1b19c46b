"""Workloads of the elastic tests: an MLP (no dropout) that logs every sample it trains on.

Every training forward appends ``[position, index]`` for each sample of its micro-batch to
``<folder>/seen-<pid>.jsonl``. ``position`` is the global sample count before the micro-batch, kept in
a model buffer (so backups and live recoveries carry it, and DDP keeps it equal on every rank) and
advanced by ``batch * world_size`` per micro-batch: ``B`` per optimizer step on any world size. A step
that is redone after a recovery logs the same pairs again, so the distinct pairs are what training
consumed (keyed by the step's first position, ``position`` rounded down to a multiple of the global
batch, since a step's micro-batches differ between world sizes): ``position // SAMPLES`` is the epoch,
and each epoch must hold every index exactly once.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

SAMPLES, FEATURES = 64, 6
GLOBAL_BATCH = 16  # batch_size 8 on 2 workers (or 2 micro-batches on 1): 4 steps an epoch


class IndexedMLP(torch.nn.Module):
    """An MLP on all but the last input column, which carries the sample's index."""

    def __init__(self, folder: str | None, hold: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))
        self.folder, self.hold = folder, hold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index, features = x[:, -1].long(), x[:, :-1]
        if self.training:
            if self.folder is not None:
                with (Path(self.folder) / f"seen-{os.getpid()}.jsonl").open("a") as out:
                    for i in index.tolist():
                        out.write(json.dumps([int(self.position), i]) + "\n")
            world = dist.get_world_size() if dist.is_initialized() else 1
            self.position += len(index) * world
            if self.hold is not None and os.path.exists(self.hold):
                time.sleep(0.25)  # slow while the scenario disturbs the cluster
        return self.net(features)


def model_factory(folder: str | None = None, hold: str | None = None):
    return functools.partial(IndexedMLP, folder, hold)


def indexed_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    y = x @ torch.linspace(-1.0, 1.0, FEATURES).unsqueeze(1) + 0.1 * torch.randn(SAMPLES, 1, generator=g)
    xv = torch.randn(16, FEATURES, generator=g)
    yv = xv @ torch.linspace(-1.0, 1.0, FEATURES).unsqueeze(1)
    with_index = torch.cat([x, torch.arange(SAMPLES, dtype=torch.float32).unsqueeze(1)], dim=1)
    val_index = torch.cat([xv, torch.full((16, 1), -1.0)], dim=1)
    return torch.utils.data.TensorDataset(with_index, y), torch.utils.data.TensorDataset(val_index, yv)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def trainer(storage: str, run_name: str, folder: str | None = None, hold: str | None = None, **overrides):
    """The elastic run (``num_workers=(1, 2)``) and, with ``num_workers=2``, its uninterrupted reference."""
    from orchestrator import Trainer, callbacks

    kwargs = dict(model=model_factory(folder, hold), optimizer=sgd, data=indexed_data,
                  loss=torch.nn.functional.mse_loss, batch_size=8, num_workers=(1, 2), seed=0, storage=storage,
                  run_name=run_name, max_failures=3, placement_timeout_s=5, preemption_grace_s=60,
                  callbacks=[callbacks.BackupAndRestore(save_freq=2, delete_checkpoint=False)])
    kwargs.update(overrides)
    return Trainer(**kwargs)


def seen_by_epoch(folder: str) -> dict[int, list[int]]:
    """The indices trained in each epoch: the distinct ``[position, index]`` pairs of every process's log."""
    pairs = set()
    for file in Path(folder).glob("seen-*.jsonl"):
        for line in file.read_text().splitlines():
            if line.strip():
                pairs.add(tuple(json.loads(line)))
    by_epoch: dict[int, list[int]] = {}
    steps = {(position // GLOBAL_BATCH * GLOBAL_BATCH, index) for position, index in pairs}
    for position, index in steps:
        by_epoch.setdefault(position // SAMPLES, []).append(index)
    return by_epoch
