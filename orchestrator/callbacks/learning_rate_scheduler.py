"""Set the learning rate from a schedule function each epoch (Keras 3 ``LearningRateScheduler``)."""

from __future__ import annotations

import sys
from typing import Any, Callable

from orchestrator.callbacks.base import Callback
from orchestrator.decisions import SetLearningRate


def _is_float(value: Any) -> bool:
    """True for Python floats and numpy floating scalars (ints and bools are rejected, as in Keras)."""
    if isinstance(value, float):
        return True
    np = sys.modules.get("numpy")  # only already-imported numpy can have produced a numpy float
    return np is not None and isinstance(value, np.floating)


class LearningRateScheduler(Callback):
    """Learning rate scheduler.

    At the beginning of every epoch this callback calls ``schedule`` with the 0-based epoch
    index and the current learning rate and returns a
    :class:`~orchestrator.decisions.SetLearningRate` with the result, which every rank applies
    before the epoch's first step. A one-argument ``schedule(epoch)`` is also accepted. Each
    decision's ``lr_changed`` event in ``events.jsonl`` carries the ``old`` and ``new`` rates.

    Args:
        schedule: A function taking the epoch index (int, from 0) and the current learning rate
            (float) and returning the new learning rate (float).
        verbose: ``0`` is quiet, ``1`` prints update messages. Defaults to ``0``.

    Example:
        >>> import math
        >>> def scheduler(epoch, lr):
        ...     return lr if epoch < 10 else lr * math.exp(-0.1)
        >>> callback = LearningRateScheduler(scheduler)
        >>> # Trainer(..., callbacks=[callback]).fit(epochs=15)
    """

    def __init__(self, schedule: Callable[..., float], verbose: int = 0) -> None:
        super().__init__()
        if not callable(schedule):
            raise ValueError(
                f"LearningRateScheduler: schedule must be callable as schedule(epoch, lr) or "
                f"schedule(epoch), got {schedule!r}"
            )
        self.schedule = schedule
        self.verbose = verbose

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> SetLearningRate:
        """Compute this epoch's learning rate.

        Raises:
            ValueError: If ``schedule`` returns something other than a float.
        """
        old = float(self.trainer.learning_rate)
        try:
            learning_rate = self.schedule(epoch, old)
        except TypeError:  # the one-argument form, as Keras accepts it
            learning_rate = self.schedule(epoch)
        if not _is_float(learning_rate):
            raise ValueError(
                f"The output of the `schedule` function should be a float. Got: {learning_rate}"
            )
        learning_rate = float(learning_rate)
        if self.verbose > 0:
            print(f"\nEpoch {epoch + 1}: LearningRateScheduler setting learning rate to {learning_rate}.")
        return SetLearningRate(learning_rate, source="LearningRateScheduler", details={"old": old, "new": learning_rate})

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["learning_rate"] = float(self.trainer.learning_rate)
