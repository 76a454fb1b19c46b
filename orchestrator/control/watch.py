"""The watch loop of one attempt: wait for every rank, relay the coordinator's events, spot the ends.

The loop never waits on a collective: it polls Ray for finished ranks, the coordinator for
events and heartbeat ages (the hang watchdog), Ray for drains of the attempt's nodes, and the
driver's preemption flag. A failure is raised as :class:`AttemptFailed` naming the rank to blame.
"""

from __future__ import annotations

import builtins
import logging
import re
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import ray

from orchestrator.callbacks.base import Callback, TrainingView
from orchestrator.callbacks.history import History
from orchestrator.cluster.worker import WorkerFailure
from orchestrator.cluster.worker_group import WorkerGroup, draining_nodes
from orchestrator.control.failures import AttemptFailed, FailureRecord
from orchestrator.control.specs import FaultPolicy
from orchestrator.control.states import FitOutcome
from orchestrator.core.events import EventType, event_type, stop_event_type
from orchestrator.errors import CoordinatorError, HangError, OrchestratorError, WorkerError, WorkerLostError
from orchestrator.loop.specs import LoopResult
from orchestrator.storage.run_files import EventLog

logger = logging.getLogger(__name__)

__all__ = ["DrainWatch", "DriverCallbacks", "Relay", "watch"]


class DrainWatch:
    """Polls Ray (at most every ``interval_s``) for drains of the nodes an attempt runs on.

    Args:
        nodes: The Ray node ids to watch.
        interval_s: Least time between two questions to Ray.

    Example:
        >>> DrainWatch(set(), interval_s=1.0).draining
        {}
    """

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
    """Replays the coordinator's events to display-only callbacks (ProgbarLogger, History).

    Args:
        callbacks: The driver's callbacks.
        params: Keras-style params (``steps`` is set from each ``train_begin`` event).
        restored_history: The epochs a resumed attempt starts after, replayed into History.

    Example:
        >>> history = History()
        >>> DriverCallbacks([history], {}).dispatch({"type": "epoch_end", "time": 0.0, "epoch": 0, "logs": {"loss": 1.0}})
        >>> history.history
        {'loss': [1.0]}
    """

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
            if kind == EventType.TRAIN_BEGIN:
                self.params["steps"] = event["steps"]
                if isinstance(cb, History):  # an attempt starts over from the restored epochs
                    cb.load_state_dict({})
                cb.on_train_begin({})
                if isinstance(cb, History):
                    for past in self.restored_history:
                        cb.on_epoch_end(past["epoch"], dict(past["logs"]))
            elif kind == EventType.EPOCH_BEGIN:
                cb.on_epoch_begin(event["epoch"], {})
            elif kind in (EventType.PROGRESS, EventType.BATCH_END):
                cb.on_train_batch_end(event["step"], dict(event["logs"]))
            elif kind == EventType.EPOCH_END:
                cb.on_epoch_end(event["epoch"], dict(event["logs"]))
            elif kind == EventType.TRAIN_END:
                cb.on_train_end(dict(event["logs"]))


@dataclass
class Relay:
    """Where the coordinator's events go: the outcome, ``events.jsonl`` and the driver's callbacks.

    Args:
        coordinator: The attempt's coordinator actor.
        driver: The display-only callbacks.
        outcome: Collects every event of the ``fit``.
        events: The attempt's ``events.jsonl`` writer.
    """

    coordinator: Any
    driver: DriverCallbacks
    outcome: FitOutcome
    events: EventLog

    def dispatch(self, timeout_s: float | None = None) -> dict[int, float]:
        """Forward new events; return each rank's seconds since its last sign of life."""
        new_events, ages = ray.get(self.coordinator.poll.remote(), timeout=timeout_s)
        for event in new_events:
            self.outcome.events.append(event)
            _persist_event(self.events, event)
            if event["type"] == EventType.WARNING:
                category = getattr(builtins, event["category"], UserWarning)
                if not (isinstance(category, type) and issubclass(category, Warning)):
                    category = UserWarning
                warnings.warn(event["message"], category, stacklevel=4)
            self.driver.dispatch(event)
        return ages

    def flush(self, timeout_s: float = 10.0) -> None:
        """Forward what the coordinator still holds (at the end of an attempt, however it ended); never raises."""
        try:
            self.dispatch(timeout_s)
        except Exception as exc:  # noqa: BLE001 - a lost coordinator: its last events are gone with it
            logger.debug("could not collect the coordinator's last events: %s", exc)

    def raise_coordinator_error(self) -> None:
        error, tb = ray.get(self.coordinator.error.remote())
        if error is not None:
            raise error from CoordinatorError(f"a callback raised on the coordinator:\n{tb}")
        if tb:
            raise CoordinatorError(f"a callback raised on the coordinator:\n{tb}")


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


