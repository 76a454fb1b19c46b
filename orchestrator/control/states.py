"""The controller's states: small values carrying what each state knows (no Ray, no torch).

    Starting -> Running -> (Restarting -> Running)* -> Finished | Failed | Preempted

:class:`Starting` checks the storage and the cluster; each :class:`Running` is one attempt;
:class:`Restarting` follows a failure within the budget or a node drain; the terminal states
carry what ``fit`` returns or raises (:meth:`Finished.result`, :meth:`Failed.result`,
:meth:`Preempted.result`).

Example:
    >>> state = Restarting(failure=None, drained=Drain(nodes=("n1",), step=12))
    >>> state.terminal, Running(attempt=2, resume=Resume()).terminal
    (False, False)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from orchestrator import errors
from orchestrator.control.failures import Drain, FailureRecord
from orchestrator.control.specs import Resume

if TYPE_CHECKING:
    from orchestrator.loop.specs import LoopResult

__all__ = ["ControllerState", "Failed", "Finished", "FitOutcome", "Preempted", "Restarting", "Running",
           "Starting", "TERMINAL"]


@dataclass
class FitOutcome:
    """What ``fit`` returns: every rank's result, the coordinator's events and callback states.

    Args:
        results: Every rank's :class:`~orchestrator.loop.specs.LoopResult` of the last attempt.
        events: The coordinator's events of every attempt, oldest first.
        callback_states: The coordinator callbacks' states at the end of the last attempt.
        preempted: Whether training stopped at a preemption.
        already_finished: The run had finished before this ``fit``: nothing was trained, ``events``
            holds the run's persisted events (``events.jsonl``), ``results`` is empty.
    """

    results: list[LoopResult] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    callback_states: list[dict[str, Any]] = field(default_factory=list)
    preempted: bool = False
    already_finished: bool = False


@dataclass(frozen=True)
class Starting:
    """Before anything runs: the next step checks storage and capacity and begins attempt 1 (or the next)."""

    terminal: ClassVar[bool] = False


@dataclass(frozen=True)
class Running:
    """One attempt about to run; the next step runs it to its end.

    Args:
        attempt: The attempt number recorded in run.json and on every event (1 first).
        resume: The committed backup it resumes from, or scratch.
    """

    attempt: int
    resume: Resume
    terminal: ClassVar[bool] = False


@dataclass(frozen=True)
class Restarting:
    """An attempt ended by a failure within ``max_failures`` or by a drain; the next step begins another.

    Args:
        failure: The failure that ended the attempt, or None after a drain.
        drained: The drain that ended the attempt, or None after a failure.
    """

    failure: FailureRecord | None = None
    drained: Drain | None = None
    terminal: ClassVar[bool] = False


@dataclass(frozen=True)
class Finished:
    """Training ran to its end (early stopping included).

    Args:
        outcome: What ``fit`` returns.
    """

    outcome: FitOutcome
    terminal: ClassVar[bool] = True

    def result(self) -> FitOutcome:
        return self.outcome


@dataclass(frozen=True)
class Failed:
    """Training ended with an error.

    Args:
        error: What ``fit`` raises: a failure's own error, a
            :class:`~orchestrator.errors.TrainingFailedError` listing several, or any other error.
        failures: Every failed attempt, oldest first.
    """

    error: BaseException
    failures: tuple[FailureRecord, ...] = ()
    terminal: ClassVar[bool] = True

    def result(self) -> NoReturn:
        raise self.error


@dataclass(frozen=True)
class Preempted:
    """Every rank stopped at one step with an emergency backup (SIGTERM or a notice on the workers).

    Args:
        outcome: The results of the attempt that stopped.
        step: The step where the ranks stopped.
        backup_url: Where the emergency backup is.
    """

    outcome: FitOutcome
    step: int
    backup_url: str
    terminal: ClassVar[bool] = True

    def result(self) -> NoReturn:
        raise errors.Preempted(f"training was preempted; an emergency backup is in {self.backup_url}"
                               "; run the same command again to resume")


ControllerState = Starting | Running | Restarting | Finished | Failed | Preempted
TERMINAL = (Finished, Failed, Preempted)
