"""orchestrator.core.processes: processes named by (pid, start time), a process tree from /proc, and ending
what is left of one (a process that ignores SIGTERM is killed; a reused pid is never touched). Real child
processes, no Ray."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from orchestrator.core.processes import Proc, end_processes, process_tree

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads Linux's /proc")

STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"


def _spawn(code: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    return child


def test_a_process_tree_holds_the_roots_children_and_grandchildren_once_each():
    grandchild_code = "import time; print('ready', flush=True); time.sleep(120)"
    parent = _spawn("import subprocess, sys, time; "
                    f"c = subprocess.Popen([sys.executable, '-c', {grandchild_code!r}], stdout=subprocess.PIPE, text=True); "
                    "c.stdout.readline(); print('ready', flush=True); time.sleep(120)")
    try:
        tree = process_tree([os.getpid(), os.getpid()])
        pids = [p.pid for p in tree]
        assert os.getpid() in pids and parent.pid in pids and len(pids) == len(set(pids))
        assert len(process_tree([parent.pid])) == 2  # the parent and its child
    finally:
        for proc in process_tree([parent.pid]):
            os.kill(proc.pid, 9)
        parent.wait()


def test_processes_that_end_on_their_own_are_waited_for_and_not_killed():
    child = _spawn("import time; print('ready', flush=True); time.sleep(0.3)")
    proc = Proc.of(child.pid)
    assert proc is not None and proc.alive()
    assert end_processes([proc], grace_s=60.0) == []
    assert child.wait(timeout=60) == 0 and not proc.alive()


def test_a_process_still_running_after_the_grace_is_killed():
    child = _spawn(STUBBORN)
    proc = Proc.of(child.pid)
    child.terminate()  # ignored
    assert end_processes([proc], grace_s=0.2) == [proc]
    assert child.wait(timeout=60) == -9


def test_a_pid_that_names_another_process_now_is_left_alone():
    child = _spawn(STUBBORN)
    try:
        proc = Proc.of(child.pid)
        older = Proc(proc.pid, proc.start - 1)  # as if the pid had belonged to a process that ended before
        assert not older.alive() and end_processes([older], grace_s=0.0) == []
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_an_ended_process_is_not_found():
    child = _spawn("print('ready', flush=True)")
    child.wait(timeout=60)
    assert Proc.of(child.pid) is None and process_tree([child.pid]) == []
