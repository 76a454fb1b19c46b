"""What the coordinator's events carry: a decision's fields and causes, and where the ranks are.

:func:`decision_event` turns a decision into the fields of its event (the decision's own values,
then the ``details`` its callback gave: names declared for the event type at the top level, others
under ``details``). :class:`Position` follows where the ranks are between sync points, so that
progress events carry a global step and a resumed attempt tells the driver's progress bar where
the epoch resumes. No torch, no Ray.

Example:
    >>> from orchestrator.decisions import StopTraining
    >>> kind, fields = decision_event(StopTraining("early_stopping", "EarlyStopping",
    ...                                            details={"monitor": "loss", "value": 0.5, "colour": "red"}))
    >>> kind.value, fields["monitor"], fields["details"]
    ('stop', 'loss', {'colour': 'red'})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from orchestrator.core.events import EventType, stop_event_type
from orchestrator.decisions import BackupInterval, SaveModel, SetLearningRate, StopTraining

__all__ = ["Position", "decision_event", "with_details"]


def with_details(kind: EventType, fields: dict[str, Any], details: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` plus ``details``: the names ``kind`` declares at the top level (never replacing a
    field already set), the others under ``details``.

    Example:
        >>> with_details(EventType.LR_CHANGED, {"value": 0.1}, {"old": 0.2, "value": 9.0, "x": 1})
        {'value': 0.1, 'old': 0.2, 'details': {'x': 1}}
    """
    out = dict(fields)
    rest: dict[str, Any] = {}
    for key, value in details.items():
        if key in kind.fields and key != "details":
            out.setdefault(key, value)
        elif key not in out:
            rest[key] = value
    if rest:
        out["details"] = rest
    return out


def decision_event(decision: Any, *, learning_rate: float | None = None,
                   global_step: int | None = None) -> tuple[EventType, dict[str, Any]] | None:
    """The event (type and fields, ``epoch``/``step`` aside) that records ``decision``, or None.

    Args:
        decision: A :class:`~orchestrator.decisions.SaveModel`, :class:`StopTraining`,
            :class:`SetLearningRate` or :class:`BackupInterval` (others have no event of their own here).
        learning_rate: The rate before a ``SetLearningRate`` (its event's ``old`` unless the
            callback gave one).
        global_step: Steps since the start of training at this sync point.
    """
    if isinstance(decision, BackupInterval):
        return EventType.BACKUP_INTERVAL, with_details(
            EventType.BACKUP_INTERVAL, {"steps": decision.steps, "source": decision.source,
                                        "global_step": global_step}, decision.details)
    if isinstance(decision, SaveModel):
        return EventType.CHECKPOINT_SAVED, {"path": decision.filepath}
    if isinstance(decision, StopTraining):
        persisted = stop_event_type(decision.reason)  # its details are split by the type written to events.jsonl
        fields = with_details(persisted, {"reason": decision.reason, "source": decision.source,
                                          "global_step": global_step}, decision.details)
        return EventType.STOP, fields
    if isinstance(decision, SetLearningRate):
        fields = {"value": decision.value, "source": decision.source, "new": decision.value,
                  "global_step": global_step}
        if "old" not in decision.details and learning_rate is not None:
            fields["old"] = float(learning_rate)
        return EventType.LR_CHANGED, with_details(EventType.LR_CHANGED, fields, decision.details)
    return None


@dataclass
class Position:
    """Where the ranks are, as of the latest sync point: ``done`` steps of ``epoch`` are trained,
    ``global_step`` steps since the start of training.

    Kept in the coordinator's state (so a backup knows where its epoch resumes) and moved at every
    sync point; between them, rank 0's progress reports give the in-epoch step, from which
    :meth:`global_at` counts.

    Example:
        >>> at = Position(epoch=2, done=3, global_step=23)
        >>> at.global_at(2, 6), at.global_at(3, 0)
        (27, None)
    """

    epoch: int = 0
    done: int = 0
    global_step: int = 0

    def move(self, epoch: int, done: int, global_step: int) -> None:
        self.epoch, self.done, self.global_step = epoch, done, global_step

    def global_at(self, epoch: int, step: int) -> int | None:
        """The global step once batch ``step`` (0-based) of ``epoch`` is trained; None for another
        epoch, or when the position in the epoch is not known (``done`` is ``-1``)."""
        if epoch != self.epoch or self.done < 0 or step + 1 < self.done:
            return None
        return self.global_step + step + 1 - self.done

    def state_dict(self) -> dict[str, int]:
        """What the coordinator's ``state["view"]`` keeps (its ``global_step`` is this one's)."""
        return {"next_epoch": self.epoch, "epoch_steps_done": self.done}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> "Position":
        """The position a coordinator state (``state["view"]``) was saved at; the start for None.

        In a backup written before positions were kept, the position in the epoch is not known
        (``done`` is ``-1``) until the next epoch begins.
        """
        view = (state or {}).get("view", {})
        if "next_epoch" in view:
            return cls(int(view["next_epoch"]), int(view.get("epoch_steps_done", 0)), int(view.get("global_step", 0)))
        return cls(int(view.get("epoch", 0)), -1 if state else 0, int(view.get("global_step", 0)))
