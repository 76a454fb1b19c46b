"""The one vocabulary of events: every type, its fields, and whether it goes to ``events.jsonl``.

The coordinator emits events as it handles reports; the driver's attempt and controller emit the
lifecycle ones; :mod:`orchestrator.storage.run_files` writes the persisted ones to
``<run>/events.jsonl``; ``orchestrator status`` and the docs read them. Every line of
``events.jsonl`` carries ``time``, ``attempt``, ``epoch``, ``step``, ``type`` and ``owner`` (the
run-lease token of the driver that wrote it); the fields below come on top.

Example:
    >>> EventType.LR_CHANGED.value, EventType.LR_CHANGED.persisted
    ('lr_changed', True)
    >>> stop_event_type("early_stopping")
    <EventType.EARLY_STOPPING: 'early_stopping'>
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class _Spec:
    value: str
    fields: tuple[str, ...]
    persisted: bool
    doc: str


# What a decision's event carries besides ``time``/``epoch``/``step``: the decision's own values, then
# the values that caused it (from the deciding callback's ``details``; undeclared names go under
# ``details``). ``epoch`` and ``step`` of a decision event are the epoch and the 0-based batch in it
# (``-1`` at epoch sync points); ``global_step`` counts steps from the start of training, the
# numbering of backup folders (``step-<N>``).
_STOP_FIELDS = ("reason", "source", "global_step", "details")
_EARLY_STOPPING_FIELDS = ("monitor", "value", "best", "best_epoch", "wait", "patience", "min_delta", "mode",
                          "baseline")
_NAN_FIELDS = ("monitor", "value", "rollbacks", "max_rollbacks")
_LR_FIELDS = ("value", "source", "old", "new", "global_step", "monitor", "monitor_value", "best", "wait",
              "patience", "factor", "min_lr", "details")
_ROLLBACK_FIELDS = ("folder", "skip", "source", "bad_step", "target_step", "lr_factor", "learning_rate", "monitor",
                    "value", "rollbacks", "max_rollbacks", "details")


class EventType(enum.StrEnum):
    """An event's ``type``. A ``StrEnum``: ``EventType.STARTED == "started"`` and ``str()`` gives the value."""

    def __new__(cls, spec: _Spec) -> "EventType":
        member = str.__new__(cls, spec.value)
        member._value_ = spec.value
        member.fields = spec.fields  # type: ignore[attr-defined]
        member.persisted = spec.persisted  # type: ignore[attr-defined]
        member.doc = spec.doc  # type: ignore[attr-defined]
        return member

    # -- lifecycle (driver: controller and attempt) ------------------------------------------
    STARTED = _Spec("started", ("world_size", "nodes", "node_ids", "resumed_from", "warm", "warm_ranks"), True,
                    "an attempt's workers are up; ``resumed_from`` the backup folder it resumes from, "
                    "``memory`` after a live recovery, or null; ``warm``: every rank on a process that was "
                    "already up (parked by an earlier fit, a standby, or a survivor of a failed rank), "
                    "``warm_ranks``: the ranks that were")
    RESTORED = _Spec("restored", ("folder", "phase", "reached_step", "lost_steps"), True,
                     "an attempt resumes from a committed backup; ``step`` is the backup's global step, "
                     "``reached_step`` the highest global step the driver heard of in the attempt before "
                     "(null in a new driver), ``lost_steps`` the difference (steps to train again; a lower bound)")
    RECOVERED = _Spec("recovered", ("source", "rank", "detection_s", "secured_s", "reformed_s", "transferred_s",
                                    "first_step_s", "lost_steps"), True,
                      "a live recovery: the group was rebuilt around the survivors' state (``source`` "
                      "``memory``) at global step ``step``, after rank ``rank`` died; its timeline in seconds: "
                      "detection, survivors' state secured, group re-formed, state transferred, first step "
                      "after it; ``lost_steps`` the step in flight that was redone (0 or 1)")
    BACKUP_SKIPPED = _Spec("backup_skipped", ("reason", "folder"), True,
                           "a backup step was not trusted on resume (torn, corrupt, uncommitted), or a "
                           "backup was not taken or not committed (a non-finite step, a rollback)")
    WORKER_FAILED = _Spec("worker_failed", ("rank", "node", "cause", "role", "detection_s"), True,
                          "a rank (or the coordinator: ``role``) died, raised or hung; ``detection_s`` is the "
                          "seconds from its last sign of life the driver knew of to the driver's detection")
    NODE_DRAINING = _Spec("node_draining", ("nodes", "hosts", "deadlines_ms"), True,
                          "Ray is draining nodes of this attempt")
    PREEMPTED = _Spec("preempted", ("reason", "nodes", "lost"), True,
                      "every rank stopped at one step with an emergency backup")
    RESIZED = _Spec("resized", ("from_workers", "to_workers", "reason", "accumulate_grad_batches"), True,
                    "an elastic run (``num_workers=(min, max)``) goes on with another number of workers from "
                    "global step ``step``: ``reason`` ``placement_timeout`` (a lost worker could not be replaced "
                    "within placement_timeout_s) or ``capacity_returned`` (grown back at an epoch boundary); "
                    "``accumulate_grad_batches`` the micro-batches per step that keep the global batch")
    FINISHED = _Spec("finished", ("epochs",), True, "training ended normally (early stopping included)")
    FAILED = _Spec("failed", ("error",), True, "training ended with an error")
    # -- decisions and their effects (coordinator) -------------------------------------------
    LR_CHANGED = _Spec("lr_changed", _LR_FIELDS, True,
                       "a callback set the learning rate: ``value`` and ``new`` the new rate, ``old`` the rate "
                       "before; ReduceLROnPlateau adds what caused it")
    NAN_DETECTED = _Spec("nan_detected", ("global_step",), True,
                         "a rank saw a non-finite loss or gradient at this step (its update was not applied)")
    EARLY_STOPPING = _Spec("early_stopping", _STOP_FIELDS + _EARLY_STOPPING_FIELDS, True,
                           "EarlyStopping stopped training, with its state at that moment")
    TERMINATED_ON_NAN = _Spec("terminated_on_nan", _STOP_FIELDS + _NAN_FIELDS, True,
                              "TerminateOnNaN (or RollbackOnNaN past its budget) stopped training")
    STOPPED = _Spec("stopped", _STOP_FIELDS + ("monitor", "value"), True, "another callback stopped training")
    ROLLED_BACK = _Spec("rolled_back", _ROLLBACK_FIELDS, True,
                        "every rank reloaded the newest committed backup after a non-finite loss: ``bad_step`` "
                        "the global step that went non-finite, ``target_step`` the backup's global step")
    CHECKPOINT_SAVED = _Spec("checkpoint_saved", ("path",), True, "ModelCheckpoint wrote a file")
    BACKUP_COMMITTED = _Spec("backup_committed", ("folder", "bytes", "purged", "stall_s", "persist_s"), True,
                             "every rank's files of a backup were durable and its manifest was written; stall_s: the "
                             "longest a rank's training stood still for it (waiting for the previous "
                             "persist, copying to CPU); persist_s: the coordinator's decision to the commit")
    BACKUP_INTERVAL = _Spec("backup_interval", ("steps", "seconds", "optimum_s", "cost_s", "persist_s", "mtbf_s",
                                                "step_s", "bound", "failures", "source", "global_step", "details"),
                            True,
                            "BackupAndRestore(save_freq=\"auto\") set its interval: ``steps`` between backups "
                            "(``seconds`` after the bounds), from ``optimum_s`` = sqrt(2 * cost_s * mtbf_s) (Young/"
                            "Daly), the backup stall ``cost_s``, persist time ``persist_s``, ``mtbf_s`` (configured "
                            "or observed over ``failures``) and ``step_s``; ``bound``: min, persist, max, no_cost")
    BACKUP_FAILED = _Spec("backup_failed", ("rank", "folder", "error"), True, "a rank could not write a backup")
    EPOCH_END = _Spec("epoch_end", ("logs", "global_step"), True, "the epoch's cluster-wide logs")
    WARNING = _Spec("warning", ("message", "category"), True, "a callback warned (re-issued on the driver)")
    # -- in memory only (driver display) -----------------------------------------------------
    TRAIN_BEGIN = _Spec("train_begin", ("steps", "global_step", "initial_step"), False,
                        "on_train_begin ran; ``epoch`` is the epoch the ranks continue in and ``initial_step`` "
                        "the steps of it already done (0 unless resumed mid-epoch)")
    EPOCH_BEGIN = _Spec("epoch_begin", ("global_step",), False, "on_epoch_begin ran")
    BATCH_END = _Spec("batch_end", ("logs", "global_step"), False, "a batch sync point's logs")
    PROGRESS = _Spec("progress", ("logs", "global_step"), False, "rank 0's running loss, about once a second")
    TRAIN_END = _Spec("train_end", ("logs",), False, "on_train_end ran")
    STOP = _Spec("stop", tuple(dict.fromkeys(_STOP_FIELDS + _EARLY_STOPPING_FIELDS + _NAN_FIELDS)), False,
                 "a StopTraining decision; written to events.jsonl as early_stopping, terminated_on_nan or stopped")

#: Keys every event carries besides its own fields (``attempt`` and ``owner`` are added when it is written to events.jsonl).
COMMON_FIELDS: frozenset[str] = frozenset({"time", "attempt", "epoch", "step", "type", "owner"})


def undeclared_fields(kind: EventType, fields: Iterable[str]) -> list[str]:
    """The names in ``fields`` that are neither common keys nor declared for ``kind``, sorted.

    Example:
        >>> undeclared_fields(EventType.LR_CHANGED, ["value", "source", "epoch", "old", "colour"])
        ['colour']
    """
    return sorted(set(fields) - COMMON_FIELDS - set(kind.fields))


# A StopTraining decision's reason -> the type written to events.jsonl.
_STOP_TYPES = {"early_stopping": EventType.EARLY_STOPPING, "nan_detected": EventType.TERMINATED_ON_NAN}


def stop_event_type(reason: str) -> EventType:
    """The persisted type of a ``stop`` event with this reason."""
    return _STOP_TYPES.get(reason, EventType.STOPPED)


def event_type(value: str) -> EventType | None:
    """The member for a ``type`` string, or None for a type this version does not know."""
    try:
        return EventType(value)
    except ValueError:
        return None
