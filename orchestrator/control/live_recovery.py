"""Live recovery, the driver's part: secure the survivors' state before the group is torn down.

When a rank *dies* (SIGKILL, OOM kill, a lost node: a :class:`~orchestrator.errors.WorkerLostError`,
not an error raised by the user's code, which would fail the same way again), every surviving rank
still holds the model and optimizer of the last step that completed everywhere. Before the attempt
kills its workers, :func:`secure` asks each survivor for its state as of its last step boundary
(``TrainWorker.live_state``, see :mod:`orchestrator.loop.live`), waiting at most
:data:`LIVE_COPY_TIMEOUT_S`: a survivor blocked in a collective with the dead peer answers from its
second thread, and it is frozen from then on (it is killed and replaced right after). The payloads
stay in Ray's object store, owned by the driver; the next attempt's ranks fetch them from there
(never from storage): the donor's (rank 0 when it survived, else the lowest survivor) shared part
for every rank, each survivor's own part for its replacement, and a dead rank rebuilds its own part
from the donor's. The coordinator's state is taken at the same moment (no sync point can pass while
a rank is dead).

A survivor waiting at a sync point with the coordinator (for the dead rank, which never comes) is
at a step boundary too (see :mod:`orchestrator.loop.live` for which ones); one whose collective
raised because its peer died answers with its state as of the boundary before that step.

Nothing is secured (and the next attempt resumes from the newest committed backup, as before) when
no survivor answers in time with a marked state (a survivor in the optimizer update, at a
non-finite loss's sync point, at an epoch's end under an epoch-interval LR schedule), the
survivors' states are of different steps, the data has per-rank state of its own (iterable
datasets), or the coordinator does not answer.

Example:
    copy = secure(group, relay, failed)  # in the attempt, before its workers are stopped
    resume = copy.resume(detected_at) if copy is not None else find_resume(...)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray

from orchestrator.cluster.worker_group import CALL_TIMEOUT_S, WorkerGroup
from orchestrator.control.failures import AttemptFailed
from orchestrator.control.specs import Resume
from orchestrator.errors import WorkerLostError
from orchestrator.loop.specs import LiveResume

logger = logging.getLogger(__name__)

__all__ = ["LIVE_COPY_TIMEOUT_S", "LiveCopy", "secure"]

#: How long a survivor may take to reach a step boundary and hand out its state.
LIVE_COPY_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class LiveCopy:
    """The survivors' state of a failed attempt, secured in Ray's object store.

    Args:
        live: What the next attempt's ranks load (step, donor, payload references).
        coordinator_state: The coordinator's state at that moment (callbacks, history, position).
        last_committed: The newest committed backup then (the next attempt never overwrites it).
        rank: The rank that died.
        lost_steps: 1 when a step had begun after the state (it is redone), else 0.
        detection_s: The failure's ``detection_s``.
        secured_s: Seconds the copy took.
        secured_at: Wall-clock time it was secured.
    """

    live: LiveResume
    coordinator_state: dict[str, Any]
    last_committed: str | None
    rank: int
    lost_steps: int
    detection_s: float | None
    secured_s: float
    secured_at: float

    def resume(self) -> Resume:
        """The next attempt's :class:`~orchestrator.control.specs.Resume`."""
        detection_s = None if self.detection_s is None else round(self.detection_s, 3)
        recovery = {"step": self.live.step, "rank": self.rank, "detection_s": detection_s,
                    "secured_s": round(self.secured_s, 3), "secured_at": self.secured_at,
                    "lost_steps": self.lost_steps}
        return Resume(folder=self.last_committed, state=self.coordinator_state, live=self.live, recovery=recovery,
                      world_size=self.live.world_size)


def _at_position(state: dict[str, Any], position: dict[str, Any], step: int) -> dict[str, Any]:
    """The coordinator's state with its position moved to the ranks' (it moves only at sync points)."""
    state = dict(state)
    view = dict(state.get("view", {}))
    phase, epoch = position.get("phase"), int(position["epoch"])
    if phase == "start":  # before the first epoch's begin
        epoch, done = 0, 0
    elif phase == "epoch_end":  # waiting at the next epoch's begin
        epoch, done = epoch + 1, 0
    else:
        done = 0 if phase == "begin" else int(position["batch"]) + 1
    view.update(next_epoch=epoch, epoch_steps_done=done, global_step=step)
    state["view"] = view
    return state


def secure(group: WorkerGroup, relay: Any, failed: AttemptFailed,
           timeout_s: float = LIVE_COPY_TIMEOUT_S) -> LiveCopy | None:
    """Copy the survivors' state of a dead rank's attempt into the object store; None when it cannot be.

    Args:
        group: The attempt's worker group (its workers still alive, the dead one excepted).
        relay: The attempt's coordinator relay (``relay.call("live_state")``).
        failed: What ended the attempt; only a rank's death (``WorkerLostError``) is recovered live.
        timeout_s: How long each survivor may take to answer. Defaults to :data:`LIVE_COPY_TIMEOUT_S`.
    """
    dead = failed.record.rank
    if not isinstance(failed.error, WorkerLostError) or dead is None:
        return None
    began, workers = time.monotonic(), list(group.workers)
    alive = [r for r in range(len(workers)) if r != dead]
    if not alive:
        return None
    donor = alive[0]  # rank 0 when it survived, else the lowest survivor
    calls = {r: workers[r].live_state.remote(r == donor, timeout_s) for r in alive}
    try:
        headers = ray.get([header for header, _ in calls.values()], timeout=timeout_s + CALL_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - another rank died too, or did not answer: use the backups
        logger.warning("live recovery not possible (%s); resuming from the newest committed backup",
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    refused = [h for h in headers if not h.get("ok")]
    steps = {h.get("step") for h in headers}
    if refused or len(steps) != 1:
        why = "; ".join(f"rank {h['rank']}: {h.get('reason')}" for h in refused) or \
            f"the survivors are at different steps {sorted(s for s in steps if s is not None)}"
        logger.warning("live recovery not possible (%s); resuming from the newest committed backup", why)
        return None
    try:
        coordinator = relay.call("live_state")
    except AttemptFailed as exc:
        logger.warning("live recovery not possible (the coordinator: %s); resuming from the newest "
                       "committed backup", exc)
        return None
    step = int(steps.pop())
    live = LiveResume(step=step, donor=donor, payloads={r: payload for r, (_, payload) in calls.items()},
                      world_size=len(workers))
    secured_s = time.monotonic() - began
    logger.warning("rank %d died; continuing from the survivors' state at step %d (secured in %.2fs)",
                   dead, step, secured_s)
    return LiveCopy(live=live, coordinator_state=_at_position(coordinator["state"], headers[0]["position"], step),
                    last_committed=coordinator["last_committed"], rank=dead,
                    lost_steps=int(any(h.get("in_flight") for h in headers)),
                    detection_s=failed.record.detection_s, secured_s=secured_s, secured_at=time.time())
