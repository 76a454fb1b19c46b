"""What one attempt asks of every rank, and what a rank returns: typed values, no torch.

:class:`TrainSpec` is built once per attempt on the driver and sent to every worker unchanged;
the rank's own coordinates (rank, world size, device) travel beside it. :class:`LoopResult` is
what a rank's loop returns when it ends normally. :class:`CoordinatorLink` is how the loop talks to
the coordinator (a :class:`~orchestrator.loop.group_link.GroupLink` in production).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.core.config import LoopConfig
from orchestrator.decisions import Decision, Report
from orchestrator.storage.fs import StorageSpec


@dataclass(frozen=True)
class TrainSpec:
    """Everything every rank of one attempt needs besides its own rank.

    Args:
        loop: The validated loop configuration (factories, batch size, seed, ...).
        epochs: Number of epochs of the whole run (a resumed attempt continues inside it).
        batch_sync_every: Global steps between batch sync points, or None (see ``Callback``).
        storage: The run storage, or None (no backups or checkpoints).
        resume_from: A committed backup folder, relative to the run directory, to resume from.
        resume_layout: What that backup's position means (recorded by the coordinator); a rank
            whose own layout differs refuses to load it (:func:`~orchestrator.storage.layout.check_layout`).
        use_gpu: One GPU per rank and NCCL; else CPU and gloo.
        threads: torch intra-op threads per rank (None: torch's default).
        live: The survivors' state to resume from instead of a backup (a live recovery), or None.
        max_workers: An elastic run's ``max`` (``num_workers=(min, max)``): every attempt keeps the
            global batch of ``max`` ranks (see :func:`~orchestrator.core.config.elastic_accumulation`)
            and may resume state written by another number of ranks. None: not elastic.
        resume_world_size: The number of ranks that wrote the state resumed (a backup or the
            survivors' attempt), when known; None: this attempt's.

    Example:
        >>> spec = TrainSpec(loop=config, epochs=3, storage=StorageSpec("/tmp/runs", "r"))  # doctest: +SKIP
    """

    loop: LoopConfig
    epochs: int
    batch_sync_every: int | None = None
    storage: StorageSpec | None = None
    resume_from: str | None = None
    resume_layout: dict | None = None
    use_gpu: bool = False
    threads: int | None = None
    live: "LiveResume | None" = None
    max_workers: int | None = None
    resume_world_size: int | None = None


@dataclass
class LoopResult:
    """What a rank returns when its loop ends normally."""

    rank: int
    learning_rates: list[float] = field(default_factory=list)
    epochs_run: int = 0
    steps_run: int = 0
    stopped_at: tuple[int, int] | None = None
    preempted: bool = False
    scaler_skips: int = 0  # optimizer steps the GradScaler skipped (inf/NaN gradients under "16-mixed")
    state_dict: dict[str, Any] | None = None  # rank 0: the final model weights, on CPU


@dataclass(frozen=True)
class LiveResume:
    """The survivors' state a live recovery resumes from (see :mod:`orchestrator.loop.live`).

    Args:
        step: The global step of the state (the last step every rank completed).
        donor: The surviving rank whose payload holds the shared components.
        payloads: Surviving rank -> its payload in Ray's object store (an ``ObjectRef``); a rank
            without one died and rebuilds its own state from the donor's.
        world_size: The number of ranks of the attempt that held the state. Defaults to None (the
            same as the attempt that resumes it).

    Example:
        >>> LiveResume(step=12, donor=0, payloads={0: "ref"}).step
        12
    """

    step: int
    donor: int
    payloads: dict[int, Any]
    world_size: int | None = None


class CoordinatorLink(Protocol):
    """How a rank talks to the coordinator (a Ray actor in production, anything in tests)."""

    def sync(self, report: Report) -> list[Decision]:
        """Block until every rank reported (a GroupLink combines them); return the decisions for all."""

    def progress(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        """Fire-and-forget progress update (rank 0 only, time-gated)."""

    def persisted(self, rank: int, folder: str, entries: list[Any] | None, meta: dict[str, Any]) -> None:
        """A backup's files on this rank are durable (entries) or failed (None); blocks until recorded."""

    def heartbeat(self) -> None:
        """Fire-and-forget sign of life for the hang watchdog (time-gated by the loop)."""
