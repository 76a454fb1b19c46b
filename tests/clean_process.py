"""Run a test in a fresh interpreter when this one hosts a Ray driver: for tests that fork DataLoader
worker processes in process.

Once the pytest process has started the session's Ray, it hosts Ray's driver threads (gRPC, the
release timer of a parked worker group). Forking a process with such threads can leave the child
waiting forever on a lock a thread held at the fork. In training the loop runs in a Ray actor, never
in the driver; a test that forks loader workers from the loop in process runs itself in a child
interpreter that has never started Ray, unless this process has not started it either (the tests
without Ray run first: tests/conftest.py), where the child would only add a pytest start (seconds).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

_CHILD = "ORCHESTRATOR_TEST_CLEAN_PROCESS"
_ROOT = Path(__file__).resolve().parent.parent


def is_child() -> bool:
    """Whether this pytest is the child that runs one test in a clean process."""
    return bool(os.environ.get(_CHILD))


def ray_started_here() -> bool:
    """Whether this process has started (or joined) a Ray instance as a driver."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def in_clean_process(test: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a test so that, in a process that has started Ray, pytest runs it again, alone, in a fresh
    interpreter, and passes or fails with it; elsewhere it runs as it is."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if is_child() or not ray_started_here():
            return test(*args, **kwargs)
        nodeid = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]
        env = dict(os.environ, **{_CHILD: "1"})
        env.pop("PYTEST_CURRENT_TEST", None)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", nodeid], cwd=_ROOT,
                              env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, f"{nodeid} failed in a clean process:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
        return None

    return wrapper
