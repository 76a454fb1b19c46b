"""Where an attempt resumes from storage: the newest valid committed backup, checked against this fit.

A backup that is torn, unreadable or of another layout version is skipped with a warning and a
``backup_skipped`` event (never trusted, never deleted); leftovers newer than the one found are
removed (each is a save that never committed). The backup's layout must match this fit's: another
batch size, seed or accumulation is refused by name; another number of workers only where the run
can use it (an elastic run's world sizes, an FSDP run's resharding). A resume from the survivors'
memory instead is :mod:`orchestrator.control.live_recovery`.
"""

from __future__ import annotations

import warnings

from orchestrator.control.specs import FitSpec, Resume
from orchestrator.core.events import EventType
from orchestrator.errors import OrchestratorError
from orchestrator.storage.checkpoint import latest_valid, read_coordinator_state, remove_newer
from orchestrator.storage.fs import RunStorage
from orchestrator.storage.layout import check_layout, config_layout, reshardable
from orchestrator.storage.run_files import EventLog

__all__ = ["find_resume"]


def find_resume(fit: FitSpec, storage: RunStorage, events: EventLog, reached: int | None = None) -> Resume:
    """The newest valid committed backup (folder, coordinator state), after removing newer leftovers.

    ``reached`` is the highest global step the previous attempt of this driver got to (see
    :func:`~orchestrator.control.driver_side.reached_step`), recorded on the ``restored`` event with
    the steps lost (``reached`` minus the backup's step); None when not known.

    An elastic run (``num_workers=(min, max)``) resumes a backup written by any of its world sizes
    (:meth:`~orchestrator.core.config.ScalingConfig.world_sizes`): its layout records ``max``.

    Raises:
        OrchestratorError: The backup was written by another number of workers (one an elastic run cannot use).
        ResumeMismatch: The backup was written with another batch size or seed.
    """
    backup_dir = fit.backups.folder

    def skipped(step: int, reason: str) -> None:
        warnings.warn(f"skipping backup step {step} in {storage.url(backup_dir)}: {reason}", stacklevel=4)
        events.append(EventType.BACKUP_SKIPPED, step=step, reason=reason)

    found = latest_valid(storage, backup_dir, on_skip=skipped)
    remove_newer(storage, backup_dir, found.manifest.step if found else None)
    if found is None:
        return Resume()
    written_by = found.manifest.world_size
    state = read_coordinator_state(storage, found.folder)
    current = config_layout(fit.loop, fit.scaling.num_workers)
    check_layout(state.get("layout"), current, storage.url(found.folder))
    if fit.scaling.elastic and written_by not in fit.scaling.world_sizes():
        raise OrchestratorError(
            f"the backup in {storage.url(found.folder)} was written by {written_by} workers, which "
            f"num_workers=({fit.scaling.min_workers}, {fit.scaling.num_workers}) cannot resume with the same "
            f"global batch (its world sizes are {fit.scaling.world_sizes()}); resume with num_workers={written_by}")
    if not fit.scaling.elastic and written_by != fit.scaling.num_workers \
            and not reshardable(state.get("layout"), current):
        raise OrchestratorError(
            f"the backup in {storage.url(found.folder)} was written by {written_by} workers; "
            f"resume with num_workers={written_by} (backups of strategy='fsdp' runs reshard)")
    events.append(EventType.RESTORED, epoch=found.manifest.epoch, step=found.manifest.step, folder=found.folder,
                  phase=found.manifest.phase, reached_step=reached,
                  lost_steps=None if reached is None else max(reached - found.manifest.step, 0))
    return Resume(folder=found.folder, state=state, world_size=written_by)
