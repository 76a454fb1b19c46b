"""Decisions: values the coordinator hands to every rank.

A callback never flips a flag on a shared object. It returns one of these values from a
hook; the coordinator collects them once for the whole cluster and every rank applies the
same list at the same step. They are plain frozen dataclasses so they pickle cheaply and
compare by value in tests.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Union


@dataclass(frozen=True)
class StopTraining:
    """Stop after the current step (batch hooks) or epoch (epoch hooks).

    Args:
        reason: Short machine-readable reason, e.g. ``"early_stopping"``.
        source: Name of the callback that decided.
    """

    reason: str = "requested"
    source: str = ""


@dataclass(frozen=True)
class SetLearningRate:
    """Set the learning rate of every optimizer param group on every rank.

    Args:
        value: The new learning rate.
        source: Name of the callback that decided.
    """

    value: float
    source: str = ""


@dataclass(frozen=True)
class SnapshotWeights:
    """Every rank keeps a CPU copy of the current model weights under ``key``."""

    key: str


@dataclass(frozen=True)
class RestoreWeights:
    """Every rank loads the weights it kept under ``key`` (see :class:`SnapshotWeights`)."""

    key: str


@dataclass(frozen=True)
class SaveModel:
    """Rank 0 writes the model's ``state_dict`` with ``torch.save`` to ``filepath``.

    Args:
        filepath: An fsspec URL, or a path relative to ``<run>/checkpoints/``.
        weights_only: Save only the model's weights; otherwise also the optimizer state, as
            ``{"model": ..., "optimizer": ..., "epoch": ..., "step": ...}``.
        delete: Files (same addressing) to delete after this one is written (top-k pruning).
        source: Name of the callback that decided.
    """

    filepath: str
    weights_only: bool = True
    delete: tuple[str, ...] = ()
    source: str = ""


@dataclass(frozen=True)
class Backup:
    """Every rank saves the full training state; the coordinator commits it when all are durable.

    A callback leaves ``backup_dir`` and ``keep`` as ``None`` to use the run's backup policy (the
    folder and count of :class:`~orchestrator.callbacks.BackupAndRestore`, ``"backup"`` and 1
    without it); the coordinator fills them in before the decision reaches the ranks, so a rank
    always receives both set.

    Args:
        backup_dir: Where ``step-<N>/`` folders go (URL or path relative to the run directory);
            ``None`` means the run's backup folder. Defaults to ``None``.
        keep: How many committed backups to keep after a commit; ``None`` means the run's policy.
            Defaults to ``None``.
        coordinator_state: Filled in by the coordinator: its own and every callback's state as of
            this sync point (callbacks return ``Backup`` without it).
        source: Name of the callback that decided.
        write: Filled in by the coordinator: this save's number, which every rank passes back
            with its files, so reports of an earlier save of the same folder are never mixed in.

    Example:
        >>> Backup(source="RollbackOnNaN").backup_dir is None
        True
    """

    backup_dir: str | None = None
    keep: int | None = None
    coordinator_state: dict | None = None
    source: str = ""
    write: int = 0


@dataclass(frozen=True)
class SkipBatches:
    """Every rank skips these ``(epoch, batch)`` positions (no forward, no update) from now on."""

    batches: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Rollback:
    """Every rank reloads the newest committed backup in place and continues from it.

    Args:
        lr_factor: Multiply the learning rate after reloading; ``None`` keeps the saved rate.
        folder: Filled in by the coordinator: the committed backup folder to reload.
        source: Name of the callback that decided.
    """

    lr_factor: float | None = None
    folder: str | None = None
    source: str = ""


Decision = Union[StopTraining, SetLearningRate, SnapshotWeights, RestoreWeights, SaveModel, Backup, SkipBatches,
                 Rollback]
DECISION_TYPES = (StopTraining, SetLearningRate, SnapshotWeights, RestoreWeights, SaveModel, Backup, SkipBatches,
                  Rollback)


def as_decisions(value: object, source: str = "") -> list[Decision]:
    """Normalise a hook's return value (None, one Decision, or an iterable) to a list.

    Raises:
        TypeError: when the hook returned something that is not a Decision.
    """
    if value is None:
        return []
    if isinstance(value, DECISION_TYPES):
        return [value]
    if isinstance(value, (list, tuple)) or isinstance(value, Iterable) and not isinstance(value, (str, bytes, dict)):
        out: list[Decision] = []
        for item in value:
            out.extend(as_decisions(item, source))
        return out
    raise TypeError(
        f"callback {source or '?'} returned {value!r}; a hook returns None, a Decision "
        "(orchestrator.decisions.StopTraining, SetLearningRate, SnapshotWeights, RestoreWeights) "
        "or a list of them"
    )


def stops(decisions: Iterable[Decision]) -> bool:
    """True when any decision in the list stops training."""
    return any(isinstance(d, StopTraining) for d in decisions)


class ReportKind(enum.StrEnum):
    """The sync point a :class:`Report` belongs to (each has its own handler on the coordinator)."""

    TRAIN_BEGIN = "train_begin"
    EPOCH_BEGIN = "epoch_begin"
    BATCH_END = "batch_end"
    EPOCH_END = "epoch_end"
    TRAIN_END = "train_end"


@dataclass(frozen=True)
class Report:
    """What a rank sends to the coordinator at a sync point.

    Args:
        kind: The sync point (a :class:`ReportKind`; its string value is accepted too).
        epoch: 0-based epoch.
        step: 0-based batch index within the epoch (``-1`` when not applicable).
        train: Sums of training metrics so far this epoch (``metrics.PhaseSums``).
        val: Sums of validation metrics for this epoch, if any.
        learning_rate: The rank's optimizer learning rate (param group 0).
        nonfinite: A non-finite loss or gradient was seen on some rank at this step (the update was not applied).
        steps_per_epoch: Batches per epoch on every rank.
        global_step: Batches run since the start of training.
        preempted: Some rank received a preemption notice before this step.
        epoch_ends: Some rank's stream has no batch after this step: the epoch ends here, however
            many steps ``steps_per_epoch`` promised (so no ``on_train_batch_begin`` for a next step).
        layout: At ``train_begin``: what this rank's position means (``batch_size``, ``seed``,
            ``world_size``, ``samples`` in its training set, ``parameters``: name -> shape), which
            the coordinator compares across ranks and with the backup it resumes from.
    """

    kind: ReportKind
    epoch: int = 0
    step: int = -1
    train: object | None = None
    val: object | None = None
    learning_rate: float = 0.0
    nonfinite: bool = False
    steps_per_epoch: int = 0
    global_step: int = 0
    preempted: bool = False
    epoch_ends: bool = False
    layout: dict | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ReportKind(self.kind))  # ValueError for an unknown kind
