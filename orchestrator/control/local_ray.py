"""The local Ray instance a fit starts for itself, and the settings that cut the CPU it takes.

``fit`` starts a local instance only when no Ray is running for it (no ``ray.init`` before, no
``RAY_ADDRESS``, no ``ray start`` cluster on this machine): that instance serves this one fit
and stops with it. On a small machine its processes take CPU that the training ranks need, so
it starts with the settings below: each switches off or slows down work that nothing of that
instance uses, or (``MALLOC_ARENA_MAX``) makes a rank's step cheaper. ``python
benchmarks/overhead.py`` measures the CPU seconds of every process of a steady fit by role
(``--source`` compares two checkouts side by side). A Ray cluster
you start yourself (``ray.init()``, ``ray start``) keeps Ray's defaults: these apply only to the
instance ``fit`` starts. When the fit ends, :func:`shutdown_ray` stops that instance and makes sure
its processes are gone (one that hangs in its exit is killed).

Example:
    >>> sorted(SYSTEM_CONFIG)
    ['task_events_report_interval_ms', 'worker_niceness']
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

import ray

from orchestrator.core.processes import Proc, end_processes, process_tree

__all__ = ["ENVIRONMENT", "EXIT_GRACE_S", "SYSTEM_CONFIG", "ensure_ray", "lean_environment", "shutdown_ray",
           "start_local_ray", "starts_local"]

logger = logging.getLogger(__name__)

#: Seconds the processes of an instance this driver started get to end after ``ray.shutdown()``.
EXIT_GRACE_S = 10.0

#: Ray's ``_system_config`` for the instance ``fit`` starts (read by its gcs_server, raylet and workers).
SYSTEM_CONFIG: dict[str, Any] = {
    # Task events (each actor call's state changes, buffered in the caller and the callee, sent
    # to gcs_server every second and stored there) feed only Ray's state API and dashboard
    # (`ray list tasks`, the timeline), which this instance does not start. A fit makes a few
    # actor calls a second (progress, heartbeats, the driver's questions, sync points).
    "task_events_report_interval_ms": 0,
    # Ray starts its worker processes at niceness 15, below its own daemons, the driver and
    # everything else on the machine; here the workers are the training ranks (and the coordinator):
    # they run at the normal priority, as the processes of a torchrun job do.
    "worker_niceness": 0,
}

#: Environment variables of the instance's processes (gcs_server, raylet, and every worker the
#: raylet starts: the training ranks, the coordinator), read as each process starts; a value
#: already set in the environment is kept.
ENVIRONMENT: dict[str, str] = {
    # The log monitor (it sends the workers' output to the driver) looks for new log files on
    # every pass, ten times a second, while there are fewer than 1,000 files: five globs of the
    # logs folder each time. With 0, it looks every LOG_NAME_UPDATE_INTERVAL_S (0.5 s): a new
    # worker's first lines reach the driver up to 0.4 s later, none is lost (a file is read from
    # its start when found), and what it reads from known files is unchanged.
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    # glibc's malloc gives each thread that allocates an arena of its own, up to 8 per core; only
    # the process's main thread allocates from the main one. A rank's loop runs in a thread of its
    # actor's pool (the actor takes a preemption notice or a live-state copy while ``run`` runs),
    # and from a secondary arena the same training step took about 6% more CPU time than from the
    # main thread (benchmarks/overhead.py --realistic --hand: a rank's CPU per step against the
    # hand-written loop run on its actor's main thread). With one arena every thread allocates from
    # the main one; the threads of these processes that allocate at the same time are few.
    "MALLOC_ARENA_MAX": "1",
}


def starts_local() -> bool:
    """Whether ``ray.init()`` would start a new local instance (rather than join a running cluster).

    Ray joins the cluster named by ``RAY_ADDRESS``, else the latest one ``ray start`` started on
    this machine; ``RAY_ADDRESS=local`` always starts a new one. Asks Ray's own lookup (quietly:
    ``ray.init`` warns again if it finds several clusters); False when that lookup fails, so that
    ``ray.init`` runs as it would without this module and reports the problem itself.
    """
    services = logging.getLogger("ray._private.services")
    level = services.level
    services.setLevel(logging.ERROR)
    try:
        return ray._private.services.canonicalize_bootstrap_address(None) is None
    except Exception:  # noqa: BLE001 - a bad RAY_ADDRESS, or another Ray: ray.init says what is wrong
        return False
    finally:
        services.setLevel(level)


@contextlib.contextmanager
def lean_environment() -> Iterator[None]:
    """:data:`ENVIRONMENT` in ``os.environ`` inside the block (a value already set is kept), for the Ray
    processes started there to inherit; the variables it added are removed on the way out."""
    added = {k: v for k, v in ENVIRONMENT.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def start_local_ray() -> None:
    """Start the local instance of one fit, with :data:`SYSTEM_CONFIG` and :data:`ENVIRONMENT`.

    It starts without Ray's dashboard (the web UI and its job, state and metrics views: about 10
    processes, and ``ray.init`` waits for them); workers' logs still reach the driver.
    """
    with lean_environment():
        ray.init(logging_level=logging.WARNING, log_to_driver=True, include_dashboard=False,
                 _system_config=dict(SYSTEM_CONFIG))


def ensure_ray() -> bool:
    """Use the Ray cluster already initialised (or named by RAY_ADDRESS); else start a local one.

    The local instance lives as long as this fit and serves only it, so it starts without Ray's
    dashboard (the web UI and its job, state and metrics views: about 10 processes, and
    ``ray.init`` waits for them) and with :data:`SYSTEM_CONFIG` and :data:`ENVIRONMENT`,
    which switch off work of Ray's background processes that nothing of that instance uses and
    make a rank's step cheaper (each one documented above); workers' logs still reach the driver. Start
    Ray yourself (``ray.init()`` or ``ray start --head``) to have the dashboard and Ray's defaults;
    joining a running cluster changes nothing of it.

    Returns True when this call started Ray or connected to it (so the caller shuts it down).
    """
    if ray.is_initialized():
        return False
    if starts_local():
        start_local_ray()
    else:
        ray.init(logging_level=logging.WARNING, log_to_driver=True, include_dashboard=False)
    return True


def instance_processes() -> list[Proc]:
    """The processes of the Ray instance this driver started (gcs_server, raylet, log monitor, ...) and
    all their descendants (the workers, and what they started: DataLoader workers); none when this
    driver joined a cluster that someone else started, or when they cannot be listed."""
    try:
        node = ray._private.worker._global_node
        roots = [info.process.pid for infos in node.all_processes.values() for info in infos
                 if getattr(info, "process", None) is not None]
    except Exception:  # noqa: BLE001 - Ray's private layout changed, or no node: nothing of ours to follow
        return []
    return process_tree(roots)


def shutdown_ray(grace_s: float = EXIT_GRACE_S) -> list[Proc]:
    """``ray.shutdown()``, and then the processes of the instance this driver started (if it did) are gone.

    Ray stops them, but a worker can hang in its own exit: with Ray 2.60 a TrainWorker was seen
    blocked for good in the core worker's exit handler (a condition variable in the pub-sub
    publisher's destructor), orphaned and waking every few seconds. Whatever of the instance still
    runs ``grace_s`` seconds after the shutdown is killed (SIGKILL) and named in a warning; a process
    that is not the instance's (a cluster this driver only joined, a pid reused since) is never touched.

    Returns the processes that had to be killed.
    """
    processes = instance_processes()
    ray.shutdown()
    killed = end_processes(processes, grace_s)
    if killed:
        logger.warning("%d process(es) of the local Ray instance did not exit within %.0f s of its shutdown and "
                       "were killed (pids %s)", len(killed), grace_s, ", ".join(str(p.pid) for p in killed))
    return killed
