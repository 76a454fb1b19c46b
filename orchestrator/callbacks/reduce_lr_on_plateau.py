"""Reduce the learning rate when a metric has stopped improving (Keras 3 ``ReduceLROnPlateau``)."""

from __future__ import annotations

import numbers
import warnings
from typing import Any

from orchestrator.callbacks.monitor import MonitorCallback, to_float32
from orchestrator.decisions import SetLearningRate


class ReduceLROnPlateau(MonitorCallback):
    """Reduce the learning rate when a metric has stopped improving.

    Models often benefit from reducing the learning rate by a factor of 2-10 once learning
    stagnates. After ``patience`` epochs without improvement of the cluster-wide monitored
    value, this callback returns a :class:`~orchestrator.decisions.SetLearningRate` that every
    rank applies before the next epoch.

    Args:
        monitor: Quantity to be monitored. Defaults to ``"val_loss"``.
        factor: Factor by which the learning rate is reduced, ``new_lr = lr * factor``; must be
            in ``[0, 1)``. Defaults to ``0.1``.
        patience: Number of epochs with no improvement after which the learning rate is
            reduced. Defaults to ``10``.
        verbose: ``0`` is quiet, ``1`` prints update messages. Defaults to ``0``.
        mode: One of ``{"auto", "min", "max"}``; ``"auto"`` infers the direction from the metric
            name (unknown metrics raise ValueError before training starts). Defaults to ``"auto"``.
        min_delta: Threshold for measuring the new optimum, to only focus on significant
            changes. Defaults to ``1e-4``.
        cooldown: Number of epochs to wait before resuming normal operation after the learning
            rate has been reduced. Defaults to ``0``.
        min_lr: Lower bound on the learning rate. Defaults to ``0.0``.
        **kwargs: Accepted for Keras compatibility and ignored (with a warning).

    As in Keras, every ``on_train_begin`` resets the best value and the counters, so a second
    ``fit`` with the same instance starts fresh; the first monitored value then becomes the best
    (even NaN or inf). A resumed attempt loads the backed-up state after that reset, so a resume
    continues where the backup left off. Improvements are compared in float32, as Keras does (see
    :class:`~orchestrator.callbacks.monitor.MonitorCallback`).

    Each reduction's ``lr_changed`` event in ``events.jsonl`` carries what caused it: ``old`` and
    ``new`` rates, the ``monitor`` and its ``monitor_value`` this epoch, the ``best`` so far,
    ``wait`` (epochs without improvement, before the reset) and ``patience``, ``factor`` and ``min_lr``.

    Example:
        >>> reduce_lr = ReduceLROnPlateau(monitor="val_loss", factor=0.2, patience=5, min_lr=0.001)
        >>> # Trainer(..., callbacks=[reduce_lr]).fit(epochs=50)
    """

    def __init__(self, monitor: str = "val_loss", factor: float = 0.1, patience: int = 10,
                 verbose: int = 0, mode: str = "auto", min_delta: float = 1e-4, cooldown: int = 0,
                 min_lr: float = 0.0, **kwargs: Any) -> None:
        super().__init__(monitor=monitor, mode=mode, baseline=None, min_delta=min_delta)
        if factor >= 1.0:
            raise ValueError(
                f"ReduceLROnPlateau does not support a factor >= 1.0. Received factor={factor}"
            )
        if factor < 0:
            raise ValueError(f"ReduceLROnPlateau: factor must be >= 0. Received factor={factor}")
        if not isinstance(patience, numbers.Integral) or patience < 0:
            raise ValueError(f"ReduceLROnPlateau: patience must be an integer >= 0, got {patience!r}")
        if not isinstance(cooldown, numbers.Integral) or cooldown < 0:
            raise ValueError(f"ReduceLROnPlateau: cooldown must be an integer >= 0, got {cooldown!r}")
        if min_lr < 0:
            raise ValueError(f"ReduceLROnPlateau: min_lr must be >= 0, got {min_lr!r}")
        if kwargs:
            warnings.warn(f"ReduceLROnPlateau ignores the arguments {sorted(kwargs)}", stacklevel=2)
        self.factor = factor
        self.min_lr = min_lr
        self.patience = patience
        self.verbose = verbose
        self.cooldown = cooldown
        self.cooldown_counter = 0
        self.wait = 0

    def _reset(self) -> None:
        """Reset the wait counter, the cooldown counter and the best value (Keras 3's ``_reset``)."""
        self.best = None
        self.cooldown_counter = 0
        self.wait = 0

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._reset()

    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> SetLearningRate | None:
        if self.monitor_op is None:
            self._set_monitor_op()
        if logs is None:
            logs = {}
        # The rate this epoch ran with, before any reduction decided below.
        logs["learning_rate"] = float(self.trainer.learning_rate)
        current = self.get_monitor_value(logs, "Learning rate reduction is", end=".")
        if current is None:
            return None

        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0
        if self._is_improvement(current, self.best):
            self.best = current
            self.wait = 0
            return None
        if self.in_cooldown():
            return None
        self.wait += 1
        if self.wait < self.patience:
            return None
        old_lr = float(self.trainer.learning_rate)
        # Keras keeps the rate in float32; compare both sides at that precision so a rate that
        # already sits at ``min_lr`` is not "reduced" again.
        if to_float32(old_lr) <= to_float32(self.min_lr):
            return None
        new_lr = max(old_lr * self.factor, self.min_lr)
        if self.verbose > 0:
            print(f"\nEpoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {new_lr}.")
        details = {"old": old_lr, "new": new_lr, "monitor": self.monitor, "monitor_value": float(current),
                   "best": None if self.best is None else float(self.best), "wait": self.wait,
                   "patience": self.patience, "factor": float(self.factor), "min_lr": float(self.min_lr)}
        self.cooldown_counter = self.cooldown
        self.wait = 0
        return SetLearningRate(new_lr, source="ReduceLROnPlateau", details=details)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"wait": self.wait, "cooldown_counter": self.cooldown_counter, "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait = int(state.get("wait", self.wait))
        self.cooldown_counter = int(state.get("cooldown_counter", self.cooldown_counter))
        self.best = state.get("best", self.best)