def watch(faults: FaultPolicy, attempt: int, group: WorkerGroup, relay: Relay, infos: list[dict[str, Any]],
          refs: list[Any], preempt: threading.Event, drain: DrainWatch) -> list[LoopResult]:
    """Wait for every rank of ``attempt``, relaying events; handle hangs, SIGTERM and node drains.

    Raises:
        AttemptFailed: A rank died, raised or hung.
        OrchestratorError: The ranks did not stop within ``preemption_grace_s`` of a preemption.
        Anything a coordinator callback raised.
    """
    rank_of = {ref: rank for rank, ref in enumerate(refs)}
    results: dict[int, LoopResult] = {}
    pending = list(refs)
    stop_deadline: float | None = None
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=faults.poll_interval_s)
        for ref in ready:
            try:
                results[rank_of[ref]] = _result_or_raise(ref, rank_of[ref], attempt, infos, relay)
            except AttemptFailed as failed:
                raise _root_cause(failed, pending, rank_of, attempt, infos) from failed.error
        ages = relay.dispatch()
        if len(ages) == len(refs):  # every rank built its model and data: warm replacements up now
            group.prepare_standbys()
        newly_draining = drain.check()
        if newly_draining:
            hosts = sorted({i["node"] for i in infos if i["node_id"] in newly_draining})
            logger.warning("Ray is draining nodes %s (%s) of this run: stopping at the next step with an "
                           "emergency backup, then continuing on the remaining nodes", sorted(newly_draining), hosts)
            relay.events.append(EventType.NODE_DRAINING, nodes=sorted(newly_draining), hosts=hosts,
                                deadlines_ms=[newly_draining[n] for n in sorted(newly_draining)])
        if (preempt.is_set() or drain.draining) and stop_deadline is None:
            stop_deadline = time.monotonic() + faults.preemption_grace_s
            for w in group.workers:
                w.notify_preemption.remote()
        if stop_deadline is not None and time.monotonic() > stop_deadline:
            raise OrchestratorError(f"the workers did not stop within preemption_grace_s={faults.preemption_grace_s}")
        stale = {r: a for r, a in ages.items() if r not in results and a > faults.hang_timeout_s}
        if stale and stop_deadline is None:
            rank = max(stale, key=stale.get)
            error = HangError(f"rank {rank} (node {infos[rank]['node']}) made no progress for "
                              f"{stale[rank]:.0f}s (hang_timeout_s={faults.hang_timeout_s:g})")
            raise AttemptFailed(FailureRecord(attempt, rank, infos[rank]["node"], str(error)), error)
    relay.dispatch()
    relay.raise_coordinator_error()
    return [results[r] for r in sorted(results)]


# A survivor's collective error when a peer process is gone (gloo, NCCL, the TCP store).
_PEER_LOSS = re.compile(r"connection (reset|closed|refused)|broken pipe|by peer|remote process|"
                        r"nccl|gloo|tcpstore", re.IGNORECASE)
PEER_LOSS_WAIT_S = 3.0


def _root_cause(failed: AttemptFailed, pending: list[Any], rank_of: dict[Any, int], attempt: int,
                infos: list[dict[str, Any]]) -> AttemptFailed:
    """The failure to record: when a rank reports a lost peer, the peer's own failure if it shows up soon.

    A rank that dies or raises makes its peers raise in their collective, and a peer's error may
    reach the driver first; blaming that survivor would name the wrong rank, node and cause. The
    root cause is a rank that died, or one that raised anything but a lost peer.
    """
    if not isinstance(failed.error, WorkerError) or not _PEER_LOSS.search(failed.record.cause):
        return failed
    deadline = time.monotonic() + PEER_LOSS_WAIT_S
    waiting = list(pending)
    while waiting and time.monotonic() < deadline:
        ready, waiting = ray.wait(waiting, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        for ref in ready:
            try:
                value = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                return _death(rank_of[ref], infos[rank_of[ref]], attempt, exc)
            except Exception:  # noqa: BLE001 - an unreadable result: keep looking
                continue
            if isinstance(value, WorkerFailure) and not _PEER_LOSS.search(f"{value.error_type}: {value.message}"):
                return _raised(value, attempt)
    return failed


def _death(rank: int, info: dict[str, Any], attempt: int, exc: BaseException) -> AttemptFailed:
    cause = f"rank {rank} (node {info['node']}, pid {info['pid']}) died: {str(exc).splitlines()[0]}"
    return AttemptFailed(FailureRecord(attempt, rank, info["node"], cause), WorkerLostError(cause))


def _raised(value: WorkerFailure, attempt: int) -> AttemptFailed:
    error = WorkerError(value.rank, value.node, value.error_type, value.message, value.traceback)
    error.__cause__ = value.exception
    cause = f"rank {value.rank} raised {value.error_type}: {value.message}"
    return AttemptFailed(FailureRecord(attempt, value.rank, value.node, cause), error)


def _result_or_raise(ref: Any, rank: int, attempt: int, infos: list[dict[str, Any]], relay: Relay) -> LoopResult:
    try:
        value = ray.get(ref)
    except ray.exceptions.RayActorError as exc:
        raise _death(rank, infos[rank], attempt, exc) from None
    if isinstance(value, WorkerFailure):
        relay.dispatch()
        relay.raise_coordinator_error()
        raise _raised(value, attempt)
    return value
