"""benchmarks/spread.py: the distribution-free interval for the median of paired ratios."""

from __future__ import annotations

import random

import pytest

from benchmark_scripts import loaded


@pytest.fixture(scope="module")
def spread():
    yield from loaded("spread.py", "benchmarks_spread")


@pytest.mark.parametrize("n, j, expected", [
    (5, 1, 1 - 2 / 32),                   # only the extremes: both fall on one side with probability 2/32
    (5, 2, 1 - 2 * (1 + 5) / 32),
    (10, 2, 1 - 2 * (1 + 10) / 1024),
    (12, 3, 1 - 2 * (1 + 12 + 66) / 4096),
    (12, 4, 1 - 2 * (1 + 12 + 66 + 220) / 4096),
    (2, 1, 0.5),
])
def test_coverage_is_one_minus_both_binomial_tails(spread, n, j, expected):
    assert spread.coverage(n, j) == pytest.approx(expected)


@pytest.mark.parametrize("n, j", [(5, 0), (5, 3), (1, 1)])
def test_coverage_rejects_an_order_statistic_past_the_middle(spread, n, j):
    with pytest.raises(ValueError, match="j must be between 1 and n // 2"):
        spread.coverage(n, j)


@pytest.mark.parametrize("n, confidence, j", [
    (5, 0.9, 1),     # 0.9375
    (9, 0.9, 2),     # 0.961; j = 3 gives 0.820
    (12, 0.9, 3),    # 0.961; j = 4 gives 0.854
    (12, 0.95, 3),
    (12, 0.97, 2),   # 0.994
    (20, 0.9, 6),    # 0.942; j = 7 gives 0.885
])
def test_the_interval_is_the_narrowest_that_still_reaches_the_confidence(spread, n, confidence, j):
    values = [float(v) for v in range(100, 100 + n)]
    random.Random(n).shuffle(values)  # the order of the pairs does not matter
    low, high, p = spread.median_interval(values, confidence)
    assert (low, high) == (100.0 + j - 1, 100.0 + n - j)
    assert p == pytest.approx(spread.coverage(n, j)) and p >= confidence
    if j < n // 2:
        assert spread.coverage(n, j + 1) < confidence


@pytest.mark.parametrize("n, confidence", [(4, 0.9), (1, 0.5), (0, 0.9), (5, 0.95)])
def test_too_few_values_give_no_interval(spread, n, confidence):
    assert spread.median_interval([1.0] * n, confidence) is None


@pytest.mark.parametrize("confidence", [0.0, 1.0, -0.1, 1.5])
def test_a_confidence_outside_zero_and_one_is_refused_by_name(spread, confidence):
    with pytest.raises(ValueError, match="confidence must be strictly between 0 and 1"):
        spread.median_interval([1.0] * 10, confidence)


def test_the_interval_covers_a_known_median_about_as_often_as_it_says(spread):
    rng = random.Random(7)
    trials, hits = 4000, 0
    for _ in range(trials):
        values = [rng.lognormvariate(0.0, 0.2) for _ in range(12)]  # true median exactly 1.0
        low, high, p = spread.median_interval(values, 0.9)
        hits += low <= 1.0 <= high
    assert abs(hits / trials - spread.coverage(12, 3)) < 0.02  # 0.961 by the binomial; 4000 draws: sd 0.003


def test_describe_names_the_median_the_range_and_the_interval(spread):
    words = spread.describe([0.954, 1.065, 0.972, 0.993, 1.01])
    assert words == "median 0.993 (pairs 0.954-1.065; 94% interval for the median 0.954-1.065)"
    assert spread.describe([1.0, 0.9]) == "median 0.950 (pairs 0.900-1.000; too few for a 90% interval for the median)"
