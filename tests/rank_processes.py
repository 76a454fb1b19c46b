"""Two-rank tests without Ray: their rank processes fork from one server that has imported torch and
the loop once, instead of each spawned process importing them again (about 4 s of CPU each).

``multiprocessing``'s fork server is started by the first :func:`start_ranks` of the session, with
the modules of :data:`PRELOAD` imported (no torch op has run in it, so no thread pool is forked);
every rank process after that is a fork of it: a fresh process as far as torch.distributed goes.

Example::

    out = CONTEXT.SimpleQueue()
    start_ranks(_rank, (str(store), out), nprocs=2)
    results = [out.get() for _ in range(2)]
"""

from __future__ import annotations

import multiprocessing
from typing import Any, Callable

import torch.multiprocessing as mp

#: What the fork server imports before its first fork (what every rank process imports anyway).
PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "torch.distributed.fsdp",
           "torch.distributed.checkpoint", "orchestrator.loop.train_loop", "orchestrator.loop.group_link",
           "pytest", "numpy"]

#: The context of queues shared with the rank processes.
CONTEXT = multiprocessing.get_context("forkserver")


def prestart() -> None:
    """Start the fork server now, so that its imports (seconds of CPU) run beside whatever comes first."""
    CONTEXT.set_forkserver_preload(PRELOAD)
    from multiprocessing import forkserver

    forkserver.ensure_running()


def start_ranks(fn: Callable[..., Any], args: tuple[Any, ...], nprocs: int = 2) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` processes forked from the fork server; wait for all (a
    rank that raises or dies raises here, as with ``torch.multiprocessing.start_processes``)."""
    CONTEXT.set_forkserver_preload(PRELOAD)  # read when the server starts (the first call of a session)
    mp.start_processes(fn, args=args, nprocs=nprocs, start_method="forkserver", join=True)
