"""Shared logic for callbacks that watch one logged quantity (Keras 3 ``MonitorCallback``)."""

from __future__ import annotations

import math
import operator
import struct
import warnings
from typing import Any, Callable

from orchestrator.callbacks.base import Callback

MODES = ("auto", "min", "max")


def to_float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (as a Python float), without numpy.

    Values beyond float32's range round to an infinity of the same sign; NaN stays NaN.

    Example:
        >>> to_float32(0.1)
        0.10000000149011612
        >>> to_float32(1e39)
        inf
    """
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # rounds beyond float32's largest finite value
        return math.copysign(math.inf, value)


class MonitorCallback(Callback):
    """Base for callbacks that compare a monitored value against the best seen so far.

    Args:
        monitor: Quantity to be monitored. Defaults to ``"val_loss"``.
        mode: One of ``{"auto", "min", "max"}``. In ``"auto"`` mode the direction comes from the
            run's ``params["metric_directions"]`` (built from the metric registry,
            :func:`orchestrator.core.metrics.metric_directions`): ``loss`` and the error metrics
            are minimised, ``accuracy`` (``acc``) maximised; a metric without a known direction
            raises ValueError before training starts. Defaults to ``"auto"``.
        baseline: Initial best value; ``None`` means the first value seen becomes the best, even
            when it is NaN or infinite (after a NaN nothing improves on it, as in Keras).
            Defaults to ``None``.
        min_delta: Minimum change that counts as an improvement. Defaults to ``0``.

    Comparisons are made as Keras 3 makes them (``ops.less`` / ``ops.greater`` on Python floats,
    which its TensorFlow, JAX and PyTorch backends turn into float32 tensors): the monitored value
    minus ``min_delta`` is computed in double precision, then it and the reference value are rounded
    to float32 and compared. Two values that round to the same float32 are equal, so e.g. with
    ``min_delta=0.1`` and ``mode="min"`` a loss going from 0.8 to 0.7 is *not* an improvement
    (0.7 + 0.1 is 0.7999999999999999 in double precision, 0.8 in float32). A NaN never improves
    on anything, and nothing improves on a NaN.

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

    def _is_improvement(self, monitor_value: float, reference_value: float | None) -> bool:
        """Whether ``monitor_value`` improves on ``reference_value`` by more than ``min_delta``.

        Anything improves on ``None``; otherwise compared in float32, as Keras does (see the class).
        """
        if reference_value is None:
            return True
        assert self.monitor_op is not None
        return bool(self.monitor_op(to_float32(monitor_value - self.min_delta), to_float32(reference_value)))

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
