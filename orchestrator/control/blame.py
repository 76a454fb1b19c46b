"""Whom a failed attempt blames: the rank that died, the rank that raised, or the coordinator.

A rank that dies or raises makes its peers raise in their next collective ("connection reset by
peer", a gloo or NCCL error), and a peer's error may reach the driver first. The driver records the
root cause instead (:func:`root_cause`): a death, or an error other than a lost peer, if one shows
up within :data:`PEER_LOSS_WAIT_S`. Only a death is recovered from the survivors' memory, so naming
the right rank decides what the restart can keep. What no restart can fix (the run's backups do not
fit this configuration) is raised as it is, not retried (:func:`raised`).
"""

from __future__ import annotations

import re
import time
from typing import Any

import ray

from orchestrator.cluster.worker import WorkerFailure
from orchestrator.cluster.worker_group import CALL_TIMEOUT_S
from orchestrator.control.failures import AttemptFailed, FailureRecord
from orchestrator.errors import WorkerError, WorkerLostError
from orchestrator.storage.checkpoint import IncompatibleBackup
from orchestrator.storage.layout import ResumeMismatch

__all__ = ["ACTOR_GONE", "NOT_RETRYABLE", "PEER_LOSS_WAIT_S", "death", "raised", "root_cause"]

#: What a rank raises when an actor it calls (the coordinator) is gone (exception type names).
ACTOR_GONE = frozenset({"RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError"})

#: What a rank raises that no restart can fix: the run's own backups do not fit this configuration.
NOT_RETRYABLE = (ResumeMismatch, IncompatibleBackup)

#: A survivor's collective error when a peer process is gone (gloo, NCCL, the TCP store).
PEER_LOSS_RE = re.compile(r"connection (reset|closed|refused)|broken pipe|by peer|remote process|"
                          r"nccl|gloo|tcpstore", re.IGNORECASE)
#: How long a rank's lost-peer error waits for the peer's own failure. A peer that raised or whose
#: process died shows up within a second; one lost with its node only once Ray declares the node
#: dead (its health checks: about 15-30 s with Ray's defaults). Blaming the survivor instead would
#: name the wrong rank and give up its live recovery (only a death is recovered from memory). The
#: wait ends as soon as every other rank's result is in.
PEER_LOSS_WAIT_S = 30.0


def root_cause(failed: AttemptFailed, pending: list[Any], rank_of: dict[Any, int], attempt: int,
               infos: list[dict[str, Any]]) -> AttemptFailed:
    """The failure to record: when a rank reports a lost peer, the peer's own failure if it shows up soon.

    A rank that dies or raises makes its peers raise in their collective, and a peer's error may
    reach the driver first; blaming that survivor would name the wrong rank, node and cause. The
    root cause is a rank that died, or one that raised anything but a lost peer.
    """
    if not isinstance(failed.error, WorkerError) or not PEER_LOSS_RE.search(failed.record.cause):
        return failed
    deadline = time.monotonic() + PEER_LOSS_WAIT_S
    waiting = list(pending)
    while waiting and time.monotonic() < deadline:
        ready, waiting = ray.wait(waiting, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        for ref in ready:
            try:
                value = ray.get(ref, timeout=CALL_TIMEOUT_S)  # ready: it is there
            except ray.exceptions.RayActorError as exc:
                return death(rank_of[ref], infos[rank_of[ref]], attempt, exc)
            except Exception:  # noqa: BLE001 - an unreadable result: keep looking
                continue
            if isinstance(value, WorkerFailure) and not PEER_LOSS_RE.search(f"{value.error_type}: {value.message}"):
                return raised(value, attempt)
    return failed


def death(rank: int, info: dict[str, Any], attempt: int, exc: BaseException) -> AttemptFailed:
    """Rank ``rank``'s process died (``exc``: Ray's actor error); ``info`` is its node info."""
    cause = f"rank {rank} (node {info['node']}, pid {info['pid']}) died: {str(exc).splitlines()[0]}"
    return AttemptFailed(FailureRecord(attempt, rank, info["node"], cause), WorkerLostError(cause))


def raised(value: WorkerFailure, attempt: int) -> AttemptFailed:
    """A rank's loop raised (``value``: what it returned); raises a :data:`NOT_RETRYABLE` error as it is."""
    if isinstance(value.exception, NOT_RETRYABLE):  # a restart would meet the same backup: not a failure to retry
        raise value.exception
    error = WorkerError(value.rank, value.node, value.error_type, value.message, value.traceback)
    error.__cause__ = value.exception
    cause = f"rank {value.rank} raised {value.error_type}: {value.message}"
    return AttemptFailed(FailureRecord(attempt, value.rank, value.node, cause), error)
