"""What the coordinator needs for one attempt: a typed value, no torch, no ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.callbacks.base import Callback
from orchestrator.storage.fs import StorageSpec


@dataclass(frozen=True)
class CoordinatorSpec:
    """The coordinator's run: its callbacks, the ranks it waits for, and where backups go.

    Args:
        callbacks: Callbacks that decide (``runs_on == "coordinator"``), in the user's order.
        params: Keras-style params given to every callback (``epochs``, ``steps``, ``metrics``, ...).
        world_size: Number of ranks that report at each sync point.
        storage: The run storage (backups are committed there), or None.
        restore: The coordinator state of the backup this attempt resumes from, or None.
        resumed_from: That backup's folder (never overwritten by this attempt).
        backup_dir: The run's backup folder, relative to the run directory: where ``step-<N>/``
            folders go for ``Backup`` decisions that leave ``backup_dir`` as ``None``.
        keep_backups: How many committed backups to keep after each commit, for ``Backup``
            decisions that leave ``keep`` as ``None``.
        lease_token: The driver's run-lease token: checked on storage before every commit and
            purge, so a fenced-out attempt can do neither; None: no lease (tests, no storage).
        recovery: A live recovery's timeline so far (the driver's part), completed and emitted as
            a ``recovered`` event at the first step after it; None otherwise.
        failures: Failed attempts of the run the driver restarted after, before this one.

    Example:
        >>> CoordinatorSpec(callbacks=[], params={"epochs": 1}, world_size=2).backup_dir
        'backup'
    """

    callbacks: list[Callback] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    storage: StorageSpec | None = None
    restore: dict[str, Any] | None = None
    resumed_from: str | None = None
    backup_dir: str = "backup"
    keep_backups: int = 1
    lease_token: int | None = None
    recovery: dict[str, Any] | None = None
    failures: int = 0
