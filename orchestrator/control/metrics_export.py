"""Prometheus metrics of a fit through Ray (``ray.util.metrics``), from the events the driver sees.

Ray's metrics agent exports them on each node's metrics export port, so Ray's dashboard and any
Prometheus (and Grafana) that scrapes Ray see them; Ray prefixes their names with ``ray_`` and
counters end in ``_total`` (``orchestrator_steps`` is scraped as ``ray_orchestrator_steps_total``).
Every metric carries the tag ``run`` (the run name); see :data:`METRICS` for the list.

:class:`RunMetrics` is fed on the driver: the attempt's begin and end (``run_attempt``), its
``started`` event and every event the coordinator sends (through
:class:`~orchestrator.control.driver_side.DriverCallbacks`). It only counts in Python as events
arrive, and hands the values to Ray at most once every ``flush_interval_s`` (and at each
attempt's end): the training steps themselves never wait for it, and a metric that Ray refuses
is logged once, never raised.

Example:
    metrics = RunMetrics("digits", samples_per_step=128)   # or for_fit(fit): one per run and process
    metrics.begin_attempt(1)
    metrics.observe({"time": 10.0, "type": "train_begin", "global_step": 0})
    metrics.observe({"time": 11.0, "type": "progress", "global_step": 20, "logs": {"loss": 0.7}})
    metrics.end_attempt(None)
    metrics.snapshot()["orchestrator_steps"]   # 20.0
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

from orchestrator.control.failures import AttemptFailed, NodesDrained
from orchestrator.control.specs import FitSpec
from orchestrator.core.events import EventType, event_type
from orchestrator.core.goodput import LOST_CAUSES, GoodputLedger

logger = logging.getLogger(__name__)

__all__ = ["METRICS", "MetricDef", "RunMetrics", "for_fit", "metrics_of"]


@dataclass(frozen=True)
class MetricDef:
    """One exported metric: its kind (``counter``, ``gauge``, ``histogram``), help text and tags besides ``run``."""

    kind: str
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


#: Every metric exported, by name (Ray adds ``ray_`` in front, and ``_total`` to counters).
METRICS: dict[str, MetricDef] = {
    "orchestrator_steps": MetricDef("counter", "training steps run (optimizer steps; replayed ones included)"),
    "orchestrator_samples": MetricDef("counter", "training samples run: steps times the global batch size"),
    "orchestrator_steps_per_second": MetricDef("gauge", "training steps a second, over the latest second or more "
                                                        "(or up to the epoch's end)"),
    "orchestrator_samples_per_second": MetricDef("gauge", "training samples a second (steps a second times the "
                                                          "global batch size)"),
    "orchestrator_step_seconds": MetricDef("gauge", "seconds a training step, over the latest second or more "
                                                    "(or up to the epoch's end)"),
    "orchestrator_global_step": MetricDef("gauge", "the newest global step the driver heard of"),
    "orchestrator_epoch": MetricDef("gauge", "the epoch being trained (0-based)"),
    "orchestrator_loss": MetricDef("gauge", "loss: phase=train the running loss (epoch's at its end), "
                                            "phase=val the validation loss", ("phase",)),
    "orchestrator_learning_rate": MetricDef("gauge", "the learning rate"),
    "orchestrator_backups_committed": MetricDef("counter", "backups committed (every rank's files durable)"),
    "orchestrator_backups_failed": MetricDef("counter", "backup writes that failed on a rank"),
    "orchestrator_backup_bytes": MetricDef("counter", "bytes of committed backups"),
    "orchestrator_backup_persist_seconds": MetricDef(
        "histogram", "seconds from a backup's step to its commit (copy, background persist, commit)", (),
        (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)),
    "orchestrator_backup_stall_seconds": MetricDef(
        "histogram", "seconds training stood still for a backup (the slowest rank's wait and copy to CPU)", (),
        (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)),
    "orchestrator_restarts": MetricDef("counter", "attempts started after the first (failures, drains)"),
    "orchestrator_rollbacks": MetricDef("counter", "rollbacks to the newest backup after a non-finite loss"),
    "orchestrator_lost_steps": MetricDef("counter", "global steps trained again after restarts and rollbacks "
                                                    "(a lower bound)"),
    "orchestrator_controller_state_seconds": MetricDef(
        "counter", "seconds the controller spent starting (state=starting: storage, capacity and lease "
                   "checks), running attempts (state=running) and between them (state=restarting)", ("state",)),
    "orchestrator_goodput": MetricDef("gauge", "productive training seconds over wall seconds, for this driver's "
                                               "attempts of the run"),
    "orchestrator_goodput_seconds": MetricDef(
        "gauge", "wall seconds by cause: productive, wall, and the lost ones (" + ", ".join(LOST_CAUSES) + ")",
        ("cause",)),
}

_POSITION_EVENTS = frozenset({EventType.PROGRESS, EventType.BATCH_END, EventType.EPOCH_END, EventType.NAN_DETECTED})
_RATE_WINDOW_S = 1.0
_MAX_REACHED = 256  # global steps whose time is remembered, to time backup commits


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _step(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _RaySink:
    """The ``ray.util.metrics`` objects, created once per process; a refused call disables the sink."""

    _lock = threading.Lock()
    _metrics: dict[str, Any] = {}
    _broken = False

    @classmethod
    def _metric(cls, name: str) -> Any:
        if name not in cls._metrics:
            from ray.util import metrics

            spec = METRICS[name]
            keys = ("run",) + spec.tags
            if spec.kind == "counter":
                cls._metrics[name] = metrics.Counter(name, description=spec.description, tag_keys=keys)
            elif spec.kind == "gauge":
                cls._metrics[name] = metrics.Gauge(name, description=spec.description, tag_keys=keys)
            else:
                cls._metrics[name] = metrics.Histogram(name, description=spec.description,
                                                       boundaries=list(spec.boundaries), tag_keys=keys)
        return cls._metrics[name]

    @classmethod
    def emit(cls, counts: list[tuple[str, dict[str, str], float]], gauges: list[tuple[str, dict[str, str], float]],
             observations: list[tuple[str, dict[str, str], float]]) -> None:
        with cls._lock:
            if cls._broken:
                return
            try:
                for name, tags, value in counts:
                    cls._metric(name).inc(value, tags=tags)
                for name, tags, value in gauges:
                    cls._metric(name).set(value, tags=tags)
                for name, tags, value in observations:
                    cls._metric(name).observe(value, tags=tags)
            except Exception as exc:  # noqa: BLE001 - metrics never stop training
                cls._broken = True
                logger.warning("Ray refused a metric (%s: %s); orchestrator_ metrics are no longer exported by "
                               "this process", type(exc).__name__, exc)


class RunMetrics:
    """Counts a run's metrics from the driver's events and hands them to Ray (see the module docstring).

    Args:
        run: The run name (the ``run`` tag).
        samples_per_step: Samples one training step takes, cluster-wide (batch size times
            accumulated batches times workers).
        flush_interval_s: Least seconds between two hand-overs to Ray. Defaults to ``1.0``.
        export: Hand the values to Ray; ``False`` only counts (see :meth:`snapshot`). Defaults to ``True``.

    Example:
        >>> m = RunMetrics("r", samples_per_step=8, export=False)
        >>> m.begin_attempt(1)
        >>> m.observe({"time": 0.0, "type": "train_begin", "global_step": 0})
        >>> m.observe({"time": 2.0, "type": "progress", "global_step": 10, "logs": {"loss": 0.5}})
        >>> s = m.snapshot()
        >>> s["orchestrator_steps"], s["orchestrator_samples_per_second"], s["orchestrator_loss:train"]
        (10.0, 40.0, 0.5)
    """

    def __init__(self, run: str, samples_per_step: int, *, flush_interval_s: float = 1.0,
                 export: bool = True) -> None:
        if samples_per_step < 1:
            raise ValueError(f"samples_per_step must be at least 1, got {samples_per_step}")
        self.run = run
        self.samples_per_step = samples_per_step
        self.flush_interval_s = flush_interval_s
        self.export = export
        self.ledger = GoodputLedger()
        self._counts: dict[tuple[str, str], float] = {}  # (name, tag value) -> total
        self._exported: dict[tuple[str, str], float] = {}  # what Ray has of each total
        self._gauges: dict[tuple[str, str], float] = {}
        self._observations: list[tuple[str, float]] = []  # histogram values not yet handed over
        self._position: int | None = None  # global step
        self._anchor: tuple[float, int] | None = None  # (time, step) the rate is measured from
        self._reached: dict[int, float] = {}  # global step -> time the driver heard of it
        self._attempts = 0
        self._in_attempt = False
        self._state_since = time.monotonic()
        self._starting = False  # in the controller's Starting state (before the first attempt)
        self._last_flush = 0.0
        self._lost_counted = 0
        self._warned = False

    # -- what the driver calls ---------------------------------------------------------------
    def begin_attempt(self, number: int, now: float | None = None) -> None:
        """An attempt begins (``run_attempt`` entered) at ``now`` (Unix seconds; defaults to the time now)."""
        self._account_state()
        self._attempts += 1
        if self._attempts > 1:
            self._count("orchestrator_restarts", 1)
        self._in_attempt = True
        self.ledger.begin_attempt(number, time.time() if now is None else now)
        self._position, self._anchor = None, None
        self.flush(force=True)

    def observe(self, event: Mapping[str, Any]) -> None:
        """Count one event (a coordinator's, or a lifecycle one the driver wrote); never raises."""
        try:
            self._observe(event)
        except Exception as exc:  # noqa: BLE001 - metrics never stop training
            if not self._warned:
                self._warned = True
                logger.warning("orchestrator metrics: could not count a %r event (%s: %s); skipped",
                               event.get("type"), type(exc).__name__, exc)

    def _observe(self, event: Mapping[str, Any]) -> None:
        kind = event_type(event["type"]) if isinstance(event.get("type"), str) else None
        if kind is None:
            return
        self.ledger.add(event)
        t = _number(event.get("time"))
        t = time.time() if t is None else t
        logs = event.get("logs") if isinstance(event.get("logs"), Mapping) else {}
        epoch = _number(event.get("epoch"))
        if epoch is not None and epoch >= 0:
            self._set("orchestrator_epoch", epoch)
        if kind is EventType.TRAIN_BEGIN:
            self._move(t, _step(event.get("global_step")), count=False)
        elif kind in _POSITION_EVENTS:
            self._move(t, _step(event.get("global_step")), count=True, rate_now=kind is EventType.EPOCH_END)
        elif kind is EventType.ROLLED_BACK:
            self._count("orchestrator_rollbacks", 1)
            self._move(t, _step(event.get("bad_step")), count=True)
            self._move(t, _step(event.get("target_step")), count=False)
        elif kind is EventType.BACKUP_COMMITTED:
            self._count("orchestrator_backups_committed", 1)
            self._count("orchestrator_backup_bytes", _number(event.get("bytes")) or 0.0)
            stall = _number(event.get("stall_s"))
            if stall is not None:
                self._observations.append(("orchestrator_backup_stall_seconds", max(0.0, stall)))
            step = event.get("step")
            if isinstance(step, int) and step in self._reached:
                self._observations.append(("orchestrator_backup_persist_seconds", max(0.0, t - self._reached[step])))
        elif kind is EventType.BACKUP_FAILED:
            self._count("orchestrator_backups_failed", 1)
        elif kind is EventType.LR_CHANGED:
            rate = _number(event.get("new", event.get("value")))
            if rate is not None:
                self._set("orchestrator_learning_rate", rate)
        if kind in (EventType.PROGRESS, EventType.BATCH_END, EventType.EPOCH_END):
            loss = _number(logs.get("loss"))
            if loss is not None:
                self._set("orchestrator_loss", loss, "train")
        if kind is EventType.EPOCH_END:
            val, rate = _number(logs.get("val_loss")), _number(logs.get("learning_rate"))
            if val is not None:
                self._set("orchestrator_loss", val, "val")
            if rate is not None:
                self._set("orchestrator_learning_rate", rate)
        lost = self.ledger.replayed_steps - self._lost_counted
        if lost > 0:
            self._count("orchestrator_lost_steps", lost)
            self._lost_counted = self.ledger.replayed_steps
        self.flush()

    def end_attempt(self, error: BaseException | None, *, preempted: bool = False, now: float | None = None) -> None:
        """The attempt ended at ``now`` (defaults to the time now): normally (``error`` None), preempted, or
        with ``error``; hands everything to Ray."""
        if isinstance(error, NodesDrained):
            kind, extra = EventType.PREEMPTED, {"reason": "node_drain"}
        elif isinstance(error, AttemptFailed):
            kind, extra = EventType.WORKER_FAILED, {}
        elif error is not None:
            kind, extra = EventType.FAILED, {}
        else:
            kind, extra = (EventType.PREEMPTED if preempted else EventType.FINISHED), {}
        self.ledger.add({"time": time.time() if now is None else now, "type": kind.value, **extra})
        self._account_state()
        self._in_attempt = False
        self.flush(force=True)

    # -- reading and handing over ------------------------------------------------------------
    def snapshot(self) -> dict[str, float]:
        """The current values: ``name`` or ``name:tag value`` (counters' totals, gauges' latest values)."""
        out: dict[str, float] = {}
        for (name, tag), value in list(self._counts.items()) + list(self._gauges.items()):
            out[f"{name}:{tag}" if tag else name] = value
        return out

    def flush(self, force: bool = False) -> None:
        """Hand the values to Ray, unless the last hand-over was less than ``flush_interval_s`` ago."""
        now = time.monotonic()
        if not force and now - self._last_flush < self.flush_interval_s:
            return
        self._last_flush = now
        self._account_state()
        b = self.ledger.breakdown(now=time.time() if self._in_attempt else None)
        if b.goodput is not None:
            self._set("orchestrator_goodput", b.goodput)
        for cause, seconds in [("productive", b.productive_s), ("wall", b.wall_s), *b.lost_s.items()]:
            self._set("orchestrator_goodput_seconds", seconds, cause)
        if not self.export:
            self._observations.clear()
            return
        counts = []
        for key, total in self._counts.items():
            delta = total - self._exported.get(key, 0.0)
            if delta > 0:
                counts.append((key[0], self._tags(key), delta))
                self._exported[key] = total
        gauges = [(key[0], self._tags(key), value) for key, value in self._gauges.items()]
        observations = [(name, {"run": self.run}, value) for name, value in self._observations]
        self._observations.clear()
        _RaySink.emit(counts, gauges, observations)

    # -- internals -------------------------------------------------------------------------
    def _tags(self, key: tuple[str, str]) -> dict[str, str]:
        name, tag = key
        extra = METRICS[name].tags
        return {"run": self.run, **({extra[0]: tag} if extra else {})}

    def _count(self, name: str, value: float, tag: str = "") -> None:
        if value > 0:
            self._counts[(name, tag)] = self._counts.get((name, tag), 0.0) + value

    def _set(self, name: str, value: float, tag: str = "") -> None:
        self._gauges[(name, tag)] = value

    def begin_starting(self) -> None:
        """The controller's Starting state begins now (storage and capacity checks, the run lease)."""
        self._starting = True
        self._state_since = time.monotonic()

    def _account_state(self) -> None:
        """Add the seconds since the last call to the controller state the driver was in."""
        now = time.monotonic()
        if self._attempts or self._starting:
            state = "running" if self._in_attempt else "restarting" if self._attempts else "starting"
            self._count("orchestrator_controller_state_seconds", now - self._state_since, state)
        self._starting = False
        self._state_since = now

    def _move(self, t: float, step: int | None, *, count: bool, rate_now: bool = False) -> None:
        """The ranks are at global ``step`` at ``t``: count the steps run since the last position.

        The rate is measured over at least a second, or up to an epoch's end (``rate_now``).
        """
        if step is None:
            return
        step_i: int = step
        self._set("orchestrator_global_step", float(step_i))
        if self._position is None or not count:  # a new attempt, or a rollback's target: counting starts here
            self._position = step_i
        elif step_i > self._position:
            ran, self._position = step_i - self._position, step_i
            self._count("orchestrator_steps", ran)
            self._count("orchestrator_samples", ran * self.samples_per_step)
        if self._anchor is None or not count:
            self._anchor = (t, step_i)  # the rate is measured from here
        elif step_i > self._anchor[1] and t > self._anchor[0] and (rate_now or t - self._anchor[0] >= _RATE_WINDOW_S):
            per_second = (step_i - self._anchor[1]) / (t - self._anchor[0])
            self._set("orchestrator_steps_per_second", per_second)
            self._set("orchestrator_samples_per_second", per_second * self.samples_per_step)
            self._set("orchestrator_step_seconds", 1.0 / per_second)
            self._anchor = (t, step_i)
        self._reached[step_i] = t
        if len(self._reached) > _MAX_REACHED:
            for old in sorted(self._reached)[: len(self._reached) - _MAX_REACHED // 2]:
                del self._reached[old]


_RUNS: dict[tuple[str | None, str], RunMetrics] = {}
_RUNS_LOCK = threading.Lock()


def metrics_of(run_name: str, url: str | None = None) -> RunMetrics | None:
    """This process's :class:`RunMetrics` of the run named ``run_name`` (under storage ``url`` when given), if any.

    Example:
        >>> metrics_of("a run this process never trained") is None
        True
    """
    with _RUNS_LOCK:
        found = [m for (u, name), m in _RUNS.items() if name == run_name and (url is None or u == url)]
    return found[-1] if found else None


def for_fit(fit: FitSpec) -> RunMetrics:
    """The driver's :class:`RunMetrics` of ``fit``'s run (one per run and process: a resumed fit goes on counting)."""
    key = (fit.storage.url, fit.storage.run_name)
    with _RUNS_LOCK:
        if key not in _RUNS:
            per_step = fit.loop.batch_size * fit.loop.accumulate_grad_batches * fit.scaling.num_workers
            _RUNS[key] = RunMetrics(fit.storage.run_name, samples_per_step=max(1, int(per_step)))
        return _RUNS[key]

