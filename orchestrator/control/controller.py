"""The driver's controller: explicit states, a failure policy that returns a decision, restarts.

    Starting -> Running -> (Restarting -> Running)* -> Finished | Failed | Preempted

Each attempt starts a fresh coordinator and worker group and resumes from the newest committed
backup in the run directory. A failed attempt is handed to :class:`FailurePolicy`, which says
whether to restart; past ``max_failures`` ``fit`` raises an error listing every failure. A drain
of a node the attempt runs on (:class:`~orchestrator.control.attempt.NodesDrained`) is a preemption with
notice: the ranks stop at one step with an emergency backup and the next attempt resumes there on
the remaining nodes (Ray places nothing on a draining node), without counting a failure.
"""

from __future__ import annotations

import enum
import logging
import signal
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import ray

from orchestrator.control.attempt import AttemptFailed, FailureRecord, FitOutcome, NodesDrained, run_attempt
from orchestrator.control.specs import FitSpec, Resume
from orchestrator.core.events import EventType
from orchestrator.errors import OrchestratorError, Preempted, TrainingFailedError
from orchestrator.storage.checkpoint import latest_valid, read_coordinator_state, remove_newer
from orchestrator.storage.run_files import EventLog, bump_attempt, update_run_json, write_run_json
from orchestrator.cluster.worker_group import WorkerGroup

logger = logging.getLogger(__name__)

__all__ = ["ControllerState", "FailurePolicy", "FitOutcome", "FitSpec", "ensure_ray", "run_fit"]


class ControllerState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    FINISHED = "finished"
    FAILED = "failed"
    PREEMPTED = "preempted"


@dataclass(frozen=True)
class FailureDecision:
    restart: bool
    reason: str


class FailurePolicy:
    """Restart while the number of failures is at most ``max_failures``.

    Example:
        >>> FailurePolicy(1).decide([object()]).restart, FailurePolicy(1).decide([object(), object()]).restart
        (True, False)
    """

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures

    def decide(self, failures: list[Any]) -> FailureDecision:
        if len(failures) <= self.max_failures:
            return FailureDecision(True, f"failure {len(failures)} of at most {self.max_failures}: restarting")
        return FailureDecision(False, f"{len(failures)} failures exceed max_failures={self.max_failures}")


def ensure_ray() -> bool:
    """Use the Ray cluster already initialised (or named by RAY_ADDRESS); else start a local one.

    Returns True when this call started Ray (so the caller shuts it down).
    """
    if ray.is_initialized():
        return False
    ray.init(logging_level=logging.WARNING, log_to_driver=True)
    return True


def find_resume(fit: FitSpec, storage: Any, events: EventLog) -> Resume:
    """The newest valid committed backup (folder, coordinator state), after removing newer leftovers."""
    backup_dir = fit.backups.folder

    def skipped(step: int, reason: str) -> None:
        warnings.warn(f"skipping backup step {step} in {storage.url(backup_dir)}: {reason}", stacklevel=4)
        events.append(EventType.BACKUP_SKIPPED, step=step, reason=reason)

    found = latest_valid(storage, backup_dir, on_skip=skipped)
    remove_newer(storage, backup_dir, found.manifest.step if found else None)
    if found is None:
        return Resume()
    if found.manifest.world_size != fit.scaling.num_workers:
        raise OrchestratorError(
            f"the backup in {storage.url(found.folder)} was written by {found.manifest.world_size} workers; "
            f"resume with num_workers={found.manifest.world_size}")
    state = read_coordinator_state(storage, found.folder)
    events.append(EventType.RESTORED, epoch=found.manifest.epoch, step=found.manifest.step, folder=found.folder,
                  phase=found.manifest.phase)
    return Resume(folder=found.folder, state=state)


class _SigtermToPreemption:
    """While active (main thread only), SIGTERM sets ``event`` instead of killing the driver."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.previous: Any = None

    def __enter__(self) -> "_SigtermToPreemption":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.event.set())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def run_fit(fit: FitSpec) -> FitOutcome:
    """Run training to the end across attempts; raise what ends it otherwise."""
    storage = fit.storage.open()
    storage.check_access()  # before any worker starts
    write_run_json(storage, dict(fit.config_snapshot, world_size=fit.scaling.num_workers))
    update_run_json(storage, status="running")
    started_ray = ensure_ray()
    group = WorkerGroup(fit.scaling, placement_timeout_s=fit.faults.placement_timeout_s,
                        warm_standbys=fit.faults.warm_standbys and fit.faults.max_failures > 0)
    try:
        group.check_capacity()  # a clear error before any worker starts
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    policy = FailurePolicy(fit.faults.max_failures)
    failures: list[FailureRecord] = []
    outcome = FitOutcome()
    preempt = threading.Event()
    state = ControllerState.STARTING
    try:
        with _SigtermToPreemption(preempt):
            while True:
                attempt = bump_attempt(storage)
                events = EventLog(storage, attempt)
                resume = find_resume(fit, storage, events)
                state = ControllerState.RUNNING
                try:
                    results = run_attempt(fit, attempt, storage, events, resume, outcome, preempt, group)
                except NodesDrained as drained:  # a preemption with notice: not a failure
                    state = ControllerState.RESTARTING
                    group.shutdown()  # its placement group has bundles on the draining nodes
                    events.append(EventType.PREEMPTED, step=drained.step, reason="node_drain", nodes=drained.nodes,
                                  lost=drained.lost)
                    logger.warning("nodes %s are being drained; resuming on the remaining nodes (waiting up to "
                                   "%gs for enough of them)", drained.nodes, fit.faults.placement_timeout_s)
                    continue
                except AttemptFailed as failed:
                    failures.append(failed.record)
                    events.append(EventType.WORKER_FAILED, rank=failed.record.rank, node=failed.record.node,
                                  cause=failed.record.cause)
                    decision = policy.decide(failures)
                    if decision.restart:
                        state = ControllerState.RESTARTING
                        logger.warning("attempt %d failed (%s); %s", attempt, failed.record.cause, decision.reason)
                        continue
                    state = ControllerState.FAILED
                    _fail(storage, events, failed.error)
                    if len(failures) == 1:
                        raise failed.error
                    raise TrainingFailedError(failures) from failed.error
                except BaseException as exc:
                    state = ControllerState.FAILED
                    _fail(storage, events, exc)
                    raise
                outcome.results = results
                if any(r.preempted for r in results):
                    state = ControllerState.PREEMPTED
                    events.append(EventType.PREEMPTED, step=max(r.steps_run for r in results))
                    update_run_json(storage, status="preempted")
                    outcome.preempted = True
                    raise Preempted(f"training was preempted; an emergency backup is in {storage.url(fit.backups.folder)}"
                                    "; run the same command again to resume")
                state = ControllerState.FINISHED
                if fit.backups.delete_at_end:
                    storage.rm(fit.backups.folder, recursive=True)
                events.append(EventType.FINISHED, epochs=len(results[0].learning_rates))
                update_run_json(storage, status="finished")
                return outcome
    finally:
        logger.debug("controller ended in state %s", state.value)
        group.shutdown()
        if started_ray:
            ray.shutdown()


def _fail(storage: Any, events: EventLog, exc: BaseException) -> None:
    """Record a failure without masking the error being raised."""
    try:
        first = str(exc).splitlines()[0] if str(exc) else ""
        events.append(EventType.FAILED, error=f"{type(exc).__name__}: {first}")
        update_run_json(storage, status="failed")
    except Exception as record_error:
        logger.warning("could not record the failure: %s", record_error)
