"""The backup interval of ``BackupAndRestore(save_freq="auto")``: Young/Daly from measured costs.

Pure Python (no torch, no ray, no clock): the callback feeds it what it measured, in seconds, and
asks for the interval. The numbers and their sources:

- **C, the backup cost**: the training stall of one backup, the longest of any rank's (its wait for
  the previous persist plus its copy to CPU: ``stall_s`` of ``backup_committed``). This is what a
  backup puts on the critical path of training; the persist runs in the background. The sync point
  that carries the decision (one round trip to the coordinator) is not counted. C is the median of
  the last :data:`COST_WINDOW` commits, so one slow backup does not move the interval.
- **P, the persist time**: from the decision on the coordinator to the commit of the manifest
  (``persist_s`` of ``backup_committed``), median of the last commits likewise. P is not in C, but
  an interval shorter than P makes every backup wait for the previous one, so P bounds the interval
  from below.
- **M, the mean time between failures**: ``mtbf_s`` as configured until the run has seen failures;
  then ``(trained_s + mtbf_s) / (failures + 1)``, the configured value counting as one observed
  interval (so one early failure does not collapse the interval, and many failures dominate it).
- **The step time**: an exponentially weighted mean (weight :data:`STEP_WEIGHT` for the newest) of
  the wall time per step between batch sync points (validation excluded).

The interval is ``T = sqrt(2 C M)`` (Young 1974, Daly 2006: the first-order optimum of
``C / T + T / (2 M)``, the fraction of time lost to backups plus to recomputing after failures),
clamped to ``[max(min_interval_s, P), max_interval_s]``, then ``max(1, round(T / step time))``
steps. Before the first backup commits, C is unknown and ``T = min_interval_s``: the first backup
comes early and measures the cost. A new interval replaces the current one only when it differs by
more than :data:`CHANGE_RATIO` and by more than one step (or a bound starts or stops applying), so
noise does not flap it.

Example:
    >>> policy = AutoInterval(mtbf_s=86_400.0, min_interval_s=10.0, max_interval_s=3_600.0)
    >>> policy.see_steps(seconds=2.0, steps=100)         # 20 ms a step
    >>> policy.see_backup(stall_s=0.05, persist_s=0.5)
    >>> choice = policy.evaluate(trained_s=600.0, failures=0)
    >>> round(choice.seconds, 1), choice.steps            # sqrt(2 * 0.05 * 86400) = 93 s
    (93.0, 4648)
    >>> policy.evaluate(trained_s=700.0, failures=0) is None  # nothing changed
    True
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

#: Commits whose costs are kept: C and P are the medians over them.
COST_WINDOW = 3
#: Weight of the newest measurement in the step time's moving mean.
STEP_WEIGHT = 0.3
#: A new interval replaces the current one when ``new / current`` is above this or below its inverse.
CHANGE_RATIO = 1.25


def young_daly_s(cost_s: float, mtbf_s: float) -> float:
    """The Young/Daly interval between backups, in seconds: ``sqrt(2 * cost_s * mtbf_s)``.

    Args:
        cost_s: Seconds training stands still for one backup.
        mtbf_s: Mean seconds between failures.

    Example:
        >>> young_daly_s(0.5, 3600.0)
        60.0
    """
    return math.sqrt(2.0 * max(cost_s, 0.0) * max(mtbf_s, 0.0))


@dataclass(frozen=True)
class IntervalChoice:
    """One decision on the interval, and what it was computed from (the ``backup_interval`` event's fields).

    Args:
        steps: Global steps between backups.
        seconds: The interval in seconds it stands for (after the bounds).
        optimum_s: ``sqrt(2 C M)`` before the bounds, or None while C is unknown.
        cost_s: C, the backup's training stall (median of recent commits), or None before the first.
        persist_s: P, decision to commit (median of recent commits), or None before the first.
        mtbf_s: M used (configured, or observed: see the module docstring).
        step_s: Seconds per step used.
        bound: ``"min"``, ``"persist"`` or ``"max"`` when a bound set the interval, ``"no_cost"``
            before the first commit, else None.
        failures: Failures the run has restarted after, as seen by this attempt.
    """

    steps: int
    seconds: float
    optimum_s: float | None
    cost_s: float | None
    persist_s: float | None
    mtbf_s: float
    step_s: float
    bound: str | None
    failures: int = 0

    def fields(self) -> dict[str, Any]:
        """The choice as plain values, rounded for an event."""
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


class AutoInterval:
    """Follows the measured costs and proposes a backup interval in steps (see the module docstring).

    Args:
        mtbf_s: The configured mean time between failures, in seconds.
        min_interval_s: Shortest interval in seconds.
        max_interval_s: Longest interval in seconds.

    Example:
        >>> policy = AutoInterval(mtbf_s=3600.0, min_interval_s=0.0, max_interval_s=600.0)
        >>> policy.see_steps(1.0, 10)
        >>> policy.evaluate(0.0, 0).bound                   # no backup measured yet
        'no_cost'
    """

    def __init__(self, mtbf_s: float, min_interval_s: float, max_interval_s: float) -> None:
        self.mtbf_s = float(mtbf_s)
        self.min_interval_s = float(min_interval_s)
        self.max_interval_s = float(max_interval_s)
        self.step_s: float | None = None
        self.costs: list[tuple[float, float]] = []  # (stall_s, persist_s) of the last commits, oldest first
        self.current: IntervalChoice | None = None

    # -- measurements ----------------------------------------------------------------------
    def see_steps(self, seconds: float, steps: int) -> None:
        """``steps`` steps took ``seconds`` of wall time (between two sync points)."""
        if steps <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        per_step = seconds / steps
        self.step_s = per_step if self.step_s is None else (STEP_WEIGHT * per_step + (1 - STEP_WEIGHT) * self.step_s)

    def see_backup(self, stall_s: float, persist_s: float) -> None:
        """A backup committed: training stood still ``stall_s``, decision to commit took ``persist_s``."""
        self.costs = (self.costs + [(max(float(stall_s), 0.0), max(float(persist_s), 0.0))])[-COST_WINDOW:]

    def cost_s(self) -> float | None:
        """C: the median training stall of the recent commits, or None before the first."""
        return statistics.median(c for c, _ in self.costs) if self.costs else None

    def persist_s(self) -> float | None:
        """P: the median decision-to-commit time of the recent commits, or None before the first."""
        return statistics.median(p for _, p in self.costs) if self.costs else None

    def mtbf(self, trained_s: float, failures: int) -> float:
        """M: configured, or with failures ``(trained_s + mtbf_s) / (failures + 1)``."""
        if failures <= 0:
            return self.mtbf_s
        return (max(trained_s, 0.0) + self.mtbf_s) / (failures + 1)

    # -- the decision ----------------------------------------------------------------------
    def propose(self, trained_s: float, failures: int) -> IntervalChoice | None:
        """The interval the measurements call for now (None while the step time is unknown)."""
        if self.step_s is None:
            return None
        cost, persist, mtbf = self.cost_s(), self.persist_s(), self.mtbf(trained_s, failures)
        low = max(self.min_interval_s, persist or 0.0)
        high = max(self.max_interval_s, low)
        if cost is None:
            optimum, seconds, bound = None, low, "no_cost"
        else:
            optimum = young_daly_s(cost, mtbf)
            seconds = min(max(optimum, low), high)
            bound = None
            if seconds == high and optimum > high:
                bound = "max"
            elif seconds == low and optimum < low:
                bound = "persist" if (persist or 0.0) > self.min_interval_s else "min"
        steps = max(1, round(seconds / self.step_s)) if self.step_s > 0 else 1
        return IntervalChoice(steps=steps, seconds=seconds, optimum_s=optimum, cost_s=cost, persist_s=persist,
                              mtbf_s=mtbf, step_s=self.step_s, bound=bound, failures=failures)

    def evaluate(self, trained_s: float, failures: int) -> IntervalChoice | None:
        """The new interval when it should replace the current one (which it then becomes), else None.

        It replaces it the first time, when the steps move by more than :data:`CHANGE_RATIO`
        either way and by more than one step, or when the bound that set it changes.
        """
        choice = self.propose(trained_s, failures)
        if choice is None:
            return None
        now = self.current
        if now is not None and choice.bound == now.bound and (
                abs(choice.steps - now.steps) <= 1 or 1 / CHANGE_RATIO <= choice.steps / now.steps <= CHANGE_RATIO):
            return None
        self.current = choice
        return choice

    # -- state (travels in backups) --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step_s": self.step_s, "costs": [list(c) for c in self.costs],
                "current": asdict(self.current) if self.current is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_s = state.get("step_s")
        self.costs = [(float(a), float(b)) for a, b in state.get("costs", [])]
        current = state.get("current")
        self.current = IntervalChoice(**current) if current else None
