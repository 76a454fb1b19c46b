"""What the driver watches besides the ranks: Ray's drains of an attempt's nodes, and the display callbacks.

:class:`DrainWatch` asks Ray (at most every ``interval_s``) which of the attempt's nodes are being
drained; :class:`DriverCallbacks` replays the coordinator's events to the callbacks that run on the
driver (ProgbarLogger, History). Both are used by the watch loop of
:mod:`orchestrator.control.watch`.
"""

from __future__ import annotations

import time
from typing import Any

from orchestrator.callbacks.base import Callback, TrainingView
from orchestrator.callbacks.history import History
from orchestrator.cluster.worker_group import draining_nodes
from orchestrator.core.events import EventType

__all__ = ["DrainWatch", "DriverCallbacks"]


class DrainWatch:
    """Polls Ray (at most every ``interval_s``) for drains of the nodes an attempt runs on.

    Args:
        nodes: The Ray node ids to watch.
        interval_s: Least time between two questions to Ray.

    Example:
        >>> DrainWatch(set(), interval_s=1.0).draining
        {}
    """

    def __init__(self, nodes: set[str], interval_s: float) -> None:
        self.nodes = nodes
        self.interval_s = interval_s
        self.draining: dict[str, int] = {}
        self._next = 0.0

    def check(self) -> dict[str, int]:
        """Watched nodes newly seen draining: node id -> deadline (ms since the epoch; 0: none)."""
        now = time.monotonic()
        if now < self._next:
            return {}
        self._next = now + self.interval_s
        new = {n: d for n, d in draining_nodes().items() if n in self.nodes and n not in self.draining}
        self.draining.update(new)
        return new


class DriverCallbacks:
    """Replays the coordinator's events to display-only callbacks (ProgbarLogger, History).

    Args:
        callbacks: The driver's callbacks.
        params: Keras-style params (``steps`` is set from each ``train_begin`` event).
        restored_history: The epochs a resumed attempt starts after, replayed into History.

    Example:
        >>> history = History()
        >>> DriverCallbacks([history], {}).dispatch({"type": "epoch_end", "time": 0.0, "epoch": 0, "logs": {"loss": 1.0}})
        >>> history.history
        {'loss': [1.0]}
    """

    def __init__(self, callbacks: list[Callback], params: dict[str, Any],
                 restored_history: list[dict[str, Any]] | None = None) -> None:
        self.callbacks = callbacks
        self.params = params
        self.restored_history = restored_history or []
        self.view = TrainingView()
        for cb in callbacks:
            cb.set_params(params)
            cb.set_trainer(self.view)

    def dispatch(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        self.view.extra["event_time"] = event["time"]
        self.view.epoch = event.get("epoch", self.view.epoch)
        for cb in self.callbacks:
            if kind == EventType.TRAIN_BEGIN:
                self.params["steps"] = event["steps"]
                if isinstance(cb, History):  # an attempt starts over from the restored epochs
                    cb.load_state_dict({})
                cb.on_train_begin({})
                if isinstance(cb, History):
                    for past in self.restored_history:
                        cb.on_epoch_end(past["epoch"], dict(past["logs"]))
            elif kind == EventType.EPOCH_BEGIN:
                cb.on_epoch_begin(event["epoch"], {})
            elif kind in (EventType.PROGRESS, EventType.BATCH_END):
                cb.on_train_batch_end(event["step"], dict(event["logs"]))
            elif kind == EventType.EPOCH_END:
                cb.on_epoch_end(event["epoch"], dict(event["logs"]))
            elif kind == EventType.TRAIN_END:
                cb.on_train_end(dict(event["logs"]))
