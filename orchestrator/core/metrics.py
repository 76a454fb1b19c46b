"""Exact cross-rank aggregation of metrics.

Every rank reports, per phase, the *sums* of ``value * samples`` and the number of samples it
saw. The aggregate is ``sum(sums) / sum(counts)``: a sample-weighted mean over the whole
cluster, never a mean of per-rank means. No torch here: values are Python floats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

# Direction of each built-in metric, used by callbacks' ``mode="auto"``.
BUILTIN_DIRECTIONS: dict[str, str] = {
    "loss": "min",
    "accuracy": "max",
    "acc": "max",
    "mse": "min",
    "mae": "min",
}
BUILTIN_METRICS = ("accuracy", "mse", "mae")


@dataclass
class PhaseSums:
    """Sums of ``value * n`` per metric name and the sample count ``n`` for one phase on one rank."""

    totals: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def add(self, values: Mapping[str, float], n: int) -> None:
        for name, value in values.items():
            self.totals[name] = self.totals.get(name, 0.0) + float(value) * n
        self.count += int(n)


def aggregate(reports: Iterable[PhaseSums]) -> dict[str, float]:
    """Combine per-rank sums into cluster-wide sample-weighted means.

    Example:
        >>> aggregate([PhaseSums({"loss": 3.0}, 2), PhaseSums({"loss": 1.0}, 1)])
        {'loss': 1.3333333333333333}
    """
    totals: dict[str, float] = {}
    count = 0
    for r in reports:
        count += r.count
        for name, value in r.totals.items():
            totals[name] = totals.get(name, 0.0) + value
    if count == 0:
        return {}
    return {name: value / count for name, value in totals.items()}


def metric_directions(metric_names: Iterable[str]) -> dict[str, str]:
    """Directions known for ``loss`` and the given metrics (custom ones are unknown and left out)."""
    out = {"loss": "min"}
    for name in metric_names:
        if name in BUILTIN_DIRECTIONS:
            out[name] = BUILTIN_DIRECTIONS[name]
    return out
