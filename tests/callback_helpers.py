"""Drive callbacks through the real coordinator core, without torch, ray or workers.

:func:`fit` plays one rank: it sends the coordinator's :class:`CoordinatorCore` the reports a rank
sends (train begin, then epoch begin and epoch end per epoch, then train end), applies the
learning-rate decisions the way a rank does, and stops when a decision says so. The hooks thus run
in the coordinator's real order, on logs it aggregated itself; warnings are re-issued and callback
errors re-raised, as the driver does. Display-only callbacks (``runs_on == "driver"``) are called
with the epoch logs as given, as the driver replays them.
"""

from __future__ import annotations

import builtins
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from orchestrator.callbacks import Callback, CallbackList
from orchestrator.cluster.coordinator_core import CoordinatorCore
from orchestrator.core import metrics
from orchestrator.core.events import EventType
from orchestrator.core.metrics import PhaseSums, metric_directions
from orchestrator.decisions import Decision, Report, ReportKind, SetLearningRate, stops
from orchestrator.decisions import RestoreWeights, SnapshotWeights


def _builtin_directions() -> dict[str, str]:
    """The direction of ``loss`` and of every built-in metric name and alias, from the metrics registry."""
    registry = getattr(metrics, "BUILTIN_METRICS", {})
    if isinstance(registry, Mapping):
        names = [n for m in registry.values() for n in (m.name, *getattr(m, "aliases", ()))]
    else:
        names = list(registry)
    names += list(getattr(metrics, "BUILTIN_DIRECTIONS", {}))
    return dict(metric_directions(names))


DIRECTIONS = _builtin_directions()

_CORES: weakref.WeakKeyDictionary[CallbackList, CoordinatorCore] = weakref.WeakKeyDictionary()


@dataclass
class Run:
    """What a simulated fit produced."""

    decisions: dict[str, list[Decision]] = field(default_factory=dict)  # "epoch_end:3" -> [...]
    lrs: list[float] = field(default_factory=list)  # learning rate after each epoch's decisions
    epochs_run: int = 0
    stopped: bool = False
    logs: list[dict[str, Any]] = field(default_factory=list)

    def all(self) -> list[Decision]:
        return [d for ds in self.decisions.values() for d in ds]


def make_core(callbacks: Iterable[Callback], lr: float = 0.1, epochs: int = 10, steps: int = 5,
              verbose: Any = 0, directions: Mapping[str, str] | None = None) -> CoordinatorCore:
    """A one-rank CoordinatorCore with these callbacks, params like the Trainer's and ``validate`` run."""
    params = {"epochs": epochs, "steps": steps, "verbose": verbose,
              "metric_directions": dict(directions or DIRECTIONS)}
    core = CoordinatorCore(list(callbacks), params, world_size=1)
    core.view.learning_rate = lr
    for cb in core.callbacks.callbacks:
        cb.validate(params)
    _CORES[core.callbacks] = core
    return core


def make_list(callbacks: Iterable[Callback], lr: float = 0.1, epochs: int = 10, steps: int = 5,
              verbose: Any = 0, directions: Mapping[str, str] | None = None) -> CallbackList:
    """The CallbackList of a coordinator core (see :func:`make_core`); :func:`fit` drives that core."""
    return make_core(callbacks, lr=lr, epochs=epochs, steps=steps, verbose=verbose, directions=directions).callbacks


def _core_of(cl: CallbackList) -> CoordinatorCore:
    core = _CORES.get(cl)
    if core is None:
        core = make_core(cl.callbacks, lr=cl.view.learning_rate)
        core.callbacks.set_params(cl.params)
    return core


def _sums(logs: Mapping[str, float]) -> tuple[PhaseSums, PhaseSums | None]:
    """One sample's worth of sums: training logs, and ``val_`` logs (without the prefix) if any."""
    train = PhaseSums({k: float(v) for k, v in logs.items() if not k.startswith("val_")}, 1)
    val = {k[len("val_"):]: float(v) for k, v in logs.items() if k.startswith("val_")}
    return train, (PhaseSums(val, 1) if val else None)


