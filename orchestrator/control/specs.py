"""What one ``fit`` asks of the controller, and what one attempt adds: typed values, no torch.

:class:`FitSpec` is built and validated by :class:`orchestrator.Trainer`; the controller derives
from it, per attempt, the :class:`~orchestrator.loop.specs.TrainSpec` every rank gets and the
:class:`~orchestrator.cluster.specs.CoordinatorSpec` the coordinator gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.callbacks.base import Callback
from orchestrator.cluster.specs import CoordinatorSpec
from orchestrator.core.config import LoopConfig, ScalingConfig
from orchestrator.loop.specs import TrainSpec
from orchestrator.storage.fs import StorageSpec


@dataclass(frozen=True)
class BackupPolicy:
    """Where BackupAndRestore's ``step-<N>/`` folders go and how many are kept.

    Args:
        folder: Relative to the run directory. Defaults to ``"backup"``.
        keep: Committed backups kept after each commit. Defaults to ``1``.
        delete_at_end: Delete the backups once training finished. Defaults to ``False``.
    """

    folder: str = "backup"
    keep: int = 1
    delete_at_end: bool = False


@dataclass(frozen=True)
class FaultPolicy:
    """How the controller reacts to failures, hangs, preemptions and drains.

    Args:
        max_failures: Failed attempts that are restarted. Defaults to ``0``.
        hang_timeout_s: No sign of life from a rank for this long is a failure. Defaults to ``1800``.
        preemption_grace_s: Time the ranks get to stop with an emergency backup. Defaults to ``120``.
        placement_timeout_s: Time an attempt waits for the cluster's resources. Defaults to ``600``.
        warm_standbys: Keep idle pre-warmed workers for restarts (CPU groups). Defaults to ``True``.
        live_recovery: After a worker's death, restart from the survivors' state in memory when they
            hold a consistent one (see :mod:`orchestrator.control.live_recovery`). Defaults to ``True``.
        poll_interval_s: How often the driver looks for finished ranks, its preemption flag and the
            coordinator's answer (local checks, no call to another process). Defaults to ``0.2``.
        news_interval_s: How often the driver asks the coordinator for its events and the ranks'
            heartbeat ages (an actor call; the driver asks at least every ``hang_timeout_s / 20``,
            so that a hang is seen within 5% of its timeout). Defaults to ``1``.
        drain_poll_interval_s: How often the driver asks Ray for draining nodes. Defaults to ``1``.
        lease_ttl_s: The run lease expires this long after its driver stopped renewing it (a
            killed driver). Defaults to ``60``.
        lease_wait_s: How long a second driver waits for the lease before failing with
            ``LeaseHeld``; None waits a little longer than ``lease_ttl_s``, so a resubmission
            after a killed driver goes on, and one beside a live driver fails. Defaults to ``None``.
    """

    max_failures: int = 0
    hang_timeout_s: float = 1800.0
    preemption_grace_s: float = 120.0
    placement_timeout_s: float = 600.0
    warm_standbys: bool = True
    live_recovery: bool = True
    poll_interval_s: float = 0.2
    news_interval_s: float = 1.0
    drain_poll_interval_s: float = 1.0
    lease_ttl_s: float = 60.0
    lease_wait_s: float | None = None

    @property
    def news_every_s(self) -> float:
        """Seconds between two questions of the driver to the coordinator."""
        return min(self.news_interval_s, self.hang_timeout_s / 20)

    @property
    def lease_wait(self) -> float:
        """Seconds a second driver waits for the run lease."""
        return self.lease_ttl_s + 5.0 if self.lease_wait_s is None else self.lease_wait_s


@dataclass(frozen=True)
class FitSpec:
    """Everything one ``fit`` call needs, validated by :class:`orchestrator.Trainer`.

    Args:
        loop: What every rank builds and runs.
        scaling: Number of workers and what each one holds.
        epochs: Epochs of the whole run.
        storage: The run storage.
        callbacks: Callbacks that decide, run once on the coordinator.
        driver_callbacks: Display-only callbacks run on the driver (ProgbarLogger, History).
        params: Keras-style params given to every callback.
        batch_sync_every: Global steps between batch sync points, or None.
        backups: Where backups go and how many are kept.
        faults: Failure, hang, preemption and placement policy.
        config_snapshot: What run.json records (no credentials).
        takeover: Take the run lease even from a live driver (the operator knows it is gone).
        lease_token: Set by the controller once it holds the run lease; given to the coordinator.
    """

    loop: LoopConfig
    scaling: ScalingConfig
    epochs: int
    storage: StorageSpec
    callbacks: list[Callback] = field(default_factory=list)
    driver_callbacks: list[Callback] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    batch_sync_every: int | None = None
    backups: BackupPolicy = BackupPolicy()
    faults: FaultPolicy = FaultPolicy()
    config_snapshot: dict[str, Any] = field(default_factory=dict)
    takeover: bool = False
    lease_token: int | None = None

    def train_spec(self, resume: "Resume") -> TrainSpec:
        """What every rank of an attempt resuming from ``resume`` (or from scratch) runs."""
        return TrainSpec(loop=self.loop, epochs=self.epochs, batch_sync_every=self.batch_sync_every,
                         storage=self.storage, resume_from=None if resume.live is not None else resume.folder,
                         resume_layout=(resume.state or {}).get("layout"), use_gpu=self.scaling.use_gpu,
                         threads=self.scaling.threads_per_worker, live=resume.live,
                         max_workers=self.scaling.num_workers if self.scaling.elastic else None,
                         resume_world_size=resume.world_size)

    def coordinator_spec(self, resume: "Resume", world_size: int | None = None) -> CoordinatorSpec:
        """What the coordinator of an attempt resuming from ``resume`` runs (on ``world_size`` ranks:
        defaults to ``num_workers``; an elastic attempt's is what the group could place)."""
        return CoordinatorSpec(callbacks=self.callbacks, params=self.params,
                               world_size=world_size or self.scaling.num_workers,
                               storage=self.storage, restore=resume.state, resumed_from=resume.folder,
                               backup_dir=self.backups.folder, keep_backups=self.backups.keep,
                               lease_token=self.lease_token, recovery=resume.recovery, failures=resume.failures)


@dataclass(frozen=True)
class Resume:
    """Where an attempt starts: a committed backup (folder and coordinator state) or scratch (both None),
    or (``live``) the survivors' state of the attempt before, with the coordinator's state as of it
    (``folder`` is then the newest committed backup, which this attempt never overwrites) and the
    first part of the recovery's timeline (``recovery``, see :mod:`orchestrator.control.live_recovery`).
    ``world_size`` is the number of workers that wrote the state (None: scratch or not known); an
    elastic run may resume it on another number. ``failures``: the failed attempts the driver
    restarted after, before this one."""

    folder: str | None = None
    state: dict[str, Any] | None = None
    live: Any = None
    recovery: dict[str, Any] | None = None
    world_size: int | None = None
    failures: int = 0

    @property
    def step(self) -> int:
        """The global step the state is at (0 from scratch)."""
        if self.live is not None:
            return int(self.live.step)
        return int(((self.state or {}).get("view") or {}).get("global_step") or 0)
