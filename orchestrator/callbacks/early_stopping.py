"""Stop training when a monitored quantity has stopped improving (Keras 3 ``EarlyStopping``)."""

from __future__ import annotations

import numbers
import operator
from typing import Any

from orchestrator.callbacks.monitor import MonitorCallback
from orchestrator.decisions import Decision, RestoreWeights, SnapshotWeights, StopTraining


class EarlyStopping(MonitorCallback):
    """Stop training when a monitored quantity has stopped improving.

    Runs once for the whole cluster on aggregated logs. At the end of every epoch it counts the
    epochs without improvement and, once ``patience`` is exhausted, returns a
    :class:`~orchestrator.decisions.StopTraining` that every rank applies at the same epoch.

    Args:
        monitor: Quantity to be monitored. Defaults to ``"val_loss"``.
        min_delta: Minimum change in the monitored quantity to qualify as an improvement; an
            absolute change of less than ``min_delta`` counts as no improvement. Defaults to ``0``.
        patience: Number of epochs with no improvement after which training is stopped.
            Defaults to ``0``.
        verbose: ``0`` is silent, ``1`` prints a message when the callback acts. Defaults to ``0``.
        mode: One of ``{"auto", "min", "max"}``; ``"auto"`` infers the direction from the metric
            name (unknown metrics raise ValueError before training starts). Defaults to ``"auto"``.
        baseline: Baseline value for the monitored quantity. If not ``None``, training stops when
            the model shows no improvement over the baseline within ``patience`` epochs: an epoch
            that improves on the best so far restarts the count only if it also beats the
            baseline. The baseline is not the initial best: as in Keras, the first monitored value
            is always the best so far (even NaN or inf; nothing improves on a NaN, so a NaN first
            value stops training after ``patience`` more epochs). Defaults to ``None``.
        restore_best_weights: Whether to restore the weights of the epoch with the best monitored
            value at the end of training (also when training was not stopped early, as Keras
            does). Every rank keeps a CPU copy of the best weights, under :attr:`weights_key`,
            one per EarlyStopping instance. Defaults to ``False``.
        start_from_epoch: Number of warm-up epochs during which nothing is monitored.
            Defaults to ``0``.

    Improvements are compared in float32, as Keras does (see
    :class:`~orchestrator.callbacks.monitor.MonitorCallback`). The stop's ``early_stopping`` event
    in ``events.jsonl`` carries the values that caused it (:meth:`stop_details`).

    Example:
        >>> stopper = EarlyStopping(monitor="loss", patience=3)
        >>> # Trainer(..., callbacks=[stopper]).fit(epochs=20) stops after three
        >>> # epochs without a lower cluster-wide loss.
    """

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0, patience: int = 0,
                 verbose: int = 0, mode: str = "auto", baseline: float | None = None,
                 restore_best_weights: bool = False, start_from_epoch: int = 0) -> None:
        super().__init__(monitor=monitor, mode=mode, baseline=None, min_delta=min_delta)
        if not isinstance(patience, numbers.Integral) or patience < 0:
            raise ValueError(f"EarlyStopping: patience must be an integer >= 0, got {patience!r}")
        if not isinstance(start_from_epoch, numbers.Integral) or start_from_epoch < 0:
            raise ValueError(
                f"EarlyStopping: start_from_epoch must be an integer >= 0, got {start_from_epoch!r}"
            )
        self.patience = patience
        self.verbose = verbose
        self.baseline = baseline
        self.restore_best_weights = bool(restore_best_weights)
        self.start_from_epoch = start_from_epoch
        self.wait = 0
        self.stopped_epoch = 0
        self.best_epoch = 0
        self.has_best_weights = False

    @property
    def weights_key(self) -> str:
        """Key under which every rank keeps this instance's best weights.

        Built from the monitor and the callback's :attr:`~orchestrator.callbacks.Callback.position`
        in its :class:`~orchestrator.callbacks.CallbackList`, so that two instances never share
        weights and a resumed attempt built from the same callbacks finds the weights its backup holds.
        """
        at = "" if self.position is None else f"@{self.position}"
        return f"EarlyStopping{at}[{self.monitor}]"

    def on_train_begin(self, logs: dict | None = None) -> None:
        # Allow an instance to be reused across fits, as Keras does; `best` is None so that the
        # first monitored value becomes the best (a resume loads its state after this hook).
        self.wait = 0
        self.stopped_epoch = 0
        self.best_epoch = 0
        self.has_best_weights = False
        self.best = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> list[Decision] | None:
        if self.monitor_op is None:
            self._set_monitor_op()
        current = self.get_monitor_value(logs, "Early stopping")
        if current is None or epoch < self.start_from_epoch:
            return None
        decisions: list[Decision] = []
        if self.restore_best_weights and not self.has_best_weights:
            # Nothing kept yet: the current weights are the best so far.
            decisions.append(self._snapshot())
            self.best_epoch = epoch

        self.wait += 1
        if self._is_improvement(current, self.best):
            self.best = current
            self.best_epoch = epoch
            if self.restore_best_weights and not decisions:
                decisions.append(self._snapshot())
            # Restart the count only when both the best so far and the baseline are beaten.
            if self.baseline is None or self._is_improvement(current, self.baseline):
                self.wait = 0
            return decisions or None

        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            decisions.append(StopTraining(reason="early_stopping", source="EarlyStopping",
                                          details=self.stop_details(current)))
        return decisions or None

    def stop_details(self, current: float) -> dict[str, Any]:
        """What a stop decided now records in its ``early_stopping`` event: the monitor, its
        ``value`` this epoch, the ``best`` so far and its ``best_epoch``, ``wait`` and ``patience``,
        ``min_delta`` (absolute), the resolved ``mode`` (``"min"`` or ``"max"``) and ``baseline``.

        Example:
            >>> stopper = EarlyStopping(monitor="loss", patience=2)
            >>> stopper.validate({"metric_directions": {"loss": "min"}})
            >>> stopper.stop_details(0.5)["mode"]
            'min'
        """
        return {"monitor": self.monitor, "value": float(current),
                "best": None if self.best is None else float(self.best), "best_epoch": self.best_epoch,
                "wait": self.wait, "patience": self.patience, "min_delta": abs(float(self.min_delta)),
                "mode": "min" if self.monitor_op is operator.lt else "max",
                "baseline": None if self.baseline is None else float(self.baseline)}

    def on_train_end(self, logs: dict | None = None) -> RestoreWeights | None:
        if self.stopped_epoch > 0 and self.verbose > 0:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.has_best_weights:
            if self.verbose > 0:
                print(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
            return RestoreWeights(key=self.weights_key)
        return None

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "has_best_weights": self.has_best_weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wait = int(state.get("wait", self.wait))
        self.stopped_epoch = int(state.get("stopped_epoch", self.stopped_epoch))
        self.best = state.get("best", self.best)
        self.best_epoch = int(state.get("best_epoch", self.best_epoch))
        self.has_best_weights = bool(state.get("has_best_weights", self.has_best_weights))

    # -- helpers -----------------------------------------------------------------------------
    def _snapshot(self) -> SnapshotWeights:
        self.has_best_weights = True
        return SnapshotWeights(key=self.weights_key)
