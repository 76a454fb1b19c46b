"""One attempt: start the coordinator and the worker group's workers, watch them until they end, clean up.

The worker group is given (the controller owns it across attempts); an attempt starts its
workers, stops them at its end, and after a drain also releases the group's placement (its
bundles sit on the draining nodes). Any failure ends the whole group at once: ranks stuck in a
collective are killed, not waited for.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

import ray

from orchestrator.cluster.specs import CoordinatorSpec
from orchestrator.cluster.survivors import keep_survivors
from orchestrator.cluster.worker_group import CALL_TIMEOUT_S, WorkerGroup, get_within, startup_timeout_s
from orchestrator.control.elastic import GrowWatch, Resized, resize_event
from orchestrator.control.failures import COORDINATOR, AttemptFailed, FailureRecord, NodesDrained
from orchestrator.control.live_recovery import secure
from orchestrator.control.metrics_export import RunMetrics
from orchestrator.control.metrics_export import for_fit as run_metrics
from orchestrator.control.specs import FitSpec, Resume
from orchestrator.control.states import FitOutcome
from orchestrator.control.watch import DrainWatch, DriverCallbacks, Relay, watch
from orchestrator.core.events import EventType
from orchestrator.errors import HangError, OrchestratorError
from orchestrator.loop.specs import LoopResult
from orchestrator.storage.fs import RunStorage, StorageSpec
from orchestrator.storage.lease import LeaseLost
from orchestrator.storage.run_files import EventLog, write_marker

logger = logging.getLogger(__name__)

__all__ = ["Attempt", "AttemptFailed", "AttemptRunner", "DrainWatch", "DriverCallbacks", "FailureRecord",
           "FitOutcome", "NodesDrained", "run_attempt"]


@dataclass(frozen=True)
class Attempt:
    """What one attempt runs with, besides the fit and the worker group.

    Args:
        number: The attempt number (1 first), written on every event.
        resume: The committed backup it resumes from, or scratch.
        storage: The run's storage.
        events: The attempt's ``events.jsonl`` writer.
        preempt: Set when the driver got SIGTERM: stop at the next step with an emergency backup.
        fenced: Returns the error that ends the attempt once another driver took the run over (the
            run lease was lost), else None. Defaults to never.

    Example:
        attempt = Attempt(number=2, resume=find_resume(fit, storage, events), storage=storage,
                          events=events, preempt=threading.Event())
        results = run_attempt(fit, attempt, group, FitOutcome())
    """

    number: int
    resume: Resume
    storage: RunStorage
    events: EventLog
    preempt: threading.Event
    fenced: Callable[[], BaseException | None] = lambda: None


AttemptRunner = Callable[[FitSpec, Attempt, WorkerGroup, FitOutcome], list[LoopResult]]


def run_attempt(fit: FitSpec, attempt: Attempt, group: WorkerGroup, outcome: FitOutcome) -> list[LoopResult]:
    """Run one attempt to its end on ``group`` (whose workers it stops at the end); return every rank's result.

    The coordinator's events go to ``outcome.events`` and ``events.jsonl`` as they come, the
    last ones included however the attempt ends; at a normal end ``outcome.callback_states``
    is set.

    Every wait on an actor is bounded, so a KeyboardInterrupt (Ctrl-C) ends the attempt at once;
    however it ends, its workers and coordinator are killed before the error goes on.

    Raises:
        AttemptFailed: A worker or the coordinator died, raised or hung (retryable under ``max_failures``).
        NodesDrained: Nodes of this attempt are being drained (restart without counting a failure).
        Resized: An elastic attempt stopped with an emergency backup to grow (restart on more workers).
        HangError: A coordinator callback blocked for ``hang_timeout_s`` (not retried).
        Anything else: a callback's error, the preemption grace exceeded, an actor that did not answer.
    """
    resume, events = attempt.resume, attempt.events
    metrics = run_metrics(fit)  # Prometheus metrics through Ray, fed the attempt's begin, events and end
    metrics.begin_attempt(attempt.number)
    driver = DriverCallbacks(fit.driver_callbacks, fit.params, (resume.state or {}).get("history"),
                             observe=metrics.observe)
    elastic = fit.scaling.elastic
    # an elastic attempt places its workers first: the coordinator counts the ranks the cluster granted
    try:
        infos = group.start() if elastic else None
    except BaseException as exc:
        metrics.end_attempt(exc, preempted=attempt.preempt.is_set())
        raise
    coordinator_spec = fit.coordinator_spec(resume, group.world_size if elastic else None)
    coordinator, ready = group.coordinator(coordinator_spec)  # starts (or is a spare) while the workers start
    relay = Relay(coordinator, driver, outcome, events, attempt=attempt.number, every_s=fit.faults.news_every_s)
    drain = DrainWatch(set(), fit.faults.drain_poll_interval_s)
    finished = False
    try:
        if infos is None:
            infos = group.start()
        _set_up_coordinator(group, relay, coordinator_spec, ready, startup_timeout_s(fit.faults.placement_timeout_s))
        drain.nodes = {i["node_id"] for i in infos} | {relay.where["node_id"]}
        if not group.promoted or not group.storage_checked:  # promoted standbys sit where checked workers were
            _check_storage_visible(group, fit.storage, attempt.storage, infos)
            group.storage_checked = True
        world_size = _announce_start(fit, attempt, group, infos, metrics.observe)
        refs = group.run(fit.train_spec(resume), relay.coordinator)
        grow = GrowWatch(group, enabled=elastic and world_size < fit.scaling.num_workers)
        try:
            results = watch(fit.faults, attempt.number, group, relay, infos, refs, attempt.preempt, drain,
                            fenced=attempt.fenced, grow=grow)
        except AttemptFailed as failed:
            _after_failure(fit, attempt, group, relay, infos, refs, drain, failed)
            raise
        stopped = any(r.preempted for r in results) and not attempt.preempt.is_set()  # to move, not to end
        if stopped and drain.draining:
            raise NodesDrained(sorted(drain.draining), step=max(r.steps_run for r in results))
        if stopped and grow.target is not None:
            raise Resized(grow.target, step=max(r.steps_run for r in results))
        outcome.callback_states = relay.call("callback_states")
        if not any(r.preempted for r in results):
            group.retire_workers()  # idle and warm: standbys for the next fit of this driver (WorkerGroup.park)
            finished = True  # its coordinator is idle too: its callbacks have returned
        return results
    except NodesDrained:
        group.release()  # its placement group has bundles on the draining nodes
        raise
    finally:
        _end(group, relay, metrics, attempt, sys.exc_info()[1], finished)


def _set_up_coordinator(group: WorkerGroup, relay: Relay, spec: CoordinatorSpec, ready: Any,
                        timeout_s: float) -> None:
    """Wait for the coordinator's ``setup``; a spare lost with its node is replaced by a new one. Then ask
    where it runs (``relay.where``)."""
    try:
        get_within(ready, timeout_s, "the coordinator (setup)")
    except ray.exceptions.RayActorError as exc:  # a spare lost with its node: start a new one
        logger.info("coordinator lost before setup (%s); starting a new one", exc)
        ray.kill(relay.coordinator, no_restart=True)
        relay.coordinator, ready = group.coordinator(spec)
        get_within(ready, timeout_s, "the coordinator (setup)")
    relay.where = relay.call("info")


def _announce_start(fit: FitSpec, attempt: Attempt, group: WorkerGroup, infos: list[dict[str, Any]],
                    observe: Callable[[dict[str, Any]], Any]) -> int:
    """Record the attempt's ``started`` event (after a ``resized`` one when an elastic run changed its
    world size); return the world size it runs on."""
    resume, events = attempt.resume, attempt.events
    before = resume.world_size or fit.scaling.num_workers
    world_size = group.world_size if fit.scaling.elastic else fit.scaling.num_workers
    if fit.scaling.elastic and world_size != before:
        observe(events.append(EventType.RESIZED, step=resume.step, **resize_event(
            before, group.world_size, fit.loop.accumulate_grad_batches, fit.scaling.num_workers)))
    observe(events.append(
        EventType.STARTED, world_size=world_size, nodes=sorted({i["node"] for i in infos}),
        node_ids=[i["node_id"] for i in infos], resumed_from="memory" if resume.live is not None else resume.folder,
        warm=group.promoted, warm_ranks=list(group.warm_ranks)))
    return world_size


def _after_failure(fit: FitSpec, attempt: Attempt, group: WorkerGroup, relay: Relay, infos: list[dict[str, Any]],
                   refs: list[Any], drain: DrainWatch, failed: AttemptFailed) -> None:
    """What a failure leaves for the next attempt: a failure on a draining node is the drain (raises
    :class:`NodesDrained`); else the survivors' state secured for a live recovery, and their processes kept."""
    rank = failed.record.rank
    node_id = relay.where.get("node_id") if failed.record.role == COORDINATOR else \
        infos[rank]["node_id"] if rank is not None else None
    if node_id is not None and node_id in drain.draining:  # expected: its node is going away
        raise NodesDrained(sorted(drain.draining), lost=failed.record.cause) from failed.error
    if fit.faults.live_recovery and fit.faults.max_failures > 0:  # a restart may follow: secure the survivors' state
        failed.live = secure(group, relay, failed)
    # the ranks that survived the failed one keep their processes, for the restart that follows
    # (within the budget) or, when the failure ends the fit, for the next fit of this driver
    # (WorkerGroup.park); not after ranks forked DataLoader workers (see Controller._parks)
    restart_may_follow = attempt.resume.failures < fit.faults.max_failures
    if (restart_may_follow or group.parks) and fit.loop.loader_workers == 0 and failed.record.role != COORDINATOR:
        keep_survivors(group, refs, failed.record.rank)


