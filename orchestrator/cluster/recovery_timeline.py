"""The timeline of a live recovery, completed by the new attempt's coordinator (no torch, no Ray).

The driver measures detection and securing the survivors' state (``CoordinatorSpec.recovery``);
rank 0 of the new attempt says when it joined the re-formed group and when it had received the
state; the first progress report after that is the first step after the recovery. The
coordinator then emits one ``recovered`` event with every part in seconds.

Example:
    >>> timeline = RecoveryTimeline({"step": 7, "rank": 1, "detection_s": 0.2, "secured_s": 0.1,
    ...                              "secured_at": 100.0, "lost_steps": 1})
    >>> timeline.joined(101.0, 101.5)
    >>> fields = timeline.first_step(102.0)
    >>> fields["reformed_s"], fields["transferred_s"], fields["first_step_s"], fields["source"]
    (1.0, 0.5, 0.5, 'memory')
    >>> timeline.first_step(103.0) is None  # once
    True
"""

from __future__ import annotations

from typing import Any


class RecoveryTimeline:
    """One live recovery's timeline (see the module).

    Args:
        recovery: The driver's part: ``step``, ``rank``, ``detection_s``, ``secured_s``,
            ``secured_at`` (wall-clock time) and ``lost_steps``.
    """

    def __init__(self, recovery: dict[str, Any]) -> None:
        self.recovery = dict(recovery)
        self.joined_at: float | None = None
        self.transferred_at: float | None = None
        self.done = False

    def joined(self, joined_at: float, transferred_at: float) -> None:
        """Rank 0's wall-clock times: in the re-formed group, and with the survivors' state received."""
        self.joined_at, self.transferred_at = joined_at, transferred_at

    def first_step(self, now: float) -> dict[str, Any] | None:
        """The ``recovered`` event's fields at the first step after the recovery (once), else None."""
        if self.done:
            return None
        self.done = True
        r = self.recovery

        def span(start: float | None, end: float | None) -> float | None:
            return None if start is None or end is None else round(max(end - start, 0.0), 3)

        return {"source": "memory", "rank": r.get("rank"), "step": r.get("step"),
                "detection_s": r.get("detection_s"), "secured_s": r.get("secured_s"),
                "reformed_s": span(r.get("secured_at"), self.joined_at),
                "transferred_s": span(self.joined_at, self.transferred_at),
                "first_step_s": span(self.transferred_at if self.transferred_at is not None else self.joined_at, now),
                "lost_steps": r.get("lost_steps")}