def _reissue(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for event in events:
        if event["type"] == EventType.WARNING:
            category = getattr(builtins, event["category"], UserWarning)
            if not (isinstance(category, type) and issubclass(category, Warning)):
                category = UserWarning
            warnings.warn(event["message"], category, stacklevel=3)
    return events


class _Rank:
    """One rank talking to the core: sends a report, raises a callback's error, applies the learning rate."""

    def __init__(self, core: CoordinatorCore) -> None:
        self.core = core
        self.lr = core.view.learning_rate
        self.events: list[dict[str, Any]] = []

    def sync(self, kind: ReportKind, **fields: Any) -> list[Decision]:
        steps = self.core.callbacks.params.get("steps") or 0
        decisions = self.core.handle({0: Report(kind, learning_rate=self.lr, steps_per_epoch=steps, **fields)})
        self.events += _reissue(self.core.drain())
        if self.core.error is not None:
            raise self.core.error
        for d in decisions:
            if isinstance(d, SetLearningRate):
                self.lr = float(d.value)
        return decisions


def fit(callbacks: Iterable[Callback] | CallbackList, epoch_logs: Iterable[Mapping[str, float]],
        lr: float = 0.1, **kwargs: Any) -> Run:
    """Run train_begin, then epoch_begin/epoch_end per logs entry, stopping as the trainer would."""
    drivers: list[Callback] = []
    if isinstance(callbacks, CallbackList):
        core = _core_of(callbacks)
    else:
        callbacks = list(callbacks)
        drivers = [cb for cb in callbacks if cb.runs_on == "driver"]
        core = make_core([cb for cb in callbacks if cb.runs_on != "driver"], lr=lr, **kwargs)
        for cb in drivers:
            cb.set_params(core.callbacks.params)
    display = CallbackList(drivers)
    rank, steps = _Rank(core), core.callbacks.params.get("steps") or 0
    run = Run()
    run.decisions["train_begin"] = rank.sync(ReportKind.TRAIN_BEGIN)
    display.call("on_train_begin", {})
    for epoch, logs in enumerate(epoch_logs):
        display.view.epoch = epoch
        display.call("on_epoch_begin", epoch, {})
        run.decisions[f"epoch_begin:{epoch}"] = rank.sync(ReportKind.EPOCH_BEGIN, epoch=epoch,
                                                          global_step=epoch * steps)
        train, val = _sums(logs)
        made = rank.sync(ReportKind.EPOCH_END, epoch=epoch, train=train, val=val, global_step=(epoch + 1) * steps)
        run.decisions[f"epoch_end:{epoch}"] = made
        display.call("on_epoch_end", epoch, dict(logs))
        run.logs.append(next(e["logs"] for e in reversed(rank.events) if e["type"] == EventType.EPOCH_END))
        run.lrs.append(core.view.learning_rate)
        run.epochs_run = epoch + 1
        if stops(made):
            run.stopped = True
            break
    run.decisions["train_end"] = rank.sync(ReportKind.TRAIN_END, epoch=max(run.epochs_run - 1, 0))
    display.call("on_train_end", {})
    return run


def make_resumed_list(callbacks: Iterable[Callback], coordinator_state: Mapping[str, Any], lr: float = 0.1,
                      epochs: int = 10, steps: int = 5,
                      directions: Mapping[str, str] | None = None) -> CallbackList:
    """Like :func:`make_list`, for an attempt that resumes from a backup holding ``coordinator_state``
    (the core loads it after ``on_train_begin``, as in a real resume); :func:`fit` drives that core."""
    params = {"epochs": epochs, "steps": steps, "verbose": 0, "metric_directions": dict(directions or DIRECTIONS)}
    core = CoordinatorCore(list(callbacks), params, world_size=1, restore=dict(coordinator_state))
    core.view.learning_rate = lr
    for cb in core.callbacks.callbacks:
        cb.validate(params)
    _CORES[core.callbacks] = core
    return core.callbacks


def restored_epochs(run: Run) -> dict[str, int]:
    """What a rank restores: for each ``RestoreWeights`` key, the epoch whose end it snapshotted last
    under that key (a rank keeps one copy per key, as ``Snapshots`` does)."""
    kept: dict[str, int] = {}
    restored: dict[str, int] = {}
    for hook, decisions in run.decisions.items():  # in the order the hooks ran
        epoch = int(hook.split(":")[1]) if ":" in hook else -1
        for d in decisions:
            if isinstance(d, SnapshotWeights):
                kept[d.key] = epoch
            elif isinstance(d, RestoreWeights):
                restored[d.key] = kept[d.key]
    return restored
