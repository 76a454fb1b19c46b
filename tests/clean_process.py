"""Run a test in a fresh interpreter when this one runs other threads: for tests that fork DataLoader
worker processes in process.

A fork copies only the thread that forks: a lock another thread held at that moment stays held in
the child forever. The pytest process runs such threads: Ray's driver threads once it has started
the session's Ray (gRPC, the release timer of a parked worker group), and before that the S3
server's, fsspec's event loop and the background scenarios' thread; a loader worker forked beside
them hung once and crashed (SIGSEGV) twice. In training the loop runs in a Ray actor, never in the
driver; a test that forks loader workers from the loop in process runs itself in a child
interpreter that runs no other thread, unless this one runs none either (a single file, say).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

_CHILD = "ORCHESTRATOR_TEST_CLEAN_PROCESS"
_ROOT = Path(__file__).resolve().parent.parent


def is_child() -> bool:
    """Whether this pytest is the child that runs one test in a clean process."""
    return bool(os.environ.get(_CHILD))


def only_thread_here() -> bool:
    """Whether this process runs no thread but the calling one (and so no Ray driver, whose threads
    Python does not count)."""
    ray = sys.modules.get("ray")
    return threading.active_count() == 1 and not (ray is not None and ray.is_initialized())


def in_clean_process(test: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a test so that, in a process that runs other threads, pytest runs it again, alone, in a
    fresh interpreter, and passes or fails with it; elsewhere it runs as it is."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if is_child() or only_thread_here():
            return test(*args, **kwargs)
        nodeid = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]
        env = dict(os.environ, **{_CHILD: "1"})
        env.pop("PYTEST_CURRENT_TEST", None)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", nodeid], cwd=_ROOT,
                              env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, f"{nodeid} failed in a clean process:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
        return None

    return wrapper
