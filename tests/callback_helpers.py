"""Drive callbacks the way the coordinator does, without torch, ray or workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from orchestrator.callbacks import Callback, CallbackList, TrainingView
from orchestrator.decisions import Decision, stops

DIRECTIONS = {"loss": "min", "accuracy": "max", "acc": "max", "mse": "min", "mae": "min"}


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


def make_list(callbacks: Iterable[Callback], lr: float = 0.1, epochs: int = 10, steps: int = 5,
              verbose: Any = 0, directions: Mapping[str, str] | None = None) -> CallbackList:
    """A CallbackList wired like the coordinator wires it, with ``validate`` already run."""
    cl = CallbackList(callbacks, TrainingView(learning_rate=lr))
    params = {"epochs": epochs, "steps": steps, "verbose": verbose,
              "metric_directions": dict(directions or DIRECTIONS)}
    cl.set_params(params)
    for cb in cl.callbacks:
        cb.validate(params)
    return cl


def fit(callbacks: Iterable[Callback] | CallbackList, epoch_logs: Iterable[Mapping[str, float]],
        lr: float = 0.1, **kwargs: Any) -> Run:
    """Run train_begin, then epoch_begin/epoch_end per logs entry, stopping as the trainer would."""
    cl = callbacks if isinstance(callbacks, CallbackList) else make_list(callbacks, lr=lr, **kwargs)
    run = Run()
    run.decisions["train_begin"] = cl.call("on_train_begin", {})
    for epoch, logs in enumerate(epoch_logs):
        cl.view.epoch = epoch
        run.decisions[f"epoch_begin:{epoch}"] = cl.call("on_epoch_begin", epoch, {})
        logs = dict(logs)
        made = cl.call("on_epoch_end", epoch, logs)
        run.decisions[f"epoch_end:{epoch}"] = made
        run.logs.append(logs)
        run.lrs.append(cl.view.learning_rate)
        run.epochs_run = epoch + 1
        if stops(made):
            run.stopped = True
            break
    run.decisions["train_end"] = cl.call("on_train_end", {})
    return run
