"""Goodput of a run from its events: productive training seconds divided by wall seconds, and where the rest went.

Pure logic over event dicts (those of ``events.jsonl``, or the coordinator's in-memory ones on the
driver): ``orchestrator status`` folds a run's events with :func:`goodput`; the driver's metrics
exporter feeds a :class:`GoodputLedger` as events arrive. No torch, no Ray.

How the wall time (first event of the run to its last, or to ``now`` for a live run) is split:

- **start-up**: an attempt's first event to its first training step (for a resumed attempt, only
  until its workers are up: the ``started`` event);
- **restore**: a resumed attempt's workers up to its first training step (building the model and
  loading the backup);
- **replayed steps**: training time spent on global steps the run had already reached (after a
  restart from an older backup or a rollback): each stretch between two progress points is split
  by the share of its steps at or below the highest step reached before;
- **interrupted work**: in an attempt that failed or was preempted, the time from its last
  recorded progress to its end (work whose steps were not recorded, and the failure's detection);
- **between attempts**: from an attempt's end to the next one's first event (restarting, waiting
  for resources, or no driver running);
- **backup stalls**: the seconds training stood still for its backups (``stall_s`` of each
  ``backup_committed``: the slowest rank's wait for the previous persist plus its copy to CPU);
- **productive**: the rest: new training steps, validation and epoch-end hooks.

Progress points are ``(time, global step)`` pairs from ``backup_committed`` (``step``) and the
``global_step`` of ``epoch_end``, ``batch_end``, ``progress``, ``lr_changed``, ``nan_detected`` and
stop events. Where a first step's time is not recorded (``events.jsonl`` has no ``train_begin``),
it is estimated from the attempt's first progress point and the run's measured seconds per step.

Example:
    >>> b = goodput([
    ...     {"time": 0.0, "attempt": 1, "type": "started"},
    ...     {"time": 12.0, "attempt": 1, "type": "epoch_end", "epoch": 0, "global_step": 10},
    ...     {"time": 22.0, "attempt": 1, "type": "epoch_end", "epoch": 1, "global_step": 20},
    ...     {"time": 23.0, "attempt": 1, "type": "finished"}])
    >>> round(b.goodput, 3), b.lost_s["startup"], b.wall_s, b.step_s
    (0.913, 2.0, 23.0, 1.0)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from orchestrator.core.events import EventType, event_type

__all__ = ["CAUSE_LABELS", "LOST_CAUSES", "GoodputBreakdown", "GoodputLedger", "goodput"]

#: The causes of lost seconds, in the order they are printed.
LOST_CAUSES: tuple[str, ...] = ("startup", "restore", "replayed", "interrupted", "between_attempts",
                                "backup_stalls")
CAUSE_LABELS: dict[str, str] = {"startup": "start-up", "restore": "restore", "replayed": "replayed steps",
                                "interrupted": "interrupted work", "between_attempts": "between attempts",
                                "backup_stalls": "backup stalls"}

# Where each event type carries the global step it was at (a progress point).
_STEP_FIELD: dict[EventType, str] = {
    EventType.BACKUP_COMMITTED: "step", EventType.EPOCH_END: "global_step", EventType.BATCH_END: "global_step",
    EventType.PROGRESS: "global_step", EventType.LR_CHANGED: "global_step", EventType.NAN_DETECTED: "global_step",
    EventType.EARLY_STOPPING: "global_step", EventType.TERMINATED_ON_NAN: "global_step",
    EventType.STOPPED: "global_step",
}
_ENDS = frozenset({EventType.WORKER_FAILED, EventType.FAILED, EventType.PREEMPTED, EventType.FINISHED})
_INTERRUPTED = frozenset({EventType.WORKER_FAILED.value, EventType.FAILED.value, EventType.PREEMPTED.value})
_FOLDER_STEP = re.compile(r"step-(\d+)/?$")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class GoodputBreakdown:
    """Where a run's wall seconds went; ``productive_s + sum(lost_s.values()) == wall_s``.

    Args:
        wall_s: First event of the run to its last (or to ``now``).
        productive_s: Seconds of new training (validation included).
        lost_s: Seconds lost, by cause (every key of :data:`LOST_CAUSES`).
        attempts: Attempts seen.
        rollbacks: Rollbacks to a backup after a non-finite loss.
        replayed_steps: Global steps trained again after restarts and rollbacks (a lower bound: the
            steps reached after the last recorded progress of a failed attempt are not known).
        step_s: Measured seconds per training step (None when no two progress points of an attempt
            show steps).
        ended: The run finished or failed (or its driver was preempted).

    Example:
        >>> lost = dict.fromkeys(LOST_CAUSES, 0.0) | {"startup": 2.0}
        >>> b = GoodputBreakdown(wall_s=10.0, productive_s=8.0, lost_s=lost)
        >>> b.goodput, b.restarts
        (0.8, 0)
    """

    wall_s: float
    productive_s: float
    lost_s: Mapping[str, float]
    attempts: int = 1
    rollbacks: int = 0
    replayed_steps: int = 0
    step_s: float | None = None
    ended: bool = False

    @property
    def goodput(self) -> float | None:
        """``productive_s / wall_s``; None for a run with no wall time yet."""
        return self.productive_s / self.wall_s if self.wall_s > 0 else None

    @property
    def restarts(self) -> int:
        """Attempts after the first (after failures, node drains and preemptions)."""
        return max(0, self.attempts - 1)

    def lines(self) -> list[str]:
        """The breakdown as ``orchestrator status`` prints it: a summary, then one line per cause."""
        ratio = "n/a" if self.goodput is None else f"{100 * self.goodput:.1f}%"
        plural = lambda n, word: f"{n} {word}{'' if n == 1 else 's'}"  # noqa: E731
        out = [f"goodput {ratio}: {self.productive_s:.1f} s productive of {self.wall_s:.1f} s wall "
               f"({plural(self.attempts, 'attempt')}, {plural(self.restarts, 'restart')}, "
               f"{plural(self.rollbacks, 'rollback')}"
               + (f", {self.step_s:.3g} s a step" if self.step_s else "") + ")"]
        for cause in LOST_CAUSES:
            seconds = self.lost_s.get(cause, 0.0)
            share = f"{100 * seconds / self.wall_s:5.1f}%" if self.wall_s > 0 else "    -"
            extra = f"  ({plural(self.replayed_steps, 'step')})" if cause == "replayed" else ""
            out.append(f"  lost to {CAUSE_LABELS[cause]:<17} {seconds:10.1f} s  {share}{extra}")
        return out


@dataclass
class _Attempt:
    number: int | None
    begin: float
    latest: float
    high_at_start: int = 0  # the highest global step reached before this attempt
    started: float | None = None
    resumed: bool = False
    resume_step: int | None = None  # None until known (a restored or train_begin event, or the first point)
    train_begin: float | None = None
    first: tuple[float, int] | None = None  # the first progress point
    anchor: tuple[float, int] | None = None  # the first one with a recorded step (to place the first step)
    last: tuple[float, int] | None = None  # the newest one
    end: float | None = None
    end_kind: str | None = None
    restart_pending: bool = False  # ended by a failure or a node drain: another attempt follows
    productive: float = 0.0  # between progress points
    replayed: float = 0.0
    stalls: float = 0.0  # training stood still for backups (stall_s of its commits)


@dataclass
class GoodputLedger:
    """Folds events (in the order they were written) into a :class:`GoodputBreakdown`; memory O(attempts).

    Events need a numeric ``time`` and a ``type`` of the vocabulary (others are skipped); ``attempt``
    when present starts a new attempt when it changes (events without one belong to the current
    attempt, see :meth:`begin_attempt`). Times that go backwards are taken as the newest time seen.

    Example:
        >>> ledger = GoodputLedger()
        >>> ledger.begin_attempt(1, 100.0)
        >>> ledger.add({"time": 102.0, "type": "train_begin", "global_step": 0})
        >>> ledger.add({"time": 110.0, "type": "progress", "global_step": 80})
        >>> b = ledger.breakdown(now=111.0)
        >>> b.wall_s, b.lost_s["startup"], b.productive_s
        (11.0, 2.0, 9.0)
    """

    attempts: list[_Attempt] = field(default_factory=list)
    high: int = 0  # the highest global step reached so far
    rollbacks: int = 0
    replayed_steps: int = 0
    latest: float | None = None
    _rate_s: float = 0.0
    _rate_steps: int = 0

    def begin_attempt(self, number: int | None, time: float) -> None:
        """Start attempt ``number`` at ``time`` (the driver's view: before its first event)."""
        time = self._clock(time)
        self.attempts.append(_Attempt(number, time, time, high_at_start=self.high))

    def add(self, event: Mapping[str, Any]) -> None:
        """Take one event into account (see the class docstring for what is skipped)."""
        t, kind = event.get("time"), event_type(event["type"]) if isinstance(event.get("type"), str) else None
        if kind is None or not isinstance(t, (int, float)) or isinstance(t, bool):
            return
        t = self._clock(float(t))
        a = self._attempt(_int(event.get("attempt")), t)
        a.latest = t
        if a.end is not None:
            a.end = t  # a late event of an attempt that ended (e.g. failed after worker_failed)
        if kind is EventType.STARTED and a.started is None:
            a.started = t
        elif kind in (EventType.RESTORED, EventType.RECOVERED) and _int(event.get("step")) is not None:
            a.resumed = True
            self._resume(a, event["step"], _int(event.get("lost_steps")))
        elif kind is EventType.TRAIN_BEGIN and a.first is None and a.train_begin is None:
            a.train_begin = t
            self._resume(a, _int(event.get("global_step")) or 0, None)
        elif kind is EventType.ROLLED_BACK:
            self._rolled_back(a, t, event)
        elif kind in _STEP_FIELD:
            step = _int(event.get(_STEP_FIELD[kind]))
            if step is not None or kind is EventType.EPOCH_END:  # an epoch_end of an older run: time, no step
                self._point(a, t, step)
        if kind is EventType.BACKUP_COMMITTED and isinstance(event.get("stall_s"), (int, float)):
            a.stalls += max(0.0, float(event["stall_s"]))
        if kind in _ENDS:
            a.end, a.end_kind = t, kind.value
            a.restart_pending = kind is EventType.WORKER_FAILED or (
                kind is EventType.PREEMPTED and event.get("reason") == "node_drain")

    def breakdown(self, now: float | None = None) -> GoodputBreakdown:
        """Where the time went until the newest event, or until ``now`` (a live run)."""
        lost = dict.fromkeys(LOST_CAUSES, 0.0)
        productive = 0.0
        rate = self._rate_s / self._rate_steps if self._rate_steps else None
        previous_end: float | None = None
        for i, a in enumerate(self.attempts):
            end = a.end if a.end is not None else a.latest
            if now is not None and a.end is None and i == len(self.attempts) - 1:
                end = max(end, now)
            if previous_end is not None:
                lost["between_attempts"] += max(0.0, a.begin - previous_end)
            previous_end = end
            resume = a.resume_step or 0
            first_t = a.first[0] if a.first else a.train_begin if a.train_begin is not None else end
            floor = min(a.started if a.started is not None else a.begin, first_t)
            if a.train_begin is not None:
                train_start = min(max(a.train_begin, floor), first_t)
            elif a.anchor is not None and rate is not None and a.anchor[1] > resume:
                train_start = min(max(floor, a.anchor[0] - (a.anchor[1] - resume) * rate), first_t)
            else:
                train_start = floor if a.first is not None else end
            lost["startup"] += floor - a.begin
            lost["restore" if a.resumed else "startup"] += train_start - floor
            if a.first is not None:
                opening, steps = first_t - train_start, a.first[1] - resume
                share = min(1.0, max(0.0, (a.high_at_start - resume) / steps)) if steps > 0 else 0.0
                lost["replayed"] += opening * share
                productive += opening * (1 - share)
            productive += a.productive
            lost["replayed"] += a.replayed
            tail = end - (a.last[0] if a.last is not None else train_start)
            if a.end_kind in _INTERRUPTED:
                lost["interrupted"] += tail
            else:
                productive += tail
            stalls = min(a.stalls, productive)  # they happened inside the attempt's training time
            lost["backup_stalls"] += stalls
            productive -= stalls
        last = self.attempts[-1] if self.attempts else None
        if last is not None and last.restart_pending and now is not None and last.end is not None:
            lost["between_attempts"] += max(0.0, now - last.end)  # live: the next attempt is coming
        ended = last is not None and last.end_kind is not None and not last.restart_pending
        return GoodputBreakdown(wall_s=productive + sum(lost.values()), productive_s=productive, lost_s=lost,
                                attempts=len(self.attempts), rollbacks=self.rollbacks,
                                replayed_steps=self.replayed_steps, step_s=rate, ended=ended)

    # -- internals -------------------------------------------------------------------------
    def _clock(self, t: float) -> float:
        self.latest = t if self.latest is None else max(t, self.latest)
        return self.latest

    def _attempt(self, number: int | None, t: float) -> _Attempt:
        current = self.attempts[-1] if self.attempts else None
        if current is None or (number is not None and current.number is not None and number != current.number):
            self.begin_attempt(number, t)
        elif current.number is None and number is not None:
            current.number = number
        return self.attempts[-1]

    def _resume(self, a: _Attempt, step: int, lost_steps: int | None) -> None:
        if a.resume_step is not None:
            return
        a.resume_step, a.high_at_start = step, self.high
        self.replayed_steps += max(self.high - step, lost_steps or 0, 0)

    def _point(self, a: _Attempt, t: float, step: int | None) -> None:
        """A progress point: global ``step`` reached at ``t`` (None: time passed, no step known)."""
        if a.resume_step is None:
            self._resume(a, 0, None)  # no restore recorded: the attempt trained from scratch
        if step is not None and a.anchor is None:
            a.anchor = (t, step)
        if step is None:
            step = a.last[1] if a.last is not None else a.resume_step or 0
        if a.first is None:
            a.first = a.last = (t, step)
        else:
            t0, s0 = a.last
            if step > s0:
                dt, ds = t - t0, step - s0
                self._rate_s += dt
                self._rate_steps += ds
                share = min(1.0, max(0.0, (self.high - s0) / ds))
                a.replayed += dt * share
                a.productive += dt * (1 - share)
                a.last = (t, step)
            else:  # no step forward: validation, hooks, a commit of an older step
                a.productive += t - t0
                a.last = (t, s0)
        self.high = max(self.high, step)

    def _rolled_back(self, a: _Attempt, t: float, event: Mapping[str, Any]) -> None:
        self._point(a, t, _int(event.get("bad_step")))
        self.rollbacks += 1
        target = _int(event.get("target_step"))
        if target is None and isinstance(event.get("folder"), str):
            match = _FOLDER_STEP.search(event["folder"])
            target = int(match.group(1)) if match else None
        if target is not None and a.last is not None:
            self.replayed_steps += max(0, self.high - target)
            a.last = (a.last[0], target)  # the ranks train again from the backup's step


def goodput(events: Iterable[Mapping[str, Any]], now: float | None = None) -> GoodputBreakdown:
    """The goodput breakdown of a run's events (oldest first), until the newest event or ``now``.

    Args:
        events: Event dicts as in ``events.jsonl`` (:func:`orchestrator.storage.run_files.read_events`).
        now: For a run still going: count the time since its newest event too. Defaults to None.
    """
    ledger = GoodputLedger()
    for event in events:
        ledger.add(event)
    return ledger.breakdown(now)
