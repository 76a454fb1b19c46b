"""The driver's controller: a state machine stepped one attempt at a time, a failure policy, restarts.

    Starting -> Running -> (Restarting -> Running)* -> Finished | Failed | Preempted

Each attempt starts a fresh coordinator and the group's workers, and resumes from the newest
committed backup in the run directory. A failed attempt is handed to
:class:`~orchestrator.control.failures.FailurePolicy`, which says whether to restart; past
``max_failures`` ``fit`` raises an error listing every failure. A drain of a node the attempt
runs on (:class:`~orchestrator.control.failures.NodesDrained`) is a preemption with notice: the
ranks stop at one step with an emergency backup and the next attempt resumes there on the
remaining nodes (Ray places nothing on a draining node), without counting a failure.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from typing import Any, Callable

from orchestrator.cluster.worker_group import WorkerGroup
from orchestrator.control.attempt import Attempt, AttemptRunner, run_attempt
from orchestrator.control.driver_side import reached_step
from orchestrator.control.elastic import Resized
from orchestrator.control import metrics_export
from orchestrator.control.failures import (COORDINATOR, AttemptFailed, FailureDecision, FailurePolicy, FailureRecord,
                                           NodesDrained)
from orchestrator.control.local_ray import ensure_ray, shutdown_ray
from orchestrator.control.resume import find_resume
from orchestrator.control.specs import FitSpec
from orchestrator.control.states import (TERMINAL, ControllerState, Failed, Finished, FitOutcome, Preempted,
                                         Restarting, Running, Starting)
from orchestrator.core.events import EventType
from orchestrator.errors import TrainingFailedError
from orchestrator.loop.specs import LoopResult
from orchestrator.storage.checkpoint import remove_all
from orchestrator.storage.fs import RunStorage
from orchestrator.storage.lease import LeaseLost, Owner, RunLease
from orchestrator.storage.run_files import (EventLog, bump_attempt, read_events, run_status, update_run_json,
                                            write_run_json)

logger = logging.getLogger(__name__)

__all__ = ["Controller", "ControllerState", "FailureDecision", "FailurePolicy", "FitOutcome", "FitSpec",
           "ensure_ray", "find_resume", "run_fit"]


class Controller:
    """Runs one ``fit`` as a state machine: each :meth:`step` moves to the next state and returns it.

    ``Starting`` checks the storage and the cluster's capacity, writes run.json and begins attempt
    1; each ``Running`` step runs one attempt to its end; ``Restarting`` begins the next attempt.
    The controller owns the worker group: it creates it (or takes the one given) and is the only
    one to shut it down, in :meth:`close`.

    Args:
        fit: What to train, validated.
        storage: The run's storage (``fit.storage`` opened).
        group: The worker group of every attempt. Defaults to a :class:`WorkerGroup` created at
            the first step, on the Ray cluster running (or a local one started, and shut down in
            :meth:`close`).
        run_attempt: Runs one attempt. Defaults to :func:`~orchestrator.control.attempt.run_attempt`.
        policy: Whether to restart after a failure. Defaults to ``FailurePolicy(fit.faults.max_failures)``.
        preempt: Set it to stop at the next step with an emergency backup. Defaults to a new event.
        save_final: ``(storage, results)`` writes the final weights once training finished, before
            the outcome is recorded. Defaults to writing nothing.

    Example:
        with Controller(fit, fit.storage.open()) as controller:
            state = controller.state
            while not state.terminal:
                state = controller.step()
        outcome = state.result()  # or raises what ended training
    """

    def __init__(self, fit: FitSpec, storage: RunStorage, *, group: WorkerGroup | None = None,
                 run_attempt: AttemptRunner = run_attempt, policy: FailurePolicy | None = None,
                 preempt: threading.Event | None = None,
                 save_final: Callable[[RunStorage, list[LoopResult]], None] | None = None) -> None:
        self.fit = fit
        self.save_final = save_final
        self.storage = storage
        self.group = group
        self.run_attempt = run_attempt
        self.policy = policy if policy is not None else FailurePolicy(fit.faults.max_failures)
        self.preempt = preempt if preempt is not None else threading.Event()
        self.state: ControllerState = Starting()
        self.failures: list[FailureRecord] = []
        self.outcome = FitOutcome()
        self.events: EventLog | None = None  # the current attempt's
        self.live: Any = None  # the survivors' state of a failed attempt (a LiveCopy), for the next one
        self.lease: RunLease | None = None  # held from Starting to close()
        self._started_ray = False
        self._owns_group = False

    def step(self) -> ControllerState:
        """Leave the current state; return (and hold) the next one. What ends training ends in ``Failed``.

        Raises:
            RuntimeError: The controller is already in a terminal state.
        """
        previous = self.state
        match previous:
            case Starting():
                state = self._start()
            case Running():
                state = self._run(previous)
            case Restarting():
                state = self._next_attempt()
            case _:
                raise RuntimeError(f"the controller has ended ({type(previous).__name__}); nothing to step")
        logger.debug("controller: %s -> %s", type(previous).__name__, type(state).__name__)
        self.state = state
        return state

    def close(self) -> None:
        """Shut the worker group down, and Ray when this controller started it; never raises."""
        logger.debug("controller ended in state %s", type(self.state).__name__)
        if self.group is not None:
            if self._reusable():
                self.group.park()  # its warm workers start the next fit of this driver
            else:
                self.group.shutdown()
        if self._started_ray:
            self._started_ray = False
            shutdown_ray()  # and what of an instance this fit started hangs in its exit is killed
        if self.lease is not None:  # after the workers are gone: none of them writes any more
            lease, self.lease = self.lease, None
            lease.stop_renewing()
            try:
                lease.release()
            except Exception as exc:  # it expires on its own
                logger.warning("could not release the run lease: %s", exc)

    def _parks(self) -> bool:
        """Whether this fit's group may serve the next fit of this driver: ours, on a Ray that outlives
        this fit, with ``reuse_workers``.

        Not a group whose ranks forked DataLoader workers (``loader_workers > 0``): in a worker that
        had forked loader workers for two fits, the third fit's forked children crashed (SIGSEGV)
        in about one fit in three, so each such fit gets fresh worker processes.
        """
        return (self._owns_group and not self._started_ray and self.fit.scaling.reuse_workers
                and self.fit.loop.loader_workers == 0)

    def _reusable(self) -> bool:
        """Whether the group serves the next fit now that this one has ended (:meth:`_parks`): after a
        finish, or after a failure of a worker (the ranks that survived it, idle and warm, and a new
        process for the failed rank: a rerun after a failed fit starts like a restart). Not after the
        coordinator failed, nor when another driver took the run over."""
        if not self._parks():
            return False
        state = self.state
        if isinstance(state, Finished):
            return not state.outcome.already_finished
        return (isinstance(state, Failed) and bool(state.failures) and state.failures[-1].role != COORDINATOR
                and not isinstance(state.error, LeaseLost))

    def __enter__(self) -> "Controller":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> ControllerState:
        metrics_export.for_fit(self.fit).begin_starting()
        try:  # nothing has started yet, so there is nothing to record
            self.storage.check_access()
            if run_status(self.storage) == "finished":  # never two trainings in one run
                logger.warning("run %s already finished; returning its result without training (pass another "
                               "run_name to train a new run)", self.storage.url())
                return Finished(FitOutcome(events=read_events(self.storage), already_finished=True))
            self._take_lease()
            if self.group is None:
                self._started_ray = ensure_ray()
                self.group = WorkerGroup.for_fit(
                    self.fit.scaling, placement_timeout_s=self.fit.faults.placement_timeout_s,
                    warm_standbys=self.fit.faults.warm_standbys and self.fit.faults.max_failures > 0)
                self._owns_group = True
                self.group.parks = self._parks()  # attempt.py: a failure that ends the fit keeps the survivors
            self.group.check_capacity()  # a clear error before any worker starts
            write_run_json(self.storage, dict(self.fit.config_snapshot, world_size=self.fit.scaling.num_workers))
            update_run_json(self.storage, status="running")
        except BaseException as exc:
            return Failed(exc)
        return self._next_attempt()

    def _take_lease(self) -> None:
        """Own the run (one driver per run) before anything is written or deleted in it.

        Each attempt takes a new token from the lease it holds, so the coordinator of an earlier
        attempt (killed, but perhaps not dead yet) is fenced out like another driver's.
        """
        faults = self.fit.faults
        if self.lease is None:
            self.lease = RunLease.acquire(self.storage, Owner.current(), ttl_s=faults.lease_ttl_s,
                                          takeover=self.fit.takeover, wait_s=faults.lease_wait)
        else:
            self._fence()
            self.lease.stop_renewing()
            self.lease = RunLease.acquire(self.storage, self.lease.owner, ttl_s=faults.lease_ttl_s)
        self.lease.start_renewing()
        self.fit = dataclasses.replace(self.fit, lease_token=self.lease.token)

    def _lease_lost(self) -> BaseException | None:
        """The LeaseLost the renewing thread met (another driver took the run over), else None."""
        return self.lease.lost if self.lease is not None else None

    def _fence(self) -> None:
        """Raise LeaseLost when another driver has taken the run over."""
        if self.lease is not None:
            if self.lease.lost is not None:
                raise self.lease.lost
            self.lease.check()

    def _next_attempt(self) -> ControllerState:
        try:
            reached = None
            if self.events is not None:  # a restart: a new token fences the previous attempt's coordinator out
                self._take_lease()
                reached = reached_step(self.outcome.events, self.events.attempt)
            attempt = bump_attempt(self.storage)
            self.events = EventLog(self.storage, attempt, token=self.lease.token if self.lease else None)
            live, self.live = self.live, None
            # a live recovery: the survivors' state, never read from storage (see control/live_recovery.py)
            resume = live.resume() if live is not None else find_resume(self.fit, self.storage, self.events, reached)
            resume = dataclasses.replace(resume, failures=len(self.failures))
        except BaseException as exc:
            return self._failed(exc)
        return Running(attempt, resume)

    def _run(self, state: Running) -> ControllerState:
        try:
            return self._run_to_end(state)
        except BaseException as exc:
            return self._failed(exc)

    def _run_to_end(self, state: Running) -> ControllerState:
        assert self.group is not None and self.events is not None
        attempt = Attempt(number=state.attempt, resume=state.resume, storage=self.storage, events=self.events,
                          preempt=self.preempt, fenced=self._lease_lost)
        try:
            results = self.run_attempt(self.fit, attempt, self.group, self.outcome)
        except Resized as resized:  # an elastic run grows back: not a failure (the next attempt records it)
            logger.warning("elastic run: stopped at step %s with an emergency backup; resuming on %d workers",
                           resized.step, resized.to_workers)
            self.group.world_size = resized.to_workers
            return Restarting()
        except NodesDrained as drained:  # a preemption with notice: not a failure
            self.events.append(EventType.PREEMPTED, step=drained.step, reason="node_drain", nodes=drained.nodes,
                               lost=drained.lost)
            logger.warning("nodes %s are being drained; resuming on the remaining nodes (waiting up to "
                           "%gs for enough of them)", drained.nodes, self.fit.faults.placement_timeout_s)
            return Restarting(drained=drained.drain)
        except AttemptFailed as failed:
            self._fence()  # a fenced-out driver records nothing more and restarts nothing
            return self._after_failure(failed)
        self._fence()
        return self._after_results(results)

    def _after_failure(self, failed: AttemptFailed) -> ControllerState:
        assert self.events is not None
        self.failures.append(failed.record)
        self.events.append(EventType.WORKER_FAILED, **failed.record.event_fields())
        decision = self.policy.decide(self.failures)
        if decision.restart:
            self.live = failed.live
            if decision.restarts_left == 0 and self.group is not None:
                # the next failure ends the fit: standbys started from now on could never take over
                self.group.warm_standbys = False
            logger.warning("attempt %d failed (%s); %s", failed.record.attempt, failed.record.cause, decision.reason)
            return Restarting(failure=failed.record)
        if len(self.failures) == 1:
            return self._failed(failed.error)
        error = TrainingFailedError(self.failures)
        error.__cause__ = failed.error
        return self._failed(error, recorded=failed.error)

    def _after_results(self, results: list[LoopResult]) -> ControllerState:
        assert self.events is not None
        self.outcome.results = results
        if any(r.preempted for r in results):
            step = max(r.steps_run for r in results)
            self.events.append(EventType.PREEMPTED, step=step)
            update_run_json(self.storage, status="preempted")
            self.outcome.preempted = True
            return Preempted(self.outcome, step, self.storage.url(self.fit.backups.folder))
        if self.save_final is not None:
            self.save_final(self.storage, results)
        self.events.append(EventType.FINISHED, epochs=len(results[0].learning_rates))
        update_run_json(self.storage, status="finished")
        if self.fit.backups.delete_at_end:  # only once the outcome is recorded: a kill before keeps them
            self._fence()
            remove_all(self.storage, self.fit.backups.folder)
        return Finished(self.outcome)

    def _failed(self, error: BaseException, recorded: BaseException | None = None) -> Failed:
        """End in ``Failed`` raising ``error``; record ``recorded`` (defaults to ``error``) without masking it."""
        exc = recorded if recorded is not None else error
        if isinstance(error, LeaseLost) or (self.lease is not None and self.lease.lost is not None):
            logger.error("%s", error)  # the run is another driver's now: write nothing into it
            return Failed(error, tuple(self.failures))
        try:
            if self.events is not None:
                first = str(exc).splitlines()[0] if str(exc) else ""
                self.events.append(EventType.FAILED, error=f"{type(exc).__name__}: {first}")
            update_run_json(self.storage, status="failed")
        except Exception as record_error:
            logger.warning("could not record the failure: %s", record_error)
        return Failed(error, tuple(self.failures))


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


def run_fit(fit: FitSpec, *, group: WorkerGroup | None = None, run_attempt: AttemptRunner = run_attempt,
            save_final: Callable[[RunStorage, list[LoopResult]], None] | None = None) -> FitOutcome:
    """Run training to the end across attempts; raise what ends it otherwise.

    Args:
        fit: What to train, validated.
        group: The worker group to use (the controller shuts it down). Defaults to a new one.
        run_attempt: Runs one attempt. Defaults to :func:`~orchestrator.control.attempt.run_attempt`.
        save_final: Writes the final weights before the outcome is recorded. Defaults to nothing.

    Raises:
        Preempted: The ranks stopped at a preemption with an emergency backup.
        TrainingFailedError: More failures than ``max_failures`` (a single failure raises its own error).
        Anything else that ended training: a callback's error, a storage or capacity error.
    """
    controller = Controller(fit, fit.storage.open(), group=group, run_attempt=run_attempt, save_final=save_final)
    with controller:
        state = controller.step()  # Starting: connecting to Ray installs Ray's own SIGTERM handler
        with _SigtermToPreemption(controller.preempt):
            while not isinstance(state, TERMINAL):
                state = controller.step()
    return state.result()
