"""The driver loop: start the coordinator and the worker group, watch them, clean up."""

from __future__ import annotations

import builtins
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import ray

from orchestrator.callbacks.base import Callback, TrainingView
from orchestrator.config import LoopConfig, ScalingConfig
from orchestrator.coordinator import Coordinator
from orchestrator.errors import CoordinatorError, WorkerError, WorkerLostError
from orchestrator.trainer import LoopResult
from orchestrator.worker import WorkerFailure
from orchestrator.worker_group import WorkerGroup

logger = logging.getLogger(__name__)


@dataclass
class FitPlan:
    """Everything one ``fit`` call needs, validated by :class:`orchestrator.Trainer`."""

    loop: LoopConfig
    scaling: ScalingConfig
    epochs: int
    callbacks: list[Callback]
    driver_callbacks: list[Callback]
    params: dict[str, Any]
    batch_sync_every: int | None = None
    threads_per_worker: int | None = None
    poll_interval_s: float = 0.2


@dataclass
class FitOutcome:
    results: list[LoopResult] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    callback_states: list[dict[str, Any]] = field(default_factory=list)


def ensure_ray() -> bool:
    """Use the Ray cluster already initialised (or named by RAY_ADDRESS); else start a local one.

    Returns True when this call started Ray (so the caller shuts it down).
    """
    if ray.is_initialized():
        return False
    ray.init(logging_level=logging.WARNING, log_to_driver=True)
    return True


class DriverCallbacks:
    """Replays the coordinator's events to display-only callbacks (ProgbarLogger, History)."""

    def __init__(self, callbacks: list[Callback], params: dict[str, Any]) -> None:
        self.callbacks = callbacks
        self.params = params
        self.view = TrainingView()
        for cb in callbacks:
            cb.set_params(params)
            cb.set_trainer(self.view)

    def dispatch(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        self.view.extra["event_time"] = event["time"]
        self.view.epoch = event.get("epoch", self.view.epoch)
        for cb in self.callbacks:
            if kind == "train_begin":
                self.params["steps"] = event["steps"]
                cb.on_train_begin({})
            elif kind == "epoch_begin":
                cb.on_epoch_begin(event["epoch"], {})
            elif kind in ("progress", "batch_end"):
                cb.on_train_batch_end(event["step"], dict(event["logs"]))
            elif kind == "epoch_end":
                cb.on_epoch_end(event["epoch"], dict(event["logs"]))
            elif kind == "train_end":
                cb.on_train_end(dict(event["logs"]))


def run_fit(plan: FitPlan) -> FitOutcome:
    """Run one training to the end; raise the first worker or callback error after cleanup."""
    started_ray = ensure_ray()
    group = WorkerGroup(plan.scaling)
    coordinator = None
    outcome = FitOutcome()
    driver = DriverCallbacks(plan.driver_callbacks, plan.params)
    try:
        coordinator = Coordinator.remote(plan.callbacks, plan.params, plan.scaling.num_workers)
        infos = group.start()
        refs = group.run(plan.loop, plan.epochs, coordinator, plan.scaling.use_gpu, plan.batch_sync_every,
                         plan.threads_per_worker)
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, LoopResult] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=plan.poll_interval_s)
            for ref in ready:
                rank = rank_of[ref]
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    info = infos[rank]
                    raise WorkerLostError(
                        f"rank {rank} (node {info['node']}, pid {info['pid']}) died: {exc}") from None
                if isinstance(value, WorkerFailure):
                    _raise_coordinator_error(coordinator)
                    err = WorkerError(value.rank, value.node, value.error_type, value.message, value.traceback)
                    raise err from value.exception
                results[rank] = value
            _dispatch(coordinator, driver, outcome)
        _dispatch(coordinator, driver, outcome)
        _raise_coordinator_error(coordinator)
        outcome.callback_states = ray.get(coordinator.callback_states.remote())
        outcome.results = [results[r] for r in sorted(results)]
        return outcome
    finally:
        group.shutdown()
        if coordinator is not None:
            ray.kill(coordinator, no_restart=True)
        if started_ray:
            ray.shutdown()


def _dispatch(coordinator: Any, driver: DriverCallbacks, outcome: FitOutcome) -> None:
    for event in ray.get(coordinator.poll.remote()):
        outcome.events.append(event)
        if event["type"] == "warning":
            category = getattr(builtins, event["category"], UserWarning)
            if not (isinstance(category, type) and issubclass(category, Warning)):
                category = UserWarning
            warnings.warn(event["message"], category, stacklevel=4)
        driver.dispatch(event)


def _raise_coordinator_error(coordinator: Any) -> None:
    error, tb = ray.get(coordinator.error.remote())
    if error is not None:
        raise error from CoordinatorError(f"a callback raised on the coordinator:\n{tb}")
    if tb:
        raise CoordinatorError(f"a callback raised on the coordinator:\n{tb}")
