"""Decisions: values the coordinator hands to every rank.

A callback never flips a flag on a shared object. It returns one of these values from a
hook; the coordinator collects them once for the whole cluster and every rank applies the
same list at the same step. They are plain frozen dataclasses so they pickle cheaply and
compare by value in tests.
"""

from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Union

#: Longest string kept in a decision's ``details`` (longer ones are cut): events.jsonl lines stay small.
MAX_DETAIL_CHARS = 200


def plain_details(details: Mapping[str, Any] | None, owner: str = "a decision") -> dict[str, Any]:
    """``details`` as a small JSON-safe dict: str keys; values None, bool, int, float or str.

    numpy and torch scalars become Python numbers (``.item()``); strings longer than
    :data:`MAX_DETAIL_CHARS` are cut. Non-finite floats stay floats (NaN is written as ``NaN``,
    as in the epoch logs).

    Raises:
        TypeError: A key is not a string, or a value is none of the above (a list, a tensor of
            several elements...), naming the key.

    Example:
        >>> plain_details({"value": 1, "best": None, "mode": "min"})
        {'value': 1, 'best': None, 'mode': 'min'}
    """
    out: dict[str, Any] = {}
    for key, value in (details or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"{owner}: details keys must be strings, got {key!r}")
        out[key] = _plain(value, key, owner)
    return out


def _plain(value: Any, key: str, owner: str) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return value if len(value) <= MAX_DETAIL_CHARS else value[:MAX_DETAIL_CHARS - 3] + "..."
    item = getattr(value, "item", None)
    if callable(item):  # a one-element numpy array or torch tensor
        try:
            return _plain(item(), key, owner)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"{owner}: details[{key!r}] is {type(value).__name__} {value!r:.80}; details values must be "
                    "None, a bool, a number or a string (convert tensors with float(x))")


def _details_field() -> Any:
    """``details``: what caused a decision; not part of its identity (equality and hash ignore it)."""
    return field(default_factory=dict, compare=False)


class _Explained:
    """Normalises ``details`` (see :func:`plain_details`) after the dataclass ``__init__``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "details", plain_details(getattr(self, "details"), type(self).__name__))




@dataclass(frozen=True)
class StopTraining(_Explained):
    """Stop after the current step (batch hooks) or epoch (epoch hooks).

    Args:
        reason: Short machine-readable reason, e.g. ``"early_stopping"``.
        source: Name of the callback that decided.
        details: The values that caused the decision (e.g. ``monitor``, ``value``, ``best``,
            ``wait``, ``patience``), written on its event in ``events.jsonl``: names declared for the
            event type (:mod:`orchestrator.core.events`) at the top level, others under ``details``.
            Values must be None, bools, numbers or strings. Not compared: two stops are equal
            whatever their details. Defaults to ``{}``.

    Example:
        >>> StopTraining("target_reached", "MyCallback", details={"value": 0.99}).details
        {'value': 0.99}
    """

    reason: str = "requested"
    source: str = ""
    details: dict[str, Any] = _details_field()


@dataclass(frozen=True)
class SetLearningRate(_Explained):
    """Set the learning rate of every optimizer param group on every rank.

    Args:
        value: The new learning rate.
        source: Name of the callback that decided.
        details: The values that caused the decision (e.g. ``old``, ``monitor``,
            ``monitor_value``, ``best``, ``wait``, ``patience``), written on its ``lr_changed`` event
            (see :class:`StopTraining`). Not compared. Defaults to ``{}``.
    """

    value: float
    source: str = ""
    details: dict[str, Any] = _details_field()


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
class Rollback(_Explained):
    """Every rank reloads the newest committed backup in place and continues from it.

    Args:
        lr_factor: Multiply the learning rate after reloading; ``None`` keeps the saved rate.
        folder: Filled in by the coordinator: the committed backup folder to reload.
        source: Name of the callback that decided.
        details: The values that caused the decision (e.g. ``value``, ``rollbacks``,
            ``max_rollbacks``), written on its ``rolled_back`` event (see :class:`StopTraining`).
            Not compared. Defaults to ``{}``.
    """

    lr_factor: float | None = None
    folder: str | None = None
    source: str = ""
    details: dict[str, Any] = _details_field()


@dataclass(frozen=True)
class WriteHistograms:
    """Rank 0 writes a TensorBoard event file of the model's weight histograms (in the background).

    Args:
        filepath: The event file to write: a path relative to the run directory, or a URL on its
            filesystem (the callback names it so that it sorts among its other event files).
        step: The step the histograms are recorded at (Keras: the 0-based epoch).
        bins: Equal-width buckets per histogram, over the weights' [min, max]. Defaults to ``30``.
        source: Name of the callback that decided.

    Example:
        >>> WriteHistograms("logs/train/events.out.tfevents.0000000003.digits", step=2).bins
        30
    """

    filepath: str
    step: int
    bins: int = 30
    source: str = ""


@dataclass(frozen=True)
class BackupInterval(_Explained):
    """A callback's new interval between backups (``BackupAndRestore(save_freq="auto")``): recorded as a
    ``backup_interval`` event; the ranks do nothing with it (their sync points follow :class:`SyncEvery`).

    Args:
        steps: Global steps between backups from now on.
        source: Name of the callback that decided.
        details: What it was computed from (``seconds``, ``cost_s``, ``persist_s``, ``mtbf_s``,
            ``step_s``, ``bound``, ...), written on the event. Not compared. Defaults to ``{}``.

    Example:
        >>> BackupInterval(steps=400, source="BackupAndRestore", details={"cost_s": 0.02}).steps
        400
    """

    steps: int
    source: str = ""
    details: dict[str, Any] = _details_field()


@dataclass(frozen=True)
class SyncEvery:
    """Every rank reports a batch sync point every ``steps`` global steps from now on (None: only on
    non-finite losses). Made by the coordinator (never by a callback) when the callbacks'
    ``batch_sync_every`` changed, placed first in the list so every rank applies it at the same step.

    Example:
        >>> SyncEvery(steps=100).steps
        100
    """

    steps: int | None


Decision = Union[StopTraining, SetLearningRate, SnapshotWeights, RestoreWeights, SaveModel, Backup, SkipBatches,
                 Rollback, WriteHistograms, BackupInterval, SyncEvery]
DECISION_TYPES = (StopTraining, SetLearningRate, SnapshotWeights, RestoreWeights, SaveModel, Backup, SkipBatches,
                  Rollback, WriteHistograms, BackupInterval, SyncEvery)


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
