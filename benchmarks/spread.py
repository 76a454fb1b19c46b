"""How far a median of paired ratios can be trusted: a distribution-free interval for the median.

A benchmark on a shared VM measures each side in turn, and the machine's speed drifts between runs,
so one pair of runs can stray by 30% or more. The median of the pairs' ratios is the figure
quoted; this module says which values of the true median the pairs cannot rule out. Sorted, the
pairs ``x(1) <= ... <= x(n)`` bracket the median of the distribution they were drawn from with
``x(j) <= m <= x(n + 1 - j)`` with probability ``1 - 2 * P(Binomial(n, 1/2) <= j - 1)``, whatever that
distribution is (each pair falls below the median with probability 1/2, independently). The
interval is the narrowest of these that reaches the asked confidence.

Example:
    >>> median_interval([0.9, 1.1, 0.95, 1.0, 1.05])
    (0.9, 1.1, 0.9375)
    >>> median_interval([0.9, 1.1, 0.95, 1.0]) is None  # four pairs cannot reach 90%
    True
"""

from __future__ import annotations

import math
import statistics


def median(values: list[float]) -> float:
    """The median of ``values`` (the mean of the middle two for an even count)."""
    return statistics.median(values)


def coverage(n: int, j: int) -> float:
    """The probability that the ``j``-th smallest and ``j``-th largest of ``n`` independent draws bracket
    the median of the distribution they come from (``1 <= j <= n // 2``)."""
    if not 1 <= j <= n // 2:
        raise ValueError(f"j must be between 1 and n // 2 = {n // 2}, got {j}")
    below = sum(math.comb(n, i) for i in range(j)) / 2 ** n  # P(Binomial(n, 1/2) <= j - 1)
    return 1.0 - 2.0 * below


def median_interval(values: list[float], confidence: float = 0.9) -> tuple[float, float, float] | None:
    """``(low, high, coverage)``: the narrowest order-statistic interval around the median of ``values``
    that covers the true median with probability at least ``confidence``, and that probability;
    None when there are too few values for it (under 5 for 90%).

    Args:
        values: Independent measurements (here: the ratios of interleaved pairs of runs).
        confidence: The least coverage wanted, strictly between 0 and 1.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    ordered, n = sorted(values), len(values)
    best = None
    for j in range(1, n // 2 + 1):  # coverage falls as j grows: keep the last j that still reaches it
        p = coverage(n, j)
        if p < confidence:
            break
        best = (ordered[j - 1], ordered[n - j], p)
    return best


def describe(values: list[float], confidence: float = 0.9) -> str:
    """``"median 0.981 (pairs 0.954-1.065; 94% interval for the median 0.954-1.065)"``-style words for
    ``values``; the interval is left out when there are too few values for ``confidence``."""
    words = f"median {median(values):.3f} (pairs {min(values):.3f}-{max(values):.3f}"
    interval = median_interval(values, confidence)
    if interval is None:
        return words + f"; too few for a {confidence:.0%} interval for the median)"
    low, high, p = interval
    return words + f"; {p:.0%} interval for the median {low:.3f}-{high:.3f})"
