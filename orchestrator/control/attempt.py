"""One attempt: start the coordinator and the worker group, watch them until they end, clean up.

The watch loop never waits on a collective: it polls Ray for finished ranks, the coordinator for
events and heartbeat ages (the hang watchdog), and the driver's preemption flag. Any failure
ends the whole group at once (ranks stuck in a collective are killed, not waited for).
"""

from __future__ import annotations

import builtins
import logging
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import ray

from orchestrator.callbacks.base import Callback, TrainingView
from orchestrator.callbacks.history import History
from orchestrator.errors import CoordinatorError, HangError, OrchestratorError, WorkerError, WorkerLostError
from orchestrator.storage.run_files import EventLog, write_marker
from orchestrator.cluster.worker import WorkerFailure
from orchestrator.cluster.worker_group import WorkerGroup, draining_nodes
from orchestrator.control.specs import FitSpec, Resume
from orchestrator.core.events import EventType, event_type, stop_event_type
from orchestrator.loop.specs import LoopResult
from orchestrator.storage.fs import StorageSpec

logger = logging.getLogger(__name__)

@dataclass
class FitOutcome:
    results: list[LoopResult] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    callback_states: list[dict[str, Any]] = field(default_factory=list)
    preempted: bool = False


@dataclass(frozen=True)
class FailureRecord:
    """One failed attempt: which rank, where, and why."""

    attempt: int
    rank: int | None
    node: str
    cause: str


class AttemptFailed(Exception):
    """An attempt ended by a worker failure or a hang (retryable under ``max_failures``)."""

    def __init__(self, record: FailureRecord, error: BaseException) -> None:
        super().__init__(record.cause)
        self.record = record
        self.error = error


class NodesDrained(Exception):
    """Ray is draining nodes that host this attempt (a preemption with notice): not a failure.

    Every rank stopped at the same step and the emergency backup there was committed (``step``),
    or, when ranks on those nodes were lost first, the attempt ended (``lost``); either way the
    next attempt resumes from the newest committed backup on the remaining nodes.
    """

    def __init__(self, nodes: list[str], step: int | None = None, lost: str | None = None) -> None:
        super().__init__(f"nodes {nodes} are being drained")
        self.nodes = nodes
        self.step = step
        self.lost = lost


class DrainWatch:
    """Polls Ray (at most every ``interval_s``) for drains of the nodes an attempt runs on."""

    def __init__(self, nodes: set[str], interval_s: float) -> None:
        self.nodes = nodes
        self.interval_s = interval_s
        self.draining: dict[str, int] = {}
        self._next = 0.0

    def check(self) -> dict[str, int]:
        """Watched nodes newly seen draining: node id -> deadline (ms since the epoch; 0: none)."""
        now = time.monotonic()
        if now < self._next:
            return {}
        self._next = now + self.interval_s
        new = {n: d for n, d in draining_nodes().items() if n in self.nodes and n not in self.draining}
        self.draining.update(new)
        return new


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
                if isinstance(cb, History):  # an attempt starts over from the restored epochs
                    cb.load_state_dict({})
                cb.on_train_begin({})
                if isinstance(cb, History):
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


