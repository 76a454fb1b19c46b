"""Run a test in a process of its own when this one runs other threads: for tests that fork DataLoader
worker processes in process.

A fork copies only the thread that forks: a lock another thread held at that moment stays held in
the child forever. The pytest process runs such threads: Ray's driver threads once it has started
the session's Ray (gRPC, the release timer of a parked worker group), and before that the S3
server's, fsspec's event loop and the background scenarios' thread; a loader worker forked beside
them hung once and crashed (SIGSEGV) twice. In training the loop runs in a Ray actor, never in the
driver; a test that forks loader workers from the loop runs, then, in a rank process forked from the
fork server (tests/rank_processes.py: no thread of its own, torch already imported), and forks its
loader workers from there as a rank's actor does; where this process runs no other thread (a single
file, say), it runs as it is.
"""

from __future__ import annotations

import functools
import gc
import importlib
import multiprocessing
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from rank_processes import start_ranks


def only_thread_here() -> bool:
    """Whether this process runs no thread but the calling one (and so no Ray driver, whose threads
    Python does not count)."""
    ray = sys.modules.get("ray")
    return threading.active_count() == 1 and not (ray is not None and ray.is_initialized())


def in_clean_process(test: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a test (its arguments keyword-passed fixtures and parameters that pickle; ``group`` is
    formed again there) so that, in a process that runs other threads, it runs in a rank process and
    passes or fails with it; elsewhere it runs as it is."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if args or only_thread_here():
            # Garbage of earlier tests (a loop's process group, whose gloo threads Python does not count)
            # is freed here, not in a loader worker forked from this process: there its threads do not
            # exist, and destroying it hung (2026-12-02)
            gc.collect()
            return test(*args, **kwargs)
        start_ranks(_run_alone, (test.__module__, test.__name__, kwargs), nprocs=1)
        return None

    return wrapper


def _run_alone(rank: int, module: str, name: str, kwargs: dict[str, Any]) -> None:
    """The decorated test's body, in a rank process: loader workers fork from here (not through the fork
    server), and the one-rank ``group`` fixture's process group is this process's own."""
    import torch.distributed as dist

    multiprocessing.set_start_method("fork", force=True)
    test = getattr(importlib.import_module(module), name).__wrapped__
    if "group" not in kwargs:
        test(**kwargs)
        return
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{Path(folder) / 'group-store'}", rank=0, world_size=1)
        try:
            test(**kwargs)
        finally:
            dist.destroy_process_group()
