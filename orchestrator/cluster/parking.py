"""The one worker group a driver keeps between fits (see :meth:`WorkerGroup.park`), and its release.

A fit that finished parks its group here; the next fit of this driver takes it (``take_parked``)
when it has the same shape, within the idle time given, after which a timer releases it. A group
parked by an earlier Ray session (another job id) is never handed out.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import ray

if TYPE_CHECKING:
    from orchestrator.cluster.worker_group import WorkerGroup

__all__ = ["park_group", "parked_ids", "release_parked", "take_parked"]


class _ParkingSlot:
    """The one group a driver keeps between fits, with the Ray job it belongs to and its release timer."""

    lock = threading.Lock()
    group: WorkerGroup | None = None
    job: str | None = None
    timer: threading.Timer | None = None


def _job_id() -> str | None:
    try:
        return ray.get_runtime_context().get_job_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - no Ray: nothing to reuse
        return None


def park_group(group: WorkerGroup, idle_s: float) -> None:
    """Keep ``group`` for the next fit of this driver, for at most ``idle_s`` seconds (a group parked
    before is released)."""
    with _ParkingSlot.lock:
        previous, _ParkingSlot.group, _ParkingSlot.job = _ParkingSlot.group, group, _job_id()
        if _ParkingSlot.timer is not None:
            _ParkingSlot.timer.cancel()
        timer = threading.Timer(idle_s, release_after_idle, args=(group,))
        timer.daemon = True
        _ParkingSlot.timer = timer
        timer.start()
    if previous is not None and previous is not group:
        previous.release()


def take_parked() -> WorkerGroup | None:
    """The parked group of this Ray job (a group of an earlier Ray session is dropped), or None."""
    with _ParkingSlot.lock:
        group, job = _ParkingSlot.group, _ParkingSlot.job
        _ParkingSlot.group, _ParkingSlot.job = None, None
        if _ParkingSlot.timer is not None:
            _ParkingSlot.timer.cancel()
            _ParkingSlot.timer = None
    if group is None or job is None or job != _job_id():
        return None
    return group


def release_after_idle(group: WorkerGroup) -> None:
    """The timer's end: release the group if it is still the one parked."""
    with _ParkingSlot.lock:
        if _ParkingSlot.group is not group:
            return
        _ParkingSlot.group, _ParkingSlot.job, _ParkingSlot.timer = None, None, None
    group.release()


def parked_ids() -> tuple[set[str], set[str]]:
    """(placement group ids, actor ids), hex, of the group parked for the next fit: what a leak check
    may find alive on purpose."""
    with _ParkingSlot.lock:
        group = _ParkingSlot.group
        if group is None:
            return set(), set()
        pgs = {group.pg.id.hex()} if group.pg is not None else set()
        kept = [a for a in group.standbys + group.reserve + group.spare_coordinators if a is not None]
        return pgs, {a._actor_id.hex() for a in kept}


def release_parked() -> None:
    """Release the group parked by the last fit now (e.g. before other work needs the cluster); never raises."""
    group = take_parked()
    if group is not None:
        group.release()
