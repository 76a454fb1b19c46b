"""The per-worker training loop: torch only, no Ray.

Every rank runs :class:`TrainLoop`. Per step it does forward, backward and the optimizer step.
The step's per-rank signals ``[non-finite loss flag, loss * n, n]`` ride the step's own gradient
all-reduce: they are the gradient of a 3-element "signal" parameter (see :class:`SignalledModule`),
so DDP averages them together with the model's gradients and no extra collective runs. Per
epoch (and at the rare batch sync points) it sends a :class:`~orchestrator.decisions.Report`
through a :class:`CoordinatorLink` and applies the decisions it gets back. All ranks get the
same decisions, so they stay in lockstep without ever deciding alone.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from orchestrator.config import LoopConfig
from orchestrator.data import ShardSampler
from orchestrator.decisions import (
    Decision,
    Report,
    RestoreWeights,
    SetLearningRate,
    SnapshotWeights,
    StopTraining,
)
from orchestrator.metrics import PhaseSums
from orchestrator.steps import make_default_step, move_to, resolve_metrics, split_output


class CoordinatorLink(Protocol):
    """How a rank talks to the coordinator (a Ray actor in production, anything in tests)."""

    def sync(self, report: Report) -> list[Decision]:
        """Block until every rank reported; return the decisions for all."""

    def progress(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        """Fire-and-forget progress update (rank 0 only, time-gated)."""


@dataclass
class LoopResult:
    """What a rank returns when its loop ends normally."""

    rank: int
    learning_rates: list[float] = field(default_factory=list)
    epochs_run: int = 0
    steps_run: int = 0
    stopped_at: tuple[int, int] | None = None
    state_dict: dict[str, torch.Tensor] | None = None


class SignalledModule(torch.nn.Module):
    """The user's model plus a 3-element parameter whose gradient carries per-step signals.

    The loop adds ``(signal * values).sum()`` to the loss before ``backward``; the gradient of
    ``signal`` is then exactly ``values``, and DDP all-reduces it in the same buckets as the
    model's gradients. The model's own gradients are unchanged (``signal`` stays zero; it is
    not given to the optimizer and not saved).
    """

    SIZE = 3

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        self.signal = torch.nn.Parameter(torch.zeros(self.SIZE, device=device))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def init_process_group(backend: str, master_addr: str, master_port: int, rank: int, world_size: int,
                       timeout_s: float = 1800.0) -> None:
    """Join the torch.distributed group over TCP."""
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _as_datasets(value: Any) -> tuple[Any, Any]:
    if isinstance(value, tuple) and len(value) == 2:
        return value
    return value, None


class TrainLoop:
    """One rank's training loop.

    Args:
        config: The loop configuration (factories, batch size, steps, seed).
        rank: This rank.
        world_size: Number of ranks.
        device: Where the model lives.
        link: The coordinator link.
        epochs: Number of epochs to run.
        batch_sync_every: Steps between batch syncs (callbacks with batch hooks), or None.
    """

    def __init__(self, config: LoopConfig, rank: int, world_size: int, device: torch.device,
                 link: CoordinatorLink, epochs: int, batch_sync_every: int | None = None) -> None:
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.link = link
        self.epochs = epochs
        self.batch_sync_every = batch_sync_every
        self.snapshots: dict[str, dict[str, torch.Tensor]] = {}
        self._last_progress = 0.0

    # -- setup ---------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.config
        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.model: torch.nn.Module = cfg.model().to(self.device)
        if not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"model factory must return a torch.nn.Module, got {type(self.model).__name__}")
        self.optimizer: torch.optim.Optimizer = cfg.optimizer(self.model.parameters())
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer factory must return a torch.optim.Optimizer, got {type(self.optimizer).__name__}")
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.signalled = SignalledModule(self.model)
        self.ddp = DistributedDataParallel(self.signalled, device_ids=device_ids)
        train_ds, val_ds = _as_datasets(cfg.data())
        if train_ds is None or len(train_ds) == 0:
            raise ValueError("data() returned an empty training dataset")
        self.train_sampler = ShardSampler(len(train_ds), self.rank, self.world_size, shuffle=True,
                                          seed=cfg.seed, pad=True)
        self.train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=self.train_sampler,
                                       pin_memory=self.device.type == "cuda")
        self.val_loader = None
        if val_ds is not None and len(val_ds) > 0:
            val_sampler = ShardSampler(len(val_ds), self.rank, self.world_size, shuffle=False, pad=False)
            self.val_loader = DataLoader(val_ds, batch_size=cfg.val_batch_size or cfg.batch_size,
                                         sampler=val_sampler)
        metric_fns = resolve_metrics(cfg.metrics)
        default = make_default_step(cfg.loss, metric_fns) if cfg.loss is not None else None
        self.train_step: Callable[..., Any] = cfg.train_step or default  # type: ignore[assignment]
        self.val_step: Callable[..., Any] = cfg.val_step or self.train_step
        seed_everything(cfg.seed + 1000 * (self.rank + 1))  # per-rank streams (dropout, augmentation)

    # -- decisions -----------------------------------------------------------------------
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def apply(self, decisions: list[Decision]) -> bool:
        """Apply decisions in order; return True when one of them stops training."""
        stop = False
        for d in decisions:
            if isinstance(d, StopTraining):
                stop = True
            elif isinstance(d, SetLearningRate):
                for group in self.optimizer.param_groups:
                    group["lr"] = float(d.value)
            elif isinstance(d, SnapshotWeights):
                self.snapshots[d.key] = {k: v.detach().to("cpu", copy=True)
                                         for k, v in self.model.state_dict().items()}
            elif isinstance(d, RestoreWeights):
                if d.key not in self.snapshots:
                    raise RuntimeError(f"no weights were kept under {d.key!r} to restore")
                self.model.load_state_dict(self.snapshots[d.key])
        return stop

    def _sync(self, kind: str, epoch: int = 0, step: int = -1, **kw: Any) -> bool:
        report = Report(kind=kind, epoch=epoch, step=step, learning_rate=self.learning_rate(),
                        steps_per_epoch=len(self.train_loader), **kw)
        return self.apply(self.link.sync(report))

    # -- loop ----------------------------------------------------------------------------
    def run(self) -> LoopResult:
        self._build()
        result = LoopResult(rank=self.rank)
        stop = self._sync("train_begin")
        epoch = 0
        while not stop and epoch < self.epochs:
            stop = self._sync("epoch_begin", epoch)
            result.learning_rates.append(self.learning_rate())
            train, stopped_step = self._train_epoch(epoch, result, stop)
            if stopped_step is not None:
                result.stopped_at = (epoch, stopped_step)
            val = self._validate()
            report_stop = self._sync("epoch_end", epoch, train=train, val=val)
            result.epochs_run += 1
            stop = stop or stopped_step is not None or report_stop
            epoch += 1
        self._sync("train_end", max(epoch - 1, 0))
        if self.rank == 0:
            result.state_dict = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        return result

    def _train_epoch(self, epoch: int, result: LoopResult, already_stopped: bool) -> tuple[PhaseSums, int | None]:
        """Run one epoch; return (local sums, the step at which a decision stopped training)."""
        if already_stopped:
            return PhaseSums(), None
        self.ddp.train()
        self.train_sampler.set_epoch(epoch)
        cfg = self.config
        sums = _Accumulator()
        signal = self.signalled.signal
        stopped_step: int | None = None
        seen_loss, seen_n = 0.0, 0.0  # cluster-wide running loss, for progress only
        for step, batch in enumerate(self.train_loader):
            batch = move_to(batch, self.device)
            loss, metrics, n = split_output(self.train_step(self.ddp, batch), batch)
            detached = loss.detach()
            weighted_loss = sums.add(detached, metrics, n)
            values = torch.stack([(~torch.isfinite(detached)).to(signal.dtype), weighted_loss.to(signal.dtype),
                                  torch.full((), float(n), dtype=signal.dtype, device=signal.device)])
            (loss + (signal * values).sum()).backward()
            nonfinite, loss_sum, n_sum = (signal.grad * self.world_size).tolist()  # DDP averaged them
            signal.grad = None
            result.steps_run += 1
            if nonfinite > 0:
                self.optimizer.zero_grad(set_to_none=True)  # never apply a non-finite update
            else:
                if cfg.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            seen_loss, seen_n = seen_loss + loss_sum, seen_n + n_sum
            if self.rank == 0:
                self._maybe_progress(epoch, step, seen_loss / max(seen_n, 1.0))
            periodic = self.batch_sync_every is not None and (step + 1) % self.batch_sync_every == 0
            if nonfinite > 0 or periodic:
                running = sums.phase_sums()
                if self._sync("batch_end", epoch, step, train=running, nonfinite=nonfinite > 0):
                    stopped_step = step
                    break
        return sums.phase_sums(), stopped_step

    def _validate(self) -> PhaseSums | None:
        if self.val_loader is None:
            return None
        self.model.eval()
        sums = _Accumulator()
        with torch.no_grad():
            for batch in self.val_loader:
                batch = move_to(batch, self.device)
                loss, metrics, n = split_output(self.val_step(self.model, batch), batch)
                sums.add(loss.detach(), metrics, n)
        self.model.train()
        return sums.phase_sums()

    def _maybe_progress(self, epoch: int, step: int, running_loss: float) -> None:
        now = time.monotonic()
        if now - self._last_progress >= self.config.progress_interval_s:
            self._last_progress = now
            self.link.progress(epoch, step, {"loss": running_loss if math.isfinite(running_loss) else float("nan")})


class _Accumulator:
    """Sums of ``value * n`` for the loss and every metric, kept on the device in float64."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.totals: torch.Tensor | None = None
        self.count = 0

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """Add one batch; return the batch's ``loss * n`` (float64, on the device)."""
        weighted = torch.stack([loss, *(v.detach().to(loss.device) for v in metrics.values())]).double() * n
        if self.totals is None:
            self.names, self.totals = ["loss", *metrics], weighted.clone()
        else:
            self.totals.add_(weighted)
        self.count += n
        return weighted[0]

    def phase_sums(self) -> PhaseSums:
        """The sums as Python floats (one device sync)."""
        values = self.totals.tolist() if self.totals is not None else []
        return PhaseSums(totals=dict(zip(self.names, values)), count=self.count)
