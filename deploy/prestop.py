"""preStop hook for the Ray head pod: stop running Ray jobs gracefully before the pod goes.

Kubernetes sends SIGTERM to the head container's main process (``ray start --block``), and that
signal never reaches a job's driver: Ray (2.60) marks the node as draining and, after
``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`` (30 s by default), kills every process on it without
signalling the driver first. ``orchestrator run`` only gets its preemption notice (SIGTERM, then
an emergency backup within ``preemption_grace_s``, exit code 75) when someone stops the job
through Ray's job API. This hook does that, from inside the pod, before Kubernetes sends SIGTERM:

    lifecycle:
      preStop:
        exec:
          command: ["python", "/home/ray/app/deploy/prestop.py", "--timeout", "165"]

For every RUNNING or PENDING job it calls ``stop_job`` (the job supervisor sends SIGTERM to the
driver, then SIGKILL after ``RAY_JOB_STOP_WAIT_TIME_S``) and waits until each has reached a
terminal state or ``--timeout`` has passed. It never raises: a hook that fails must not block the
pod's deletion, and Kubernetes kills the pod at ``terminationGracePeriodSeconds`` anyway.

With Ray token authentication (``authOptions.mode: token``), KubeRay puts ``RAY_AUTH_MODE`` and
``RAY_AUTH_TOKEN`` in the container's environment, which an exec hook inherits; nothing to pass.

Order the timeouts: preemption_grace_s (120) < RAY_JOB_STOP_WAIT_TIME_S (150)
< --timeout (165) < terminationGracePeriodSeconds (180).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Sequence

ACTIVE = frozenset({"PENDING", "RUNNING"})
TERMINAL = frozenset({"STOPPED", "SUCCEEDED", "FAILED"})


def _status_name(status: Any) -> str:
    """``JobStatus.RUNNING`` (an enum in Ray, a plain string in fakes) as ``"RUNNING"``."""
    return str(getattr(status, "value", status)).upper()


def stop_running_jobs(
    client: Any,
    timeout_s: float,
    poll_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Ask every active job to stop and wait for them; returns the ids still not terminal.

    ``client`` is a ``ray.job_submission.JobSubmissionClient`` (or anything with ``list_jobs``,
    ``stop_job`` and ``get_job_status``).
    """
    deadline = clock() + timeout_s
    pending = [job.submission_id for job in client.list_jobs()
               if job.submission_id and _status_name(job.status) in ACTIVE]
    if not pending:
        log("prestop: no running Ray jobs")
        return []
    for job_id in pending:
        log(f"prestop: stopping Ray job {job_id}")
        try:
            client.stop_job(job_id)
        except Exception as exc:  # already finished, or the API hiccuped: keep going
            log(f"prestop: stop_job({job_id}) failed: {type(exc).__name__}: {exc}")
    while pending:
        still = []
        for job_id in pending:
            try:
                status = _status_name(client.get_job_status(job_id))
            except Exception as exc:
                log(f"prestop: get_job_status({job_id}) failed: {type(exc).__name__}: {exc}")
                status = "UNKNOWN"
            if status in TERMINAL:
                log(f"prestop: Ray job {job_id} is {status}")
            else:
                still.append(job_id)
        pending = still
        if not pending or clock() >= deadline:
            break
        sleep(min(poll_s, max(0.0, deadline - clock())))
    for job_id in pending:
        log(f"prestop: Ray job {job_id} did not stop within {timeout_s:g} s")
    return pending


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="http://127.0.0.1:8265",
                        help="Ray dashboard URL, from inside the head pod (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=165.0,
                        help="seconds to wait for the jobs to stop; keep it below the pod's "
                             "terminationGracePeriodSeconds (default %(default)s)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between status checks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(args.address)
        left = stop_running_jobs(client, args.timeout, args.poll)
    except Exception as exc:  # never block the pod's deletion on the hook itself
        print(f"prestop: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 0
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
