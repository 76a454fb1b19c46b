"""The watch loop of one attempt: wait for every rank, relay the coordinator's events, spot the ends.

The loop never waits on a collective, nor on any call without a timeout (so Ctrl-C always gets
through): it polls Ray for finished ranks, the coordinator for events, heartbeat ages and what its
callbacks are doing (the hang watchdog watches the ranks and the coordinator alike), Ray for
drains of the attempt's nodes, and the driver's preemption flag. A failure is raised as
:class:`AttemptFailed` naming the rank, or the coordinator, to blame; a callback that blocks as
a :class:`HangError` naming the callback and its hook (not retried).
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
import math
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from orchestrator.cluster.coordinator import CoordinatorBusy, CoordinatorPoll
from orchestrator.cluster.worker import WorkerFailure
from orchestrator.cluster.worker_group import CALL_TIMEOUT_S, WorkerGroup, get_within
from orchestrator.control.blame import ACTOR_GONE, death, raised, root_cause
from orchestrator.control.driver_side import DrainWatch, DriverCallbacks, remember
from orchestrator.control.failures import COORDINATOR, AttemptFailed, FailureRecord
from orchestrator.control.specs import FaultPolicy
from orchestrator.control.states import FitOutcome
from orchestrator.core.events import EventType, event_type, stop_event_type
from orchestrator.errors import CoordinatorError, CoordinatorLostError, HangError, OrchestratorError
from orchestrator.loop.specs import LoopResult
from orchestrator.storage.run_files import EventLog

logger = logging.getLogger(__name__)

__all__ = ["DrainWatch", "DriverCallbacks", "Relay", "coordinator_hang", "watch"]


@dataclass
class Relay:
    """The driver's line to the coordinator: its events go to the outcome, ``events.jsonl`` and the
    driver's callbacks; its answers say how the ranks and the coordinator itself are doing.

    One poll is in flight at a time and no call waits longer than a timeout: a coordinator that
    does not answer is a hang (:func:`coordinator_hang`), one that died an :class:`AttemptFailed`
    naming the coordinator. A new question goes out at most every ``every_s`` seconds: each one
    costs an actor call on both sides (about a millisecond of CPU each, plus Ray's own work), and
    what it brings changes about once a second during steady training (the ranks' progress);
    :meth:`collect` asks at once.

    Args:
        coordinator: The attempt's coordinator actor.
        driver: The display-only callbacks.
        outcome: Collects every event of the ``fit``.
        events: The attempt's ``events.jsonl`` writer.
        attempt: The attempt number, for failure records. Defaults to ``0``.
        where: The coordinator's ``info()`` (``node``, ``node_id``, ``pid``) once known.
        every_s: Least seconds between two questions sent by :meth:`poll`. Defaults to ``0`` (no
            least: a new question as soon as the previous one is answered).

    Example:
        >>> relay = Relay(coordinator=None, driver=None, outcome=FitOutcome(), events=None, every_s=1.0)
        >>> relay.silence_s(0) is None  # no answer yet
        True
    """

    coordinator: Any
    driver: DriverCallbacks
    outcome: FitOutcome
    events: EventLog
    attempt: int = 0
    where: dict[str, Any] = field(default_factory=dict)
    every_s: float = 0.0
    ages: dict[int, float] = field(default_factory=dict, init=False)  # from the newest answer
    busy: CoordinatorBusy | None = field(default=None, init=False)  # from the newest answer
    epoch_ends: int = field(default=0, init=False)  # epoch_end events relayed (an elastic run looks for room then)
    answered: float | None = field(default=None, init=False)  # time.monotonic() of the newest answer
    _pending: Any = field(default=None, init=False, repr=False)  # the poll in flight
    _sent: float = field(default=-math.inf, init=False, repr=False)  # monotonic time may start near 0

    def poll(self, wait_s: float, *, now: bool = False) -> bool:
        """Ask for news (unless a question is in flight, or the previous one went out less than
        :attr:`every_s` ago and ``now`` is False); forward it if the answer comes within ``wait_s``.

        Returns whether an answer came (:attr:`ages` and :attr:`busy` are then fresh); False at once
        when no question is in flight.

        Raises:
            AttemptFailed: The coordinator died.
        """
        if self._pending is None:
            if not now and time.monotonic() - self._sent < self.every_s:
                return False
            self._pending = self.coordinator.poll.remote()
            self._sent = time.monotonic()
        ready, _ = ray.wait([self._pending], num_returns=1, timeout=wait_s)
        if not ready:
            return False
        ref, self._pending = self._pending, None
        answer: CoordinatorPoll = self._ask(lambda: ref, "poll")
        self.ages, self.busy, self.answered = answer.ages, answer.busy, time.monotonic()
        for event in answer.events:
            event["attempt"] = self.attempt  # as in events.jsonl; reached_step() reads it
            remember(self.outcome.events, event)  # a bounded number: events.jsonl has them all
            self.epoch_ends += event["type"] == EventType.EPOCH_END
            _persist_event(self.events, event)
            if event["type"] == EventType.WARNING:
                category = getattr(builtins, event["category"], UserWarning)
                if not (isinstance(category, type) and issubclass(category, Warning)):
                    category = UserWarning
                warnings.warn(event["message"], category, stacklevel=4)
            self.driver.dispatch(event)
        return True

    def silence_s(self, rank: int | None) -> float | None:
        """Seconds since the last sign of life of ``rank`` (None: the coordinator) that the driver knows of.

        A rank's is its age in the newest answer plus the time since that answer; the
        coordinator's the time since its newest answer. None before any answer, or for a rank the
        coordinator never heard from.
        """
        if self.answered is None:
            return None
        since = time.monotonic() - self.answered
        if rank is None:
            return since
        age = self.ages.get(rank)
        return None if age is None else age + since

    @property
    def unanswered_s(self) -> float:
        """Seconds the poll in flight has gone unanswered (0 when none is)."""
        return time.monotonic() - self._sent if self._pending is not None else 0.0

    def collect(self, timeout_s: float = CALL_TIMEOUT_S) -> None:
        """Forward every event the coordinator recorded until now.

        Raises:
            AttemptFailed: The coordinator died, or did not answer within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        for _ in range(2 if self._pending is not None else 1):  # an answer in flight may predate now
            if not self.poll(max(0.0, deadline - time.monotonic()), now=True):
                raise self.unresponsive(timeout_s, "poll")

    def flush(self, timeout_s: float = 10.0, blocked: bool = False) -> None:
        """Forward what the coordinator still holds (at the end of an attempt, however it ended); never raises.

        The coordinator is sealed first: a rank's last files reported after that are never committed,
        so no commit happens without its ``backup_committed`` event in events.jsonl. The seal runs
        on the coordinator's thread, where commits and callbacks run, in turn; ``blocked``: a callback
        is known to block that thread (the attempt ends with its :class:`HangError`), so the seal
        is queued behind it without waiting (nothing queued after it can commit), and what there
        is is collected at once.
        """
        try:
            sealing = self.coordinator.seal.remote()
            if not blocked:
                get_within(sealing, timeout_s, "the coordinator (seal)")
        except Exception as exc:  # noqa: BLE001 - busy or lost: collect what there is
            logger.debug("could not seal the coordinator: %s", exc)
        try:
            self.collect(timeout_s)
        except Exception as exc:  # noqa: BLE001 - a lost coordinator: its last events are gone with it
            logger.debug("could not collect the coordinator's last events: %s", exc)

    def raise_coordinator_error(self) -> None:
        error, tb = self.call("error")
        if error is not None:
            raise error from CoordinatorError(f"a callback raised on the coordinator:\n{tb}")
        if tb:
            raise CoordinatorError(f"a callback raised on the coordinator:\n{tb}")

    def call(self, method: str, *args: Any) -> Any:
        """Call one of the coordinator's methods and wait (at most :data:`CALL_TIMEOUT_S`) for the answer.

        Raises:
            AttemptFailed: The coordinator died or did not answer.
        """
        return self._ask(lambda: getattr(self.coordinator, method).remote(*args), method)

    def _ask(self, send: Any, what: str) -> Any:
        try:
            return ray.get(send(), timeout=CALL_TIMEOUT_S)
        except ray.exceptions.RayActorError as exc:
            raise self.lost(str(exc)) from None
        except ray.exceptions.GetTimeoutError:
            raise self.unresponsive(CALL_TIMEOUT_S, what) from None

    @property
    def node(self) -> str:
        return str(self.where.get("node", "unknown"))

    @property
    def label(self) -> str:
        """``the coordinator (node ..., pid ...)``, for messages."""
        pid = f", pid {self.where['pid']}" if "pid" in self.where else ""
        return f"the coordinator (node {self.node}{pid})"

    def lost(self, message: str) -> AttemptFailed:
        """The coordinator's death as a failure of this attempt (restarted within ``max_failures``)."""
        first = message.strip().splitlines()[0] if message.strip() else "its actor died"
        cause = f"{self.label} died: {first}"
        record = FailureRecord(self.attempt, None, self.node, cause, role=COORDINATOR)
        return AttemptFailed(record, CoordinatorLostError(cause))

    def unresponsive(self, seconds: float, what: str) -> AttemptFailed:
        """A coordinator that does not answer (its event loop blocked, its node unreachable) as a hang."""
        cause = f"{self.label} did not answer {what}() for {seconds:.0f}s"
        record = FailureRecord(self.attempt, None, self.node, cause, role=COORDINATOR)
        return AttemptFailed(record, HangError(cause))


def coordinator_hang(relay: Relay, hang_timeout_s: float) -> BaseException | None:
    """What to raise when the coordinator made no progress for ``hang_timeout_s``, else None.

    A callback that blocks (a hook running longer than ``hang_timeout_s``) is a :class:`HangError`
    naming the callback, the hook and the seconds, raised as is: not retried, since a restart
    would block in the same place. The coordinator's own work that blocks (a backup commit) or a
    coordinator that stops answering is an :class:`AttemptFailed` naming the coordinator
    (retried within ``max_failures``). Ranks waiting at a sync point meanwhile are not blamed:
    their age is 0 there.
    """
    busy, unanswered = relay.busy, relay.unanswered_s
    if busy is not None and busy.callback:
        seconds = busy.seconds + unanswered  # the newest answer said it ran; it still runs, or no answer came
        if seconds > hang_timeout_s:
            at = f", blocked at {busy.where}" if busy.where else ""
            return HangError(
                f"callback {busy.callback} has been running {busy.hook} on the coordinator for {seconds:.0f}s "
                f"(hang_timeout_s={hang_timeout_s:g}){at}; every rank waits for it at {busy.task}. Not retried: "
                f"a restart would block in the same place; fix the callback or raise hang_timeout_s")
    if unanswered > hang_timeout_s:
        return relay.unresponsive(unanswered, "poll")
    if busy is not None and busy.seconds > hang_timeout_s:
        at = f" (at {busy.where})" if busy.where else ""
        cause = (f"{relay.label} made no progress for {busy.seconds:.0f}s on {busy.task}{at} "
                 f"(hang_timeout_s={hang_timeout_s:g})")
        return AttemptFailed(FailureRecord(relay.attempt, None, relay.node, cause, role=COORDINATOR), HangError(cause))
    return None


def _persist_event(events: EventLog, event: dict[str, Any]) -> None:
    kind = event_type(event["type"])
    fields = {k: v for k, v in event.items() if k not in ("type", "time", "epoch", "step", "attempt")}
    if kind is EventType.STOP:
        if event.get("reason") == "preempted":
            return  # the controller records "preempted" once
        kind = stop_event_type(event.get("reason", ""))
    elif kind is None or not kind.persisted or kind is EventType.PREEMPTED:
        return
    events.append(kind, epoch=event.get("epoch"), step=event.get("step"), **fields)


def watch(faults: FaultPolicy, attempt: int, group: WorkerGroup, relay: Relay, infos: list[dict[str, Any]],
          refs: list[Any], preempt: threading.Event, drain: DrainWatch,
          fenced: Callable[[], BaseException | None] | None = None, grow: Any = None) -> list[LoopResult]:
    """Wait for every rank of ``attempt``, relaying events; handle hangs, SIGTERM and node drains.

    ``fenced()`` returns the error to end the attempt with once another driver took the run over
    (the attempt stops at once and records nothing more), else None. ``grow`` (an elastic run's
    :class:`~orchestrator.control.elastic.GrowWatch`) asks the ranks to stop with an emergency backup
    when, at an epoch end, more workers fit.

    Raises:
        AttemptFailed: A rank or the coordinator died, raised or hung; its record's ``detection_s``
            says how long the driver had not heard from it (see :class:`FailureRecord`).
        HangError: A coordinator callback blocked for ``hang_timeout_s`` (not retried).
        OrchestratorError: The ranks did not stop within ``preemption_grace_s`` of a preemption.
        Anything a coordinator callback raised.
    """
    try:
        return _watch(faults, attempt, group, relay, infos, refs, preempt, drain, fenced, grow)
    except AttemptFailed as failed:
        if failed.record.detection_s is None:
            failed.record = dataclasses.replace(failed.record, detection_s=relay.silence_s(failed.record.rank))
        raise


def _watch(faults: FaultPolicy, attempt: int, group: WorkerGroup, relay: Relay, infos: list[dict[str, Any]],
           refs: list[Any], preempt: threading.Event, drain: DrainWatch,
           fenced: Callable[[], BaseException | None] | None, grow: Any = None) -> list[LoopResult]:
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
                raise root_cause(failed, pending, rank_of, attempt, infos) from failed.error
        lost = fenced() if fenced is not None else None
        if lost is not None:
            raise lost
        relay.poll(faults.poll_interval_s)
        ages = relay.ages
        if len(ages) == len(refs):  # every rank built its model and data: warm replacements up now
            group.prepare_standbys()
        newly_draining = drain.check()
        if newly_draining:
            hosts = sorted({i["node"] for i in infos if i["node_id"] in newly_draining})
            logger.warning("Ray is draining nodes %s (%s) of this run: stopping at the next step with an "
                           "emergency backup, then continuing on the remaining nodes", sorted(newly_draining), hosts)
            relay.events.append(EventType.NODE_DRAINING, nodes=sorted(newly_draining), hosts=hosts,
                                deadlines_ms=[newly_draining[n] for n in sorted(newly_draining)])
        growing = grow is not None and stop_deadline is None and grow.check(relay.epoch_ends)
        if (preempt.is_set() or drain.draining or growing) and stop_deadline is None:
            stop_deadline = time.monotonic() + faults.preemption_grace_s
            for w in group.workers:
                w.notify_preemption.remote()
        if stop_deadline is not None and time.monotonic() > stop_deadline:
            raise OrchestratorError(f"the workers did not stop within preemption_grace_s={faults.preemption_grace_s}")
        hang = coordinator_hang(relay, faults.hang_timeout_s)  # first: ranks waiting for it are not to blame
        if hang is not None:
            raise hang
        stale = {r: a for r, a in ages.items() if r not in results and a > faults.hang_timeout_s}
        if stale and stop_deadline is None:
            rank = max(stale, key=stale.get)
            error = HangError(f"rank {rank} (node {infos[rank]['node']}) made no progress for "
                              f"{stale[rank]:.0f}s (hang_timeout_s={faults.hang_timeout_s:g})")
            raise AttemptFailed(FailureRecord(attempt, rank, infos[rank]["node"], str(error)), error)
    relay.collect()
    relay.raise_coordinator_error()
    return [results[r] for r in sorted(results)]


def _result_or_raise(ref: Any, rank: int, attempt: int, infos: list[dict[str, Any]], relay: Relay) -> LoopResult:
    try:
        value = ray.get(ref, timeout=CALL_TIMEOUT_S)  # ready: it is there
    except ray.exceptions.RayActorError as exc:
        raise death(rank, infos[rank], attempt, exc) from None
    if isinstance(value, WorkerFailure):
        relay.collect()  # raises the coordinator's death when that is what the rank saw
        relay.raise_coordinator_error()
        if value.error_type in ACTOR_GONE and "Coordinator" in value.message:
            raise relay.lost(f"rank {value.rank} lost it: {value.error_type}: {value.message}")
        raise raised(value, attempt)
    return value
