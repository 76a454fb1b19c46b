"""Processes by pid, read from Linux's ``/proc``: a process tree, and ending what is left of one.

A pid alone can be reused by a new process once the old one has been reaped, so a process is named
here by ``(pid, start time)`` (:class:`Proc`): the start time (clock ticks since boot, field 22 of
``/proc/<pid>/stat``) tells the process that was seen from a later one with the same pid. Where
``/proc`` does not exist (macOS, Windows) every function finds nothing.

Example:
    >>> import os
    >>> me = Proc.of(os.getpid())
    >>> me is not None and me.alive()
    True
"""

from __future__ import annotations

import os
import signal
import time
from collections import defaultdict
from dataclasses import dataclass


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class Proc:
    """One process: its pid and its start time (which a later process with the same pid does not share)."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> "Proc | None":
        """The process that has ``pid`` now, or None (there is none, or it has ended and waits to be reaped)."""
        fields = _stat(pid)
        if fields is None or fields[0] == "Z":
            return None
        return cls(pid, int(fields[19]))

    def alive(self) -> bool:
        """Whether this process (not a later one with its pid) still runs (a zombie has ended)."""
        return Proc.of(self.pid) == self


def process_tree(roots: list[int]) -> list[Proc]:
    """``roots`` and every live descendant of them, each once (children are found by their parent pid)."""
    children: dict[int, list[int]] = defaultdict(list)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and fields[0] != "Z":
                children[int(fields[1])].append(int(entry))
    found: dict[int, Proc] = {}
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        proc = Proc.of(pid)
        if proc is not None:
            found[pid] = proc
            todo.extend(children[pid])
    return list(found.values())


def end_processes(procs: list[Proc], grace_s: float, poll_s: float = 0.1) -> list[Proc]:
    """Wait up to ``grace_s`` seconds for ``procs`` to end on their own, then SIGKILL those still running;
    return the ones killed. A pid that now names another process is left alone."""
    deadline = time.monotonic() + grace_s
    left = [p for p in procs if p.alive()]
    while left and time.monotonic() < deadline:
        time.sleep(poll_s)
        left = [p for p in left if p.alive()]
    killed = []
    for proc in left:
        if proc.alive():  # checked again just before: never a pid that a new process took over
            try:
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc)
            except ProcessLookupError:
                pass
    return killed
