"""The driver loop: start the coordinator and the worker group, watch them, clean up."""

from __future__ import annotations

import builtins
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import ray

from orchestrator.callbacks.base import Callback, TrainingView
from orchestrator.callbacks.history import History
from orchestrator.checkpoint import latest_valid, remove_newer
from orchestrator.config import LoopConfig, ScalingConfig
from orchestrator.coordinator import Coordinator
from orchestrator.errors import CoordinatorError, OrchestratorError, WorkerError, WorkerLostError
from orchestrator.loop_state import COORDINATOR_FILE
from orchestrator.state import from_bytes
from orchestrator.storage import EventLog, StorageSpec, bump_attempt, is_local, write_marker, write_run_json
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
    storage: StorageSpec | None = None
    config_snapshot: dict[str, Any] = field(default_factory=dict)
    backup_dir: str | None = None  # set when a BackupAndRestore callback is present
    delete_backups_at_end: bool = False

# coordinator event types that go to events.jsonl (progress and batch logs stay in memory)
PERSISTED_EVENTS = {"lr_changed", "nan_detected", "checkpoint_saved", "backup_committed", "backup_failed",
                    "epoch_end", "warning"}
STOP_EVENT_TYPES = {"early_stopping": "early_stopping", "nan_detected": "terminated_on_nan"}


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

    def __init__(self, callbacks: list[Callback], params: dict[str, Any],
                 restored_history: list[dict[str, Any]] | None = None) -> None:
        self.callbacks = callbacks
        self.params = params
        self.restored_history = restored_history or []
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
                if isinstance(cb, History):  # epochs run before a resume
                    for past in self.restored_history:
                        cb.on_epoch_end(past["epoch"], dict(past["logs"]))
            elif kind == "epoch_begin":
                cb.on_epoch_begin(event["epoch"], {})
            elif kind in ("progress", "batch_end"):
                cb.on_train_batch_end(event["step"], dict(event["logs"]))
            elif kind == "epoch_end":
                cb.on_epoch_end(event["epoch"], dict(event["logs"]))
            elif kind == "train_end":
                cb.on_train_end(dict(event["logs"]))


def prepare_storage(plan: FitPlan) -> tuple[Any, EventLog | None, str | None, dict[str, Any] | None]:
    """Check the storage, write run.json, find the backup to resume from (before any worker starts).

    Returns (storage, event log, resume folder or None, coordinator state to restore or None).
    """
    if plan.storage is None:
        return None, None, None, None
    storage = plan.storage.open()
    storage.check_access()
    attempt = bump_attempt(storage)
    write_run_json(storage, dict(plan.config_snapshot, world_size=plan.scaling.num_workers))
    events = EventLog(storage, attempt)
    if plan.backup_dir is None:
        return storage, events, None, None

    def skipped(step: int, reason: str) -> None:
        warnings.warn(f"skipping backup step {step} in {storage.url(plan.backup_dir)}: {reason}", stacklevel=3)
        events.append("backup_skipped", step=step, reason=reason)

    found = latest_valid(storage, plan.backup_dir, on_skip=skipped)
    remove_newer(storage, plan.backup_dir, found.manifest.step if found else None)
    if found is None:
        return storage, events, None, None
    if found.manifest.world_size != plan.scaling.num_workers:
        raise OrchestratorError(
            f"the backup in {storage.url(found.folder)} was written by {found.manifest.world_size} workers; "
            f"resume with num_workers={found.manifest.world_size}")
    restore = from_bytes(storage.read_bytes(f"{found.folder}/{COORDINATOR_FILE}"))
    events.append("restored", epoch=found.manifest.epoch, step=found.manifest.step, folder=found.folder,
                  phase=found.manifest.phase)
    return storage, events, found.folder, restore


def run_fit(plan: FitPlan) -> FitOutcome:
    """Run one training to the end; raise the first worker or callback error after cleanup."""
    storage, events, resume_from, restore = prepare_storage(plan)
    started_ray = ensure_ray()
    group = WorkerGroup(plan.scaling)
    coordinator = None
    outcome = FitOutcome()
    driver = DriverCallbacks(plan.driver_callbacks, plan.params, (restore or {}).get("history"))
    try:
        coordinator = Coordinator.remote(plan.callbacks, plan.params, plan.scaling.num_workers, plan.storage, restore)
        infos = group.start()
        if storage is not None:
            _check_storage_visible(group, plan.storage, storage, infos)
            events.append("started", world_size=plan.scaling.num_workers,
                          nodes=sorted({i["node"] for i in infos}))
        refs = group.run(plan.loop, plan.epochs, coordinator, plan.scaling.use_gpu, plan.batch_sync_every,
                         plan.threads_per_worker, plan.storage, resume_from)
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
                    _dispatch(coordinator, driver, outcome, events)
                    _raise_coordinator_error(coordinator)
                    err = WorkerError(value.rank, value.node, value.error_type, value.message, value.traceback)
                    raise err from value.exception
                results[rank] = value
            _dispatch(coordinator, driver, outcome, events)
        _dispatch(coordinator, driver, outcome, events)
        _raise_coordinator_error(coordinator)
        outcome.callback_states = ray.get(coordinator.callback_states.remote())
        outcome.results = [results[r] for r in sorted(results)]
        if events is not None:
            if plan.backup_dir is not None and plan.delete_backups_at_end:
                storage.rm(plan.backup_dir, recursive=True)
            events.append("finished", epochs=len(outcome.results[0].learning_rates))
        return outcome
    except BaseException as exc:
        if events is not None:
            _safe_append(events, "failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        raise
    finally:
        group.shutdown()
        if coordinator is not None:
            ray.kill(coordinator, no_restart=True)
        if started_ray:
            ray.shutdown()


def _check_storage_visible(group: WorkerGroup, spec: StorageSpec, storage: Any, infos: list[dict[str, Any]]) -> None:
    """A local path on a multi-node cluster must be shared storage every worker sees."""
    if not is_local(storage) or len({i["node_id"] for i in infos}) < 2:
        return
    marker = write_marker(storage)
    try:
        seen = ray.get([w.can_read.remote(spec, marker) for w in group.workers])
    finally:
        storage.rm(marker)
    blind = [infos[r]["node"] for r, ok in enumerate(seen) if not ok]
    if blind:
        raise OrchestratorError(
            f"storage {storage.url()} is a local path that workers on {sorted(set(blind))} cannot see; "
            "use shared storage (NFS mounted at the same path on every node) or an object store URL such as s3://")


def _dispatch(coordinator: Any, driver: DriverCallbacks, outcome: FitOutcome, events: EventLog | None) -> None:
    for event in ray.get(coordinator.poll.remote()):
        outcome.events.append(event)
        if events is not None:
            _persist_event(events, event)


def _safe_append(events: EventLog, kind: str, **fields: Any) -> None:
    """Record an event on the failure path without masking the error being raised."""
    try:
        events.append(kind, **fields)
    except Exception as exc:
        logger.warning("could not record the %r event: %s", kind, exc)
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


def _persist_event(events: EventLog, event: dict[str, Any]) -> None:
    kind = event["type"]
    fields = {k: v for k, v in event.items() if k not in ("type", "time", "epoch", "step")}
    if kind == "stop":
        kind = STOP_EVENT_TYPES.get(event.get("reason", ""), "stopped")
    elif kind not in PERSISTED_EVENTS:
        return
    events.append(kind, epoch=event.get("epoch"), step=event.get("step"), **fields)
