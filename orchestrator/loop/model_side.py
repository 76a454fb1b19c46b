"""A rank's model side, built the same way on every rank from the loop config.

The model on its device (identical initial weights: the seed is set first), its optimizer,
precision (autocast, the ``"16-mixed"`` gradient scaler) and LR schedule, and what a step runs
through: DDP over :class:`~orchestrator.loop.signalled.SignalledModule` (the step's signals ride
its gradient all-reduce), or with ``strategy="fsdp"`` the FSDP2-sharded model, whose signals get a
small all-reduce of their own (:class:`~orchestrator.loop.fsdp.ShardedSignals`). The data side
and the named state components are built by :class:`~orchestrator.loop.train_loop.TrainLoop`.

DDP runs with ``gradient_as_bucket_view=True``: after a step's first synced backward every gradient
is a view into DDP's all-reduce buckets, so a step copies the gradients into the buckets once and
never back (torch's default copies both ways): about 3% of a step of benchmarks/workload.py's MLP on
one CPU thread. The gradients' values are the same; a user's code may still read them, change them in
place (clipping, unscaling) or set them to None, but not ``detach_()`` them.

When the loop ends, :func:`release_reducer` frees DDP's reducer at once. Left to the garbage
collector, after ``destroy_process_group``, the reducer can hold the gloo group's last reference
and destroy it holding the GIL; the group's destructor then waits for its worker thread, which may
be freeing its last all-reduce, whose thread-local state holds a Python object (the context that
``backward`` stashes), and so waits for the GIL: a deadlock (seen once in the test suite, 2026-12-02).
The group's own Python reference releases the GIL as it destroys the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from orchestrator.core.config import LoopConfig
from orchestrator.loop.compiled import compile_model, plain_module
from orchestrator.loop.optim_step import LearningRates, Precision, build_scheduler
from orchestrator.loop.rank_state import Snapshots
from orchestrator.loop.signalled import DdpSignals, SignalledModule, seed_everything

__all__ = ["ModelSide", "build_model_side", "release_reducer"]


@dataclass
class ModelSide:
    """What :func:`build_model_side` built for one rank.

    Args:
        model: The plain module on its device (sharded in place with FSDP): its ``state_dict``
            keys are what backups and checkpoints hold.
        optimizer: The user's optimizer over ``model``'s parameters.
        precision: Autocast and the gradient scaler.
        lr_scheduler: The user's scheduler, or None.
        lrs: The one place that changes the learning rates (decisions and the schedule).
        ddp: What a step calls: DDP over the signalled model, or the sharded model itself.
        signals: How the step's signals reach every rank.
        snapshots: Where ``SnapshotWeights`` keeps weights (sharded with FSDP).
        sharded: Whether the model is FSDP-sharded.
        backup_group: The sharded saves' gloo group (FSDP only), else None.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    precision: Precision
    lr_scheduler: Any
    lrs: LearningRates
    ddp: torch.nn.Module
    signals: Any
    snapshots: Snapshots
    sharded: bool = False
    backup_group: Any = None


def build_model_side(cfg: LoopConfig, device: torch.device, world_size: int) -> ModelSide:
    """Build the model, optimizer, precision, schedule and step wrapper of one rank (of ``world_size``).

    Raises:
        TypeError: The model factory did not return a ``torch.nn.Module``, or the optimizer factory
            a ``torch.optim.Optimizer``.

    Example:
        >>> side = build_model_side(config, torch.device("cpu"), world_size=2)  # doctest: +SKIP
        >>> side.ddp(batch)  # doctest: +SKIP
    """
    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = plain_module(cfg.model())
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model factory must return a torch.nn.Module, got {type(model).__name__}")
    model = model.to(device)
    sharded, snapshots, backup_group = cfg.strategy == "fsdp", Snapshots(), None
    if sharded:  # sharded in place before the optimizer sees its parameters (DTensors from here)
        from orchestrator.loop.fsdp import shard_model  # FSDP, DTensor: imported by sharded runs only
        from orchestrator.loop.sharded_state import ShardedSnapshots

        shard_model(model, cfg.fsdp_wrap, device)
        snapshots = ShardedSnapshots()
        backup_group = dist.new_group(backend="gloo")  # the sharded saves' collectives (see saver)
    optimizer = cfg.optimizer(model.parameters())
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer factory must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
    precision = Precision(cfg.precision, device)
    lr_scheduler = build_scheduler(cfg.lr_scheduler, optimizer)
    if sharded:  # the sharded model is called as it is; the step's signals get their own all-reduce
        from orchestrator.loop.fsdp import ShardedSignals

        ddp, signals = model, ShardedSignals(model, device)
    else:
        compile_model(model, cfg.compile, device)  # its forward, in place: plain state_dict keys
        signalled = SignalledModule(model)
        ddp = DistributedDataParallel(signalled, device_ids=[device.index] if device.type == "cuda" else None,
                                      gradient_as_bucket_view=True)  # see the module
        signals = DdpSignals(ddp, signalled.signal, world_size)
    return ModelSide(model=model, optimizer=optimizer, precision=precision,
                     lr_scheduler=lr_scheduler, lrs=LearningRates(optimizer, lr_scheduler, cfg.lr_scheduler_interval),
                     ddp=ddp, signals=signals, snapshots=snapshots, sharded=sharded, backup_group=backup_group)


def release_reducer(ddp: torch.nn.Module | None) -> None:
    """Free a DDP wrapper's reducer (and the logger that shares it) now; the wrapper cannot run a step
    after this. Anything else (the sharded model, None) is left as it is."""
    if isinstance(ddp, DistributedDataParallel):
        for name in ("logger", "reducer"):  # the logger holds the reducer too
            if hasattr(ddp, name):
                delattr(ddp, name)
