"""Run a list of callbacks once and collect their decisions in order."""

from __future__ import annotations

import math
from typing import Any, Iterable

from orchestrator.callbacks.base import Callback, TrainingView
from orchestrator.decisions import Decision, SetLearningRate, as_decisions

class CallbackList:
    """Calls each hook on every callback in order, as Keras's ``fit`` does.

    Decisions are values: each hook's return value is collected; a learning-rate decision
    also updates the shared :class:`TrainingView`, so a later callback in the same hook sees
    the new rate (as it would see ``optimizer.learning_rate`` in Keras).

    Each callback's :attr:`~orchestrator.callbacks.Callback.position` is set to its index in
    ``callbacks``; built from the same callbacks, every attempt of a run gives the same positions.

    Args:
        callbacks: The callbacks, in the order the user gave them.
        view: The view of training the callbacks read. Defaults to a new :class:`TrainingView`.

    Attributes:
        running: ``(callback name, hook name)`` while a callback's hook runs, else ``None``; read
            from another thread to name a callback that blocks (e.g. in a hang error).

    Example:
        >>> from orchestrator.callbacks import EarlyStopping
        >>> first, second = EarlyStopping(monitor="loss"), EarlyStopping(monitor="loss")
        >>> cl = CallbackList([first, second])
        >>> (first.position, second.position, cl.running)
        (0, 1, None)
    """

    def __init__(self, callbacks: Iterable[Callback], view: TrainingView | None = None) -> None:
        self.callbacks = list(callbacks)
        self.view = view or TrainingView()
        self.params: dict[str, Any] = {}
        self.running: tuple[str, str] | None = None
        for i, cb in enumerate(self.callbacks):
            cb.set_trainer(self.view)
            cb.position = i

    def set_params(self, params: dict[str, Any]) -> None:
        """Give every callback the same params dict (so later updates, like ``steps``, reach all)."""
        self.params = params
        for cb in self.callbacks:
            cb.set_params(params)

    def set_storage(self, storage: Any) -> None:
        """Give every callback the run's storage (see :meth:`Callback.set_storage`)."""
        for cb in self.callbacks:
            cb.set_storage(storage)

    def batch_sync_every(self) -> int | None:
        """Global steps between batch-hook calls: the gcd of every callback's interval, so each
        callback is called on every step it asked for (None when none asks)."""
        freqs = [cb.batch_sync_every for cb in self.callbacks if cb.batch_sync_every]
        return math.gcd(*freqs) if freqs else None

    def call(self, hook: str, *args: Any) -> list[Decision]:
        """Call ``hook`` on every callback in order; return their decisions in that order.

        Args:
            hook: The hook's name, e.g. ``"on_epoch_end"``.
            *args: Its arguments.
        """
        decisions: list[Decision] = []
        for cb in self.callbacks:
            self.running = (cb.name, hook)
            try:
                result = getattr(cb, hook)(*args)
            finally:
                self.running = None
            made = as_decisions(result, cb.name)
            for d in made:
                if isinstance(d, SetLearningRate):
                    self.view.learning_rate = float(d.value)
            decisions.extend(made)
        return decisions

    def state_dict(self) -> list[dict[str, Any]]:
        return [cb.state_dict() for cb in self.callbacks]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for cb, st in zip(self.callbacks, states):
            cb.load_state_dict(st)
