"""How an attempt ends other than normally, and the policy that says whether to restart (no Ray, no torch).

An attempt that fails raises :class:`AttemptFailed` (a rank or the coordinator died, raised or hung:
counted against ``max_failures``) or :class:`NodesDrained` (Ray is draining nodes it runs on: a preemption with
notice, never counted). :class:`FailurePolicy` turns the failures so far into a
:class:`FailureDecision`.

Example:
    >>> record = FailureRecord(attempt=1, rank=0, node="10.0.0.1", cause="rank 0 raised ValueError: bad")
    >>> FailurePolicy(max_failures=1).decide([record])
    FailureDecision(restart=True, reason='failure 1 of at most 1: restarting', restarts_left=0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["AttemptFailed", "COORDINATOR", "Drain", "FailureDecision", "FailurePolicy", "FailureRecord",
           "NodesDrained"]

#: :attr:`FailureRecord.role` of a failure of the coordinator (its death, or a hang outside the callbacks).
COORDINATOR = "coordinator"


@dataclass(frozen=True)
class FailureRecord:
    """One failed attempt: which rank, where, and why.

    Args:
        attempt: The attempt number (1 first).
        rank: The rank that failed, or None when no single rank is to blame (the coordinator failed).
        node: The node address of that rank (or of the coordinator).
        cause: One line saying what happened.
        role: ``"worker"``, or ``"coordinator"`` when the coordinator died or hung. Defaults to ``"worker"``.
        detection_s: Seconds from the last sign of life of what failed, as the driver knew it, to the
            driver's detection of the failure: for a rank, its age in the coordinator's newest poll
            answer (seconds since its last heartbeat, progress report or sync point; 0 while it
            waited at a sync point) plus the time since that answer; for the coordinator, the time
            since its newest answer. The failure came after that sign of life, so for a death or
            an error this bounds the detection latency from above; for a hang it is the silence
            that tripped the watchdog. None when not measured. Defaults to ``None``.

    Example:
        >>> FailureRecord(2, None, "10.0.0.1", "the coordinator died", role=COORDINATOR).who
        'the coordinator'
    """

    attempt: int
    rank: int | None
    node: str
    cause: str
    role: str = "worker"
    detection_s: float | None = None

    def event_fields(self) -> dict[str, Any]:
        """The fields of its ``worker_failed`` event: ``rank``, ``node``, ``cause``, ``role``, ``detection_s``.

        Example:
            >>> FailureRecord(1, 0, "10.0.0.1", "rank 0 died", detection_s=1.23456).event_fields()["detection_s"]
            1.235
        """
        return {"rank": self.rank, "node": self.node, "cause": self.cause, "role": self.role,
                "detection_s": None if self.detection_s is None else round(float(self.detection_s), 3)}

    @property
    def who(self) -> str:
        """``rank N`` or ``the coordinator``, for messages."""
        return "the coordinator" if self.role == COORDINATOR else f"rank {self.rank}"


@dataclass(frozen=True)
class Drain:
    """A drain of nodes an attempt ran on.

    Args:
        nodes: The Ray node ids being drained.
        step: The step at which every rank stopped with a committed emergency backup, if they did.
        lost: Why the attempt ended instead, when ranks on those nodes were lost first.
    """

    nodes: tuple[str, ...]
    step: int | None = None
    lost: str | None = None


class AttemptFailed(Exception):
    """An attempt ended by a worker's or the coordinator's failure, or a hang (retryable under ``max_failures``).

    Args:
        record: What failed, where and why.
        error: The error ``fit`` raises when this failure is the only one and it is not restarted.
    """

    def __init__(self, record: FailureRecord, error: BaseException) -> None:
        super().__init__(record.cause)
        self.record = record
        self.error = error
        self.live: Any = None  # the survivors' state, when secured for a live recovery (control/live_recovery.py)


class NodesDrained(Exception):
    """Ray is draining nodes that host this attempt (a preemption with notice): not a failure.

    Every rank stopped at the same step and the emergency backup there was committed (``step``),
    or, when ranks on those nodes were lost first, the attempt ended (``lost``); either way the
    next attempt resumes from the newest committed backup on the remaining nodes.

    Args:
        nodes: The Ray node ids being drained.
        step: The step of the emergency backup. Defaults to ``None``.
        lost: What ended the attempt when ranks were lost first. Defaults to ``None``.
    """

    def __init__(self, nodes: list[str], step: int | None = None, lost: str | None = None) -> None:
        super().__init__(f"nodes {nodes} are being drained")
        self.nodes = nodes
        self.step = step
        self.lost = lost

    @property
    def drain(self) -> Drain:
        """The drain as a value."""
        return Drain(tuple(self.nodes), self.step, self.lost)


@dataclass(frozen=True)
class FailureDecision:
    """What to do after a failed attempt.

    Args:
        restart: Start another attempt (else ``fit`` fails).
        reason: Why, for the log.
        restarts_left: How many more failures a restart would still follow after this one (0: the
            next failure ends the fit, so nothing needs warm standbys). Defaults to ``0``.
    """

    restart: bool
    reason: str
    restarts_left: int = 0


class FailurePolicy:
    """Restart while the number of failures is at most ``max_failures``.

    Args:
        max_failures: Failed attempts that are restarted.

    Example:
        >>> FailurePolicy(1).decide([object()]).restart, FailurePolicy(1).decide([object(), object()]).restart
        (True, False)
        >>> FailurePolicy(3).decide([object()]).restarts_left
        2
    """

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures

    def decide(self, failures: Sequence[object]) -> FailureDecision:
        """The decision after ``failures`` (every failure of this ``fit`` so far, the newest last)."""
        if len(failures) <= self.max_failures:
            return FailureDecision(True, f"failure {len(failures)} of at most {self.max_failures}: restarting",
                                   restarts_left=self.max_failures - len(failures))
        return FailureDecision(False, f"{len(failures)} failures exceed max_failures={self.max_failures}")
