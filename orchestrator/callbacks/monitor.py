"""Shared logic for callbacks that watch one logged quantity (Keras 3 ``MonitorCallback``)."""

from __future__ import annotations

import math
import operator
import warnings
from typing import Any, Callable

from orchestrator.callbacks.base import Callback

MODES = ("auto", "min", "max")


class MonitorCallback(Callback):
    """Base for callbacks that compare a monitored value against the best seen so far.

    Args:
        monitor: Quantity to be monitored. Defaults to ``"val_loss"``.
        mode: One of ``{"auto", "min", "max"}``. In ``"auto"`` mode the direction comes from the
            run's ``params["metric_directions"]`` (built from the metric registry,
            :func:`orchestrator.core.metrics.metric_directions`): ``loss`` and the error metrics
            are minimised, ``accuracy`` (``acc``) maximised; a metric without a known direction
            raises ValueError before training starts. Defaults to ``"auto"``.
        baseline: Initial best value; ``None`` means the first value seen. Defaults to ``None``.
        min_delta: Minimum change that counts as an improvement. Defaults to ``0``.

    Example:
        >>> class BestSoFar(MonitorCallback):
        ...     def on_epoch_end(self, epoch, logs=None):
        ...         current = self.get_monitor_value(logs, "Tracking the best value")
        ...         if current is not None and self._is_improvement(current, self.best):
        ...             self.best = current
        >>> tracker = BestSoFar(monitor="val_acc")
        >>> tracker.validate({"metric_directions": {"loss": "min", "acc": "max"}})
        >>> tracker.on_epoch_end(0, {"val_acc": 0.5}); tracker.best
        0.5
    """

    def __init__(self, monitor: str = "val_loss", mode: str = "auto", baseline: float | None = None,
                 min_delta: float = 0) -> None:
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"{type(self).__name__}: monitor must be a non-empty metric name, got {monitor!r}")
        if mode not in MODES:
            raise ValueError(
                f"{type(self).__name__}: mode={mode!r} is not one of {MODES}; pass mode='min' or "
                "mode='max', or 'auto' to infer it from the monitor name"
            )
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = baseline
        self.min_delta = abs(min_delta)
        self.monitor_op: Callable[[float, float], bool] | None = None

    # Direction ---------------------------------------------------------------------------
    def validate(self, params: dict[str, Any]) -> None:
        self._set_monitor_op(params.get("metric_directions", {}))

    def _set_monitor_op(self, directions: dict[str, str] | None = None) -> None:
        if self.monitor_op is not None:
            return
        if directions is None:
            directions = self.params.get("metric_directions", {"loss": "min"})
        if self.mode == "min":
            self.monitor_op = operator.lt
        elif self.mode == "max":
            self.monitor_op = operator.gt
        else:
            metric_name = self.monitor.removeprefix("val_")
            direction = "min" if metric_name == "loss" else directions.get(metric_name)
            if direction == "min":
                self.monitor_op = operator.lt
            elif direction == "max":
                self.monitor_op = operator.gt
            else:
                raise ValueError(
                    f"{type(self).__name__} callback received monitor={self.monitor}, but the "
                    "direction of that metric cannot be determined automatically. Pass "
                    "`mode='max'` to monitor based on the highest metric value, or `mode='min'` "
                    "to use the lowest value."
                )
        if self.monitor_op is operator.lt:
            self.min_delta = -abs(self.min_delta)
        if self.best is None:
            self.best = math.inf if self.monitor_op is operator.lt else -math.inf

    def _is_improvement(self, monitor_value: float, reference_value: float | None) -> bool:
        if reference_value is None:
            return True
        assert self.monitor_op is not None
        return bool(self.monitor_op(monitor_value - self.min_delta, reference_value))

    def get_monitor_value(self, logs: dict | None, what: str, end: str = "") -> float | None:
        """The monitored value, or None with Keras's warning listing the available keys.

        Args:
            logs: The epoch's logs.
            what: Starts the warning, e.g. ``"Early stopping"``: "<what> conditioned on metric ...".
            end: Ends the warning after the list of keys (Keras's ReduceLROnPlateau adds ``"."``).
                Defaults to ``""``.
        """
        logs = logs or {}
        value = logs.get(self.monitor)
        if value is None:
            warnings.warn(
                f"{what} conditioned on metric `{self.monitor}` which is not available. "
                f"Available metrics are: {','.join(list(logs.keys()))}{end}",
                stacklevel=3,
            )
        return value
