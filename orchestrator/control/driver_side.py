"""What the driver watches besides the ranks: Ray's drains of an attempt's nodes, and the display callbacks.

:class:`DrainWatch` asks Ray (at most every ``interval_s``) which of the attempt's nodes are being
drained; :class:`DriverCallbacks` replays the coordinator's events to the callbacks that run on the
driver (ProgbarLogger, History). Both are used by the watch loop of
:mod:`orchestrator.control.watch`. :func:`remember` keeps the driver's copy of the events
(``History.events``) bounded; :func:`reached_step` reads from it how far an attempt got.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, MutableSequence, Sequence

from orchestrator.callbacks.base import Callback, TrainingView
from orchestrator.callbacks.history import History
from orchestrator.cluster.worker_group import draining_nodes
from orchestrator.core.events import EventType, event_type

__all__ = ["DrainWatch", "DriverCallbacks", "MAX_EVENTS_IN_MEMORY", "reached_step", "remember"]

#: Most events the driver keeps in memory (``FitOutcome.events``, ``History.events``); events.jsonl has them all.
MAX_EVENTS_IN_MEMORY = 10_000


def remember(events: MutableSequence[dict[str, Any]], event: dict[str, Any], limit: int = MAX_EVENTS_IN_MEMORY) -> None:
    """Append ``event``; past ``limit`` events, drop the oldest display-only ones first.

    Once the list holds more than ``limit`` events it is cut to ``limit // 2``: the newest
    persisted events (decisions, lifecycle, epoch logs: what ``events.jsonl`` holds too) are kept
    first, up to that many, then the newest display-only ones (``progress``, ``batch_end``...), in
    their order. So a long run holds at most ``limit`` events, a cut costs O(limit) once per
    ``limit // 2`` events, and a short run keeps everything.

    Example:
        >>> events = []
        >>> for i in range(5):
        ...     remember(events, {"type": "progress", "i": i}, limit=4)
        ...     remember(events, {"type": "epoch_end", "i": i}, limit=4)
        >>> [(e["type"], e["i"]) for e in events]
        [('epoch_end', 2), ('epoch_end', 3), ('progress', 4), ('epoch_end', 4)]
    """
    events.append(event)
    if len(events) <= limit:
        return
    keep = max(limit // 2, 1)
    persisted = [i for i, e in enumerate(events) if _persisted(e)][-keep:]
    shown = [i for i, e in enumerate(events) if not _persisted(e)][-(keep - len(persisted)):] \
        if len(persisted) < keep else []
    events[:] = [events[i] for i in sorted(persisted + shown)]


def _persisted(event: dict[str, Any]) -> bool:
    kind = event_type(str(event.get("type")))
    return kind is not None and (kind.persisted or kind is EventType.STOP)


def reached_step(events: Sequence[dict[str, Any]], attempt: int | None) -> int | None:
    """The highest global step the driver heard of in ``attempt`` (events stamped with it), or None.

    Counted from the events that carry a global step (``progress`` about once a second, sync
    points, epoch ends, decisions) and from committed backups (their ``step``). Progress comes
    about once a second, so this is a lower bound of the step the ranks had reached.

    Example:
        >>> reached_step([{"attempt": 1, "type": "progress", "global_step": 7},
        ...               {"attempt": 1, "type": "backup_committed", "step": 5},
        ...               {"attempt": 2, "type": "progress", "global_step": 3}], attempt=1)
        7
    """
    steps = []
    for event in events:
        if attempt is None or event.get("attempt") != attempt:
            continue
        step = event.get("step") if event.get("type") == EventType.BACKUP_COMMITTED else event.get("global_step")
        if isinstance(step, int) and not isinstance(step, bool):
            steps.append(step)
    return max(steps, default=None)


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

    At each ``train_begin`` the view's ``epoch`` is the epoch the ranks continue in and
    ``view.extra["initial_step"]`` the steps of it already done (a resume mid-epoch), which
    ProgbarLogger starts its bar at.

    Args:
        callbacks: The driver's callbacks.
        params: Keras-style params (``steps`` is set from each ``train_begin`` event).
        restored_history: The epochs a resumed attempt starts after, replayed into History.
        observe: Called with every event before the callbacks (the run's metrics exporter). Defaults to None.

    Example:
        >>> history = History()
        >>> DriverCallbacks([history], {}).dispatch({"type": "epoch_end", "time": 0.0, "epoch": 0, "logs": {"loss": 1.0}})
        >>> history.history
        {'loss': [1.0]}
    """

    def __init__(self, callbacks: list[Callback], params: dict[str, Any],
                 restored_history: list[dict[str, Any]] | None = None, *,
                 observe: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.callbacks = callbacks
        self.observe = observe
        self.params = params
        self.restored_history = restored_history or []
        self.view = TrainingView()
        for cb in callbacks:
            cb.set_params(params)
            cb.set_trainer(self.view)

    def dispatch(self, event: dict[str, Any]) -> None:
        if self.observe is not None:
            self.observe(event)
        kind = event["type"]
        self.view.extra["event_time"] = event["time"]
        self.view.epoch = event.get("epoch", self.view.epoch)
        if kind == EventType.TRAIN_BEGIN:
            self.view.extra["initial_step"] = int(event.get("initial_step") or 0)
            self.view.global_step = int(event.get("global_step") or 0)
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