def run_attempt(fit: FitSpec, attempt: int, storage: Any, events: EventLog, resume: Resume,
                outcome: FitOutcome, preempt: threading.Event, group: WorkerGroup) -> list[LoopResult]:
    """Run one attempt to its end on ``group`` (whose workers it stops at the end); return every rank's result.

    Raises:
        AttemptFailed: A worker died or raised, or a rank hung (retryable under ``max_failures``).
        NodesDrained: Nodes of this attempt are being drained (restart without counting a failure).
        Anything else: a callback's error, or the preemption grace exceeded.
    """
    driver = DriverCallbacks(fit.driver_callbacks, fit.params, (resume.state or {}).get("history"))
    coordinator_spec = fit.coordinator_spec(resume)
    coordinator, ready = group.coordinator(coordinator_spec)  # starts (or is a spare) while the workers start
    infos: list[dict[str, Any]] = []
    drain = DrainWatch(set(), fit.faults.drain_poll_interval_s)
    try:
        infos = group.start()
        try:
            ray.get(ready)
        except ray.exceptions.RayActorError as exc:  # a spare lost with its node: start a new one
            logger.info("coordinator lost before setup (%s); starting a new one", exc)
            ray.kill(coordinator, no_restart=True)
            coordinator, ready = group.coordinator(coordinator_spec)
            ray.get(ready)
        drain.nodes = {i["node_id"] for i in infos} | {ray.get(coordinator.node_id.remote())}
        if not group.promoted:  # promoted standbys sit where the checked workers were
            _check_storage_visible(group, fit.storage, storage, infos)
        events.append(EventType.STARTED, world_size=fit.scaling.num_workers, nodes=sorted({i["node"] for i in infos}),
                      node_ids=[i["node_id"] for i in infos], resumed_from=resume.folder, warm=group.promoted)
        refs = group.run(fit.train_spec(resume.folder), coordinator)
        try:
            results = _watch(fit, attempt, group, coordinator, driver, outcome, events, infos, refs, preempt, drain)
        except AttemptFailed as failed:
            rank = failed.record.rank
            if rank is not None and infos[rank]["node_id"] in drain.draining:  # expected: its node is going away
                raise NodesDrained(sorted(drain.draining), lost=failed.record.cause) from failed.error
            raise
        if drain.draining and not preempt.is_set() and any(r.preempted for r in results):
            raise NodesDrained(sorted(drain.draining), step=max(r.steps_run for r in results))
        outcome.callback_states = ray.get(coordinator.callback_states.remote())
        return results
    finally:
        group.stop_workers()
        ray.kill(coordinator, no_restart=True)


def _watch(fit: FitSpec, attempt: int, group: WorkerGroup, coordinator: Any, driver: DriverCallbacks,
           outcome: FitOutcome, events: EventLog, infos: list[dict[str, Any]], refs: list[Any],
           preempt: threading.Event, drain: DrainWatch) -> list[LoopResult]:
    """Wait for every rank, relaying events; handle hangs, SIGTERM and node drains."""
    rank_of = {ref: rank for rank, ref in enumerate(refs)}
    results: dict[int, LoopResult] = {}
    pending = list(refs)
    stop_deadline: float | None = None
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=fit.faults.poll_interval_s)
        for ref in ready:
            try:
                results[rank_of[ref]] = _result_or_raise(ref, rank_of[ref], attempt, infos, coordinator, driver,
                                                         outcome, events)
            except AttemptFailed as failed:
                raise _lost_rank_behind(failed, pending, rank_of, attempt, infos) from failed.error
        ages = _dispatch(coordinator, driver, outcome, events)
        if len(ages) == len(refs):  # every rank built its model and data: warm replacements up now
            group.prepare_standbys()
        newly_draining = drain.check()
        if newly_draining:
            hosts = sorted({i["node"] for i in infos if i["node_id"] in newly_draining})
            logger.warning("Ray is draining nodes %s (%s) of this run: stopping at the next step with an "
                           "emergency backup, then continuing on the remaining nodes", sorted(newly_draining), hosts)
            events.append(EventType.NODE_DRAINING, nodes=sorted(newly_draining), hosts=hosts,
                          deadlines_ms=[newly_draining[n] for n in sorted(newly_draining)])
        if (preempt.is_set() or drain.draining) and stop_deadline is None:
            stop_deadline = time.monotonic() + fit.faults.preemption_grace_s
            for w in group.workers:
                w.notify_preemption.remote()
        if stop_deadline is not None and time.monotonic() > stop_deadline:
            raise OrchestratorError(f"the workers did not stop within preemption_grace_s={fit.faults.preemption_grace_s}")
        stale = {r: a for r, a in ages.items() if r not in results and a > fit.faults.hang_timeout_s}
        if stale and stop_deadline is None:
            rank = max(stale, key=stale.get)
            error = HangError(f"rank {rank} (node {infos[rank]['node']}) made no progress for "
                              f"{stale[rank]:.0f}s (hang_timeout_s={fit.faults.hang_timeout_s:g})")
            raise AttemptFailed(FailureRecord(attempt, rank, infos[rank]["node"], str(error)), error)
    _dispatch(coordinator, driver, outcome, events)
    _raise_coordinator_error(coordinator)
    return [results[r] for r in sorted(results)]


# A survivor's collective error when a peer process is gone (gloo, NCCL, the TCP store).
_PEER_LOSS = re.compile(r"connection (reset|closed|refused)|broken pipe|by peer|remote process|"
                        r"nccl|gloo|tcpstore", re.IGNORECASE)
PEER_LOSS_WAIT_S = 3.0


