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

    Args:
        callbacks: The callbacks, in the order the user gave them.
        view: The view of training the callbacks read.
    """

    def __init__(self, callbacks: Iterable[Callback], view: TrainingView | None = None) -> None:
        self.callbacks = list(callbacks)
        self.view = view or TrainingView()
        self.params: dict[str, Any] = {}
        for cb in self.callbacks:
            cb.set_trainer(self.view)

    def set_params(self, params: dict[str, Any]) -> None:
        """Give every callback the same params dict (so later updates, like ``steps``, reach all)."""
        self.params = params
        for cb in self.callbacks:
            cb.set_params(params)

    def batch_sync_every(self) -> int | None:
        """Global steps between batch-hook calls: the gcd of every callback's interval, so each
        callback is called on every step it asked for (None when none asks)."""
        freqs = [cb.batch_sync_every for cb in self.callbacks if cb.batch_sync_every]
        return math.gcd(*freqs) if freqs else None

    def call(self, hook: str, *args: Any) -> list[Decision]:
        decisions: list[Decision] = []
        for cb in self.callbacks:
            made = as_decisions(getattr(cb, hook)(*args), cb.name)
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
