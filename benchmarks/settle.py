"""Fair turns for side-by-side benchmarks: an order of the sides that varies who runs after whom, and a
wait for the machine to go quiet before each side starts.

A side that starts a Ray instance leaves processes that end after ``ray.shutdown()`` returns (workers,
raylet, gcs_server, loader workers), and their exit takes CPU from whatever runs next. With the sides
rotated cyclically (A B C, B C A, C A B) every side always runs after the same other side (A after C,
B after A, C after B), so that cost falls on the same side every time: a bias, not noise.
:func:`side_orders` goes through every permutation instead, so across a full cycle each side runs
after each other side equally often within a repeat, and :func:`wait_quiet` lets the previous side's processes end
before the next side starts.

Example:
    >>> side_orders(["a", "b"], 3)
    [['a', 'b'], ['b', 'a'], ['a', 'b']]
"""

from __future__ import annotations

import itertools
import os
import time

from orchestrator.core.processes import process_tree


def side_orders(names: list[str], repeats: int) -> list[list[str]]:
    """The order of ``names`` in each of ``repeats`` repeats: their permutations in turn (then again).

    Over ``len(names)!`` repeats every side runs first equally often and, within a repeat, right after
    each other side equally often (a repeat's first side runs after the previous repeat's last one,
    which :func:`wait_quiet` lets end first).
    """
    if not names:
        raise ValueError("side_orders needs at least one side")
    if repeats < 0:
        raise ValueError(f"repeats must be >= 0, got {repeats}")
    cycle = [list(p) for p in itertools.permutations(names)]
    return [cycle[i % len(cycle)] for i in range(repeats)]


def descendants(root: int | None = None) -> list[int]:
    """The pids of every live descendant of ``root`` (default: this process), from /proc."""
    root = os.getpid() if root is None else root
    return [p.pid for p in process_tree([root]) if p.pid != root]


def busy_cores(window_s: float = 0.5) -> float:
    """Cores the whole machine kept busy over the next ``window_s`` seconds (from /proc/stat)."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle  # user nice system idle iowait irq softirq steal

    total0, idle0 = read()
    time.sleep(window_s)
    total1, idle1 = read()
    cores = os.cpu_count() or 1
    spent = total1 - total0
    return 0.0 if spent <= 0 else cores * (1.0 - (idle1 - idle0) / spent)


def wait_quiet(max_wait_s: float = 30.0, idle_below: float = 0.25, window_s: float = 0.5) -> float:
    """Wait until this process has no descendants left and the machine keeps fewer than ``idle_below``
    cores busy over a ``window_s`` window (what this process itself uses counts too), at most
    ``max_wait_s`` seconds; return the seconds waited. Something else on the machine that keeps it busy
    only makes this wait the whole ``max_wait_s``."""
    start = time.monotonic()
    deadline = start + max_wait_s
    while time.monotonic() < deadline:
        if descendants():
            time.sleep(0.1)
            continue
        if busy_cores(window_s) < idle_below:
            break
    return time.monotonic() - start
