"""Validated configuration values. Every check names the argument and says what to change."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True)
class ScalingConfig:
    """How many workers and what each one holds.

    Args:
        num_workers: Number of data-parallel ranks. Defaults to ``1``.
        use_gpu: Give each worker one GPU and use NCCL. Defaults to ``False``.
        resources_per_worker: Ray resources per worker. Defaults to ``{"CPU": 1}`` (plus
            ``{"GPU": 1}`` with ``use_gpu``).
        placement_strategy: Ray placement-group strategy. Defaults to ``"PACK"``.
        threads_per_worker: torch intra-op threads per worker. Defaults to the worker's CPUs.
    """

    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: Mapping[str, float] | None = None
    placement_strategy: str = "PACK"
    threads_per_worker: int | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.num_workers, int) and not isinstance(self.num_workers, bool)
                 and self.num_workers >= 1,
                 f"num_workers must be an integer >= 1, got {self.num_workers!r}")
        _require(isinstance(self.use_gpu, bool), f"use_gpu must be True or False, got {self.use_gpu!r}")
        _require(self.placement_strategy in PLACEMENT_STRATEGIES,
                 f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got {self.placement_strategy!r}")
        if self.resources_per_worker is not None:
            _require(isinstance(self.resources_per_worker, Mapping)
                     and all(isinstance(v, (int, float)) and v >= 0 for v in self.resources_per_worker.values()),
                     "resources_per_worker must map resource names to non-negative numbers, "
                     f"got {self.resources_per_worker!r}")
        _require(self.threads_per_worker is None or (isinstance(self.threads_per_worker, int)
                                                     and not isinstance(self.threads_per_worker, bool)
                                                     and self.threads_per_worker >= 1),
                 f"threads_per_worker must be an integer >= 1, got {self.threads_per_worker!r}")
        if self.threads_per_worker is None:  # the worker's CPUs
            object.__setattr__(self, "threads_per_worker", max(1, int(self.worker_resources().get("CPU", 1))))

    def worker_resources(self) -> dict[str, float]:
        res = dict(self.resources_per_worker or {"CPU": 1})
        if self.use_gpu:
            res.setdefault("GPU", 1)
        return res


@dataclass(frozen=True)
class LoopConfig:
    """What every worker needs to build and run its training loop (all factories picklable).

    Args:
        model: ``() -> torch.nn.Module``.
        optimizer: ``(params) -> torch.optim.Optimizer``.
        loss: ``(outputs, targets) -> scalar tensor`` (batch mean); unused with ``train_step``.
        data: ``() -> (train_dataset, val_dataset or None)``, map-style datasets.
        metrics: Names of built-in metrics or ``name -> fn(outputs, targets)``.
        batch_size: Per-worker batch size.
        val_batch_size: Per-worker validation batch size. Defaults to ``batch_size``.
        train_step / val_step: Optional custom steps, see :mod:`orchestrator.loop.steps`.
        clip_grad_norm: Clip the global gradient norm to this value. Defaults to ``None``.
        seed: Seed for model init, shuffling and RNGs. Defaults to ``0``.
        progress_interval_s: Seconds between progress updates sent to the driver.
    """

    model: Callable[[], Any]
    optimizer: Callable[[Any], Any]
    data: Callable[[], Any]
    loss: Callable[..., Any] | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    val_batch_size: int | None = None
    train_step: Callable[..., Any] | None = None
    val_step: Callable[..., Any] | None = None
    clip_grad_norm: float | None = None
    seed: int = 0
    progress_interval_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("model", "optimizer", "data"):
            _require(callable(getattr(self, name)),
                     f"{name} must be a callable that builds the {name} on each worker, "
                     f"got {getattr(self, name)!r}")
        _require(self.loss is not None or self.train_step is not None,
                 "loss is required unless you pass train_step=fn that computes the loss itself")
        for name in ("loss", "train_step", "val_step"):
            value = getattr(self, name)
            _require(value is None or callable(value), f"{name} must be callable, got {value!r}")
        for name in ("batch_size", "val_batch_size"):
            value = getattr(self, name)
            if value is None and name == "val_batch_size":
                continue
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                     f"{name} must be an integer >= 1 (samples per worker per step), got {value!r}")
        _require(self.clip_grad_norm is None or (isinstance(self.clip_grad_norm, (int, float))
                                                 and self.clip_grad_norm > 0),
                 f"clip_grad_norm must be a positive number or None, got {self.clip_grad_norm!r}")
        _require(isinstance(self.seed, int) and not isinstance(self.seed, bool),
                 f"seed must be an integer, got {self.seed!r}")
        _require(self.progress_interval_s > 0, "progress_interval_s must be > 0")


def validate_run_name(run_name: str) -> str:
    _require(isinstance(run_name, str) and bool(_RUN_NAME.match(run_name)),
             f"run_name must be 1-128 characters of letters, digits, '.', '_' or '-' and start with "
             f"a letter or digit, got {run_name!r}")
    return run_name


def validate_epochs(epochs: Any) -> int:
    _require(isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1,
             f"epochs must be an integer >= 1, got {epochs!r}")
    return epochs
