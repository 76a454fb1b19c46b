"""Elastic world size, the driver's part: shrink when a lost worker cannot be replaced, grow back (no torch).

With ``num_workers=(min, max)`` (see :class:`~orchestrator.core.config.ScalingConfig`):

- **Shrink.** After a rank's death the next attempt asks its worker group for as many workers as
  before; when the cluster does not grant them within ``placement_timeout_s`` (a lost node, no
  replacement), the group goes on with the largest allowed world size it can place, at least
  ``min`` (:meth:`~orchestrator.cluster.worker_group.WorkerGroup.start`), from the survivors' state
  (a live recovery) or the newest committed backup. Below ``min``: the attempt fails as before,
  with an error saying what could not be placed.
- **Grow back.** While an attempt runs on fewer than ``max`` workers, :class:`GrowWatch` looks at
  the cluster's free resources once per epoch end (never per step); when more workers fit, the
  ranks are asked to stop with an emergency backup at the next step boundary (the preemption path)
  and the attempt ends with :class:`Resized`: the controller starts the next attempt on more
  workers, not counting a failure.

Either way the attempt that starts on another number of workers records a ``resized`` event
(:func:`resize_event`). The global batch, the step count and the samples of every step stay the
same (see :class:`~orchestrator.loop.data.ShardSampler`).

Example:
    >>> resize_event(before=2, after=1, accumulate=1, max_workers=2)
    {'from_workers': 2, 'to_workers': 1, 'reason': 'placement_timeout', 'accumulate_grad_batches': 2}
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["GrowWatch", "Resized", "resize_event"]


class Resized(Exception):
    """The ranks of an elastic attempt stopped at one step with an emergency backup so that the next
    attempt runs on more workers: not a failure.

    Args:
        to_workers: The world size the next attempt asks for.
        step: The global step of the emergency backup.
    """

    def __init__(self, to_workers: int, step: int | None) -> None:
        super().__init__(f"growing to {to_workers} workers at step {step}")
        self.to_workers = to_workers
        self.step = step


class GrowWatch:
    """Checks, once per epoch end of an elastic attempt on fewer than ``max`` workers, whether more fit.

    Args:
        group: The attempt's worker group (``can_grow()``: a look at the cluster's free resources).
        enabled: Whether to look at all (an elastic run below ``max``).

    Example:
        >>> watch = GrowWatch(group=None, enabled=False)
        >>> watch.check(epoch_ends=3), watch.target
        (False, None)
    """

    def __init__(self, group: Any, enabled: bool) -> None:
        self.group = group
        self.enabled = enabled
        self.target: int | None = None  # set once the ranks were asked to stop for a grow
        self._seen = 0

    def check(self, epoch_ends: int) -> bool:
        """Whether to ask the ranks to stop now: a new epoch end since the last look, and more workers fit."""
        if not self.enabled or self.target is not None or epoch_ends <= self._seen:
            return False
        self._seen = epoch_ends
        target = self.group.can_grow()
        if target is None:
            return False
        logger.warning("elastic run: resources for %d workers are free again; growing from %d at the next step "
                       "boundary (an emergency backup, then a new attempt)", target, self.group.world_size)
        self.target = target
        return True


def resize_event(before: int, after: int, accumulate: int, max_workers: int) -> dict[str, Any]:
    """The fields of a ``resized`` event for an attempt on ``after`` workers resuming ``before``'s state."""
    return {"from_workers": before, "to_workers": after,
            "reason": "placement_timeout" if after < before else "capacity_returned",
            "accumulate_grad_batches": accumulate * (max_workers // after)}
