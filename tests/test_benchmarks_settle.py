"""benchmarks/settle.py: the sides' turns (every order, so no side always runs after the same one) and the wait
for a quiet machine before each side."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections import Counter

import pytest

from benchmark_scripts import loaded


@pytest.fixture(scope="module")
def settle():
    yield from loaded("settle.py", "benchmarks_settle")


@pytest.mark.parametrize("names, cycles", [(["fit", "torchrun", "actors"], 2), (["a", "b"], 3), (["a", "b", "c", "d"], 1)])
def test_over_full_cycles_each_side_runs_first_and_after_each_other_side_equally_often(settle, names, cycles):
    repeats = cycles * len(list(itertools.permutations(names)))
    orders = settle.side_orders(names, repeats)
    assert len(orders) == repeats and all(sorted(o) == sorted(names) for o in orders)
    assert len(set(Counter(o[0] for o in orders).values())) == 1
    after = Counter(pair for order in orders for pair in zip(order, order[1:]))  # (previous, next) in a repeat
    assert after.keys() == {(a, b) for a in names for b in names if a != b}
    assert len(set(after.values())) == 1


def test_a_cyclic_rotation_would_give_every_side_the_same_predecessor_which_these_orders_do_not(settle):
    names = ["fit", "torchrun", "actors"]
    sequence = [name for order in settle.side_orders(names, 6) for name in order]
    before_fit = {prev for prev, name in zip(sequence, sequence[1:]) if name == "fit"}
    assert before_fit == {"torchrun", "actors"}


@pytest.mark.parametrize("names, repeats", [([], 3), (["a"], -1)])
def test_no_sides_or_a_negative_count_is_refused(settle, names, repeats):
    with pytest.raises(ValueError):
        settle.side_orders(names, repeats)


def test_the_wait_ends_only_once_this_processs_children_have_ended(settle):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.0)"])
    try:
        assert child.pid in settle.descendants()
        settle.wait_quiet(max_wait_s=60.0, idle_below=(os.cpu_count() or 1) + 1.0)  # any load counts as quiet
        assert child.poll() is not None and child.pid not in settle.descendants()
    finally:
        child.kill()
        child.wait()


def test_the_wait_gives_up_after_its_limit_when_a_child_lives_on(settle):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        waited = settle.wait_quiet(max_wait_s=0.5)
        assert waited >= 0.5 and child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_busy_cores_is_between_none_and_all_of_them(settle):
    assert 0.0 <= settle.busy_cores(0.2) <= (os.cpu_count() or 1) + 1e-9
