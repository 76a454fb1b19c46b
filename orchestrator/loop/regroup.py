"""Resuming a ``strategy="fsdp"`` backup on another number of ranks.

The sharded components (model, optimizer, kept snapshots) reshard when DCP loads them (see
:mod:`~orchestrator.loop.sharded_state`). The data position does not carry over exactly: which
samples rank ``r`` had left in the interrupted epoch depends on the world size that split the data.
So a backup taken inside an epoch resumes **at the start of that epoch** (its batches are trained
again, on the model as it was at the backup; the global step, hence an ``lr_scheduler``'s schedule,
goes on from the backup's); a backup taken at an epoch's end resumes exactly at the next epoch. The
rank's own state comes from rank 0's file (position and counters are the same on every rank); the
epoch's partial metric sums restart empty and the random streams are reseeded from the step, as at
every step (:func:`~orchestrator.loop.live.reseed`).

``strategy="ddp"`` backups keep the clear error of a world size change
(:func:`~orchestrator.storage.layout.check_layout`): their model is a full replica, which would
load, but the elastic re-mapping of the data position is another component's job.

Example:
    >>> from orchestrator.loop.rank_state import MetricSums, Position
    >>> from orchestrator.loop.specs import LoopResult
    >>> pos, result = Position(epoch=2, batch=3, global_step=17, phase="batch"), LoopResult(0, [0.1, 0.1, 0.1])
    >>> regrouped(pos, MetricSums(torch.device("cpu")), result)
    >>> pos.next_batch(steps_per_epoch=8), pos.global_step, result.learning_rates
    ((2, 0), 17, [0.1, 0.1])
"""

from __future__ import annotations

from typing import Mapping

import torch

from orchestrator.loop.rank_state import Component, MetricSums, Position
from orchestrator.loop.specs import LoopResult
from orchestrator.storage.layout import ResumeMismatch

#: The rank's own components that a world size change carries over (from rank 0) or rebuilds.
REGROUPABLE = ("position", "metric_sums", "result", "rng")


def check_regroup(components: Mapping[str, Component], folder: str, saved: int, world_size: int) -> None:
    """Raise :class:`ResumeMismatch` when ``components`` hold per-rank state a world size change cannot
    split again (an iterable's or a stateful dataset's position), or unsharded shared state (DDP)."""
    if not any(c.sharded for c in components.values()):
        raise ResumeMismatch(f"cannot resume from {folder}: it was written by {saved} workers and this run has "
                             f"{world_size}; only strategy='fsdp' backups reshard. Resume with num_workers={saved}")
    own = sorted(n for n, c in components.items() if not c.shared and not c.sharded and n not in REGROUPABLE)
    if own:
        raise ResumeMismatch(
            f"cannot resume from {folder} on {world_size} workers (it was written by {saved}): the per-rank data "
            f"state {own} (an iterable or stateful dataset's position) cannot be split again. Resume with "
            f"num_workers={saved}, or use a map-style dataset")


def regrouped(position: Position, metric_sums: MetricSums, result: LoopResult) -> None:
    """Move rank 0's loaded position to the start of its epoch (unless the epoch had ended), empty the
    epoch's partial sums and forget the epoch's learning rate (recorded again when it begins)."""
    if position.phase in ("batch", "begin"):
        epoch = position.epoch
        if epoch == 0:
            position.epoch, position.batch, position.phase = 0, -1, "start"
        else:
            position.end_epoch(epoch - 1, -1)
        result.learning_rates = result.learning_rates[:epoch]
    metric_sums.reset()