def _lost_rank_behind(failed: AttemptFailed, pending: list[Any], rank_of: dict[Any, int], attempt: int,
                      infos: list[dict[str, Any]]) -> AttemptFailed:
    """The failure to record: when a rank reports a lost peer, the death of that peer if it shows up soon.

    A killed rank's peers often raise in their collective before Ray reports the death itself;
    blaming the survivor would name the wrong rank, node and cause.
    """
    if not isinstance(failed.error, WorkerError) or not _PEER_LOSS.search(failed.record.cause):
        return failed
    deadline = time.monotonic() + PEER_LOSS_WAIT_S
    waiting = list(pending)
    while waiting and time.monotonic() < deadline:
        ready, waiting = ray.wait(waiting, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                rank, info = rank_of[ref], infos[rank_of[ref]]
                cause = f"rank {rank} (node {info['node']}, pid {info['pid']}) died: {str(exc).splitlines()[0]}"
                return AttemptFailed(FailureRecord(attempt, rank, info["node"], cause), WorkerLostError(cause))
            except Exception:  # noqa: BLE001 - another rank's error: keep looking for a death
                pass
    return failed


def _result_or_raise(ref: Any, rank: int, attempt: int, infos: list[dict[str, Any]], coordinator: Any,
                     driver: DriverCallbacks, outcome: FitOutcome, events: EventLog) -> LoopResult:
    info = infos[rank]
    try:
        value = ray.get(ref)
    except ray.exceptions.RayActorError as exc:
        cause = f"rank {rank} (node {info['node']}, pid {info['pid']}) died: {str(exc).splitlines()[0]}"
        raise AttemptFailed(FailureRecord(attempt, rank, info["node"], cause), WorkerLostError(cause)) from None
    if isinstance(value, WorkerFailure):
        _dispatch(coordinator, driver, outcome, events)
        _raise_coordinator_error(coordinator)
        error = WorkerError(value.rank, value.node, value.error_type, value.message, value.traceback)
        error.__cause__ = value.exception
        cause = f"rank {value.rank} raised {value.error_type}: {value.message}"
        raise AttemptFailed(FailureRecord(attempt, value.rank, value.node, cause), error)
    return value


def _check_storage_visible(group: WorkerGroup, spec: StorageSpec, storage: Any, infos: list[dict[str, Any]]) -> None:
    """A local path on a multi-node cluster must be shared storage every worker sees."""
    if not storage.is_local or len({i["node_id"] for i in infos}) < 2:
        return
    marker = write_marker(storage)
    try:
        seen = ray.get([w.can_read.remote(spec, marker) for w in group.workers])
    finally:
        storage.rm(marker)
    blind = sorted({f"{infos[r]['node']} (node id {infos[r]['node_id'][:12]})" for r, ok in enumerate(seen) if not ok})
    if blind:
        raise OrchestratorError(
            f"storage {storage.url()} is a local path that workers on {', '.join(blind)} cannot see; "
            "use shared storage (NFS mounted at the same path on every node) or an object store URL such as s3://")


def _dispatch(coordinator: Any, driver: DriverCallbacks, outcome: FitOutcome, events: EventLog) -> dict[int, float]:
    """Forward new events; return each rank's seconds since its last sign of life."""
    new_events, ages = ray.get(coordinator.poll.remote())
    for event in new_events:
        outcome.events.append(event)
        _persist_event(events, event)
        if event["type"] == "warning":
            category = getattr(builtins, event["category"], UserWarning)
            if not (isinstance(category, type) and issubclass(category, Warning)):
                category = UserWarning
            warnings.warn(event["message"], category, stacklevel=4)
        driver.dispatch(event)
    return ages


def _persist_event(events: EventLog, event: dict[str, Any]) -> None:
    kind = event_type(event["type"])
    fields = {k: v for k, v in event.items() if k not in ("type", "time", "epoch", "step")}
    if kind is EventType.STOP:
        if event.get("reason") == "preempted":
            return  # the controller records "preempted" once
        kind = stop_event_type(event.get("reason", ""))
    elif kind is None or not kind.persisted or kind is EventType.PREEMPTED:
        return
    events.append(kind, epoch=event.get("epoch"), step=event.get("step"), **fields)


def _raise_coordinator_error(coordinator: Any) -> None:
    error, tb = ray.get(coordinator.error.remote())
    if error is not None:
        raise error from CoordinatorError(f"a callback raised on the coordinator:\n{tb}")
    if tb:
        raise CoordinatorError(f"a callback raised on the coordinator:\n{tb}")
