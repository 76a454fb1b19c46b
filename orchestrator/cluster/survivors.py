"""After a rank failed, the ranks that survived it keep their processes for the next attempt.

A rank that raised, died or hung leaves the others blocked in a collective with it. Once its
process is gone (it is killed here: a gloo peer's connections close only when its process ends),
their collective fails, their loop returns that failure, and each process is idle again, with
torch and the loop imported and out of the process group. :func:`keep_survivors` waits up to
``grace_s`` for that, and the ranks that returned become the group's standbys for their own
ranks (:meth:`~orchestrator.cluster.worker_group.WorkerGroup.start` promotes them and starts one
new process per missing rank), in the restart that follows or, when the failure ends the fit, in
the next fit of the driver (the group is parked). A rank that does not return in time is killed
with the rest.

Not for GPU groups (a CUDA context may not survive what a rank raised), elastic groups (the
next attempt may have another world size), nor groups without ``reuse_workers``; nor when warm
standbys are ready for every rank (they replace every rank without a new process).
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from orchestrator.cluster.worker_group import CALL_TIMEOUT_S, WorkerGroup, _kill

logger = logging.getLogger(__name__)

__all__ = ["RETURN_GRACE_S", "keep_survivors"]

#: How long the survivors of a failed rank may take to return once its process is gone (a collective
#: fails at once; a rank in a long computation returns at its next collective).
RETURN_GRACE_S = 2.0


def keep_survivors(group: WorkerGroup, refs: list[Any], failed_rank: int | None,
                   grace_s: float = RETURN_GRACE_S) -> list[int]:
    """Kill rank ``failed_rank`` and keep the ranks whose ``run`` (``refs``) returned within ``grace_s``.

    Args:
        group: The group of the failed attempt (its workers are ``refs``' actors, by rank).
        refs: Each rank's ``run`` call.
        failed_rank: The rank to blame (None: the coordinator failed; nothing is kept then).
        grace_s: How long to wait for the other ranks to return.

    Returns:
        The ranks kept (their workers are the group's standbys now; the others stay in
        ``group.workers``, for the attempt's end to kill). Never raises.
    """
    scaling = group.scaling
    if failed_rank is None or scaling.use_gpu or scaling.elastic or not scaling.reuse_workers \
            or len(refs) != len(group.workers) or len(refs) < 2 \
            or len([s for s in group.standbys if s is not None]) == group.world_size:
        return []
    try:
        _kill([group.workers[failed_rank]])
        others = {ref: rank for rank, ref in enumerate(refs) if rank != failed_rank}
        ready, _ = ray.wait(list(others), num_returns=len(others), timeout=grace_s)
        kept = []
        for ref in ready:
            try:
                ray.get(ref, timeout=CALL_TIMEOUT_S)  # a failure is a value: a dead worker raises here
            except Exception:  # noqa: BLE001 - its process is gone: a new one takes its rank
                continue
            kept.append(others[ref])
    except Exception as exc:  # noqa: BLE001 - keep nothing: the attempt's end kills every worker
        logger.debug("could not keep the survivors of rank %s: %s", failed_rank, exc)
        return []
    if kept:
        _kill([s for s in group.standbys if s is not None])  # partial standbys: the survivors take their place
        group.standbys = [group.workers[rank] if rank in kept else None for rank in range(len(group.workers))]
        group.workers = [w for rank, w in enumerate(group.workers) if rank not in kept]
    return sorted(kept)