def _end(group: WorkerGroup, relay: Relay, metrics: RunMetrics, attempt: Attempt, ended: BaseException | None,
         finished: bool) -> None:
    """However the attempt ended (``ended``: the error it ends with, or None): stop its workers, deliver
    the coordinator's last events, and keep its coordinator (``finished``) or kill it."""
    group.stop_workers()
    # Ctrl-C: clean up, collect nothing; fenced out: the run is another driver's, write nothing into it
    if not isinstance(ended, (KeyboardInterrupt, LeaseLost)):
        # a backup committed as the attempt ended is in events.jsonl before what ended it; a bare
        # HangError names a callback that blocks the coordinator's thread (watch.coordinator_hang)
        relay.flush(blocked=isinstance(ended, HangError))
    metrics.end_attempt(ended, preempted=attempt.preempt.is_set())
    if finished:  # the next fit of this driver sets it up again (no new process)
        group.keep_coordinator(relay.coordinator)
    else:
        ray.kill(relay.coordinator, no_restart=True)


def _check_storage_visible(group: WorkerGroup, spec: StorageSpec, storage: RunStorage,
                           infos: list[dict[str, Any]]) -> None:
    """A local path on a multi-node cluster must be shared storage every worker sees."""
    if not storage.is_local or len({i["node_id"] for i in infos}) < 2:
        return
    marker = write_marker(storage)
    try:
        seen = get_within([w.can_read.remote(spec, marker) for w in group.workers], 2 * CALL_TIMEOUT_S,
                          "the workers (checking that they see the storage)")
    finally:
        storage.rm(marker)
    blind = sorted({f"{infos[r]['node']} (node id {infos[r]['node_id'][:12]})" for r, ok in enumerate(seen) if not ok})
    if blind:
        raise OrchestratorError(
            f"storage {storage.url()} is a local path that workers on {', '.join(blind)} cannot see; "
            "use shared storage (NFS mounted at the same path on every node) or an object store URL such as s3://")
