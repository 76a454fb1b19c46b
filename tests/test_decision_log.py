"""The decision log: every decision's event carries the values that caused it, JSON-safe; the driver
keeps a bounded number of events. Through the real coordinator core and EventLog, without Ray."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from callback_helpers import make_core
from orchestrator.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateScheduler,
    ReduceLROnPlateau,
    RollbackOnNaN,
    TerminateOnNaN,
)
from orchestrator.cluster.coordinator_core import CoordinatorCore
from orchestrator.cluster.decision_events import Position, with_details
from orchestrator.control.driver_side import MAX_EVENTS_IN_MEMORY, reached_step, remember
from orchestrator.control.failures import FailureRecord
from orchestrator.control.watch import _persist_event
from orchestrator.core.events import EventType, undeclared_fields
from orchestrator.core.metrics import PhaseSums
from orchestrator.decisions import Report, ReportKind, SetLearningRate, StopTraining, plain_details
from orchestrator.storage.fs import StorageSpec
from orchestrator.storage.run_files import EventLog, read_events

STEPS = 5


def run_epochs(core: CoordinatorCore, epoch_logs: list[dict[str, float]]) -> list[dict[str, Any]]:
    """One rank through train_begin and epoch_begin/epoch_end per entry (stopping when decided); the events."""
    lr, events = core.view.learning_rate, []

    def sync(kind: ReportKind, **fields: Any) -> list:
        nonlocal lr
        made = core.handle({0: Report(kind, learning_rate=lr, steps_per_epoch=STEPS, **fields)})
        assert core.error is None, core.error
        lr = next((d.value for d in reversed(made) if isinstance(d, SetLearningRate)), lr)
        events.extend(core.drain())
        return made

    sync(ReportKind.TRAIN_BEGIN)
    for epoch, logs in enumerate(epoch_logs):
        sync(ReportKind.EPOCH_BEGIN, epoch=epoch, global_step=epoch * STEPS)
        made = sync(ReportKind.EPOCH_END, epoch=epoch, train=PhaseSums(dict(logs), 1),
                    global_step=(epoch + 1) * STEPS)
        if any(isinstance(d, StopTraining) for d in made):
            break
    return events


def written(events: list[dict[str, Any]], tmp_path) -> list[dict[str, Any]]:
    """The events as events.jsonl holds them (the driver's own path), read back."""
    storage = StorageSpec(str(tmp_path), "run").open()
    log = EventLog(storage, attempt=1)
    for event in events:
        _persist_event(log, dict(event, attempt=1))
    return read_events(storage)


def only(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (event,) = [e for e in events if e["type"] == kind]
    return event


# -- EarlyStopping -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, values, expected",
    [
        ({"monitor": "loss", "patience": 2}, [1.0, 0.9, 0.95, 0.97],
         {"value": 0.97, "best": 0.9, "best_epoch": 1, "wait": 2, "patience": 2, "mode": "min", "baseline": None}),
        ({"monitor": "loss", "patience": 0}, [1.0, 1.5],
         {"value": 1.5, "best": 1.0, "best_epoch": 0, "wait": 1, "patience": 0, "mode": "min"}),
        ({"monitor": "accuracy", "patience": 2, "baseline": 0.7}, [0.6, 0.65, 0.65],
         {"value": 0.65, "best": 0.65, "best_epoch": 1, "wait": 3, "mode": "max", "baseline": 0.7}),
        ({"monitor": "loss", "patience": 1, "min_delta": -0.1}, [1.0, 0.95, 0.85],
         {"value": 0.95, "best": 1.0, "wait": 1, "min_delta": 0.1}),
        ({"monitor": "loss", "patience": 1, "start_from_epoch": 2}, [9.0, 8.0, 1.0, 1.0],
         {"value": 1.0, "best": 1.0, "best_epoch": 2, "wait": 1}),
    ],
)
def test_an_early_stopping_event_carries_the_callbacks_state_at_the_moment_it_stopped(kwargs, values, expected,
                                                                                      tmp_path):
    stopper = EarlyStopping(**kwargs)
    events = run_epochs(make_core([stopper]), [{"loss": v, "accuracy": v} for v in values])
    (line,) = [e for e in written(events, tmp_path) if e["type"] == "early_stopping"]

    assert {k: line[k] for k in expected} == expected
    assert (line["monitor"], line["wait"], line["patience"], line["best"], line["best_epoch"]) == (
        stopper.monitor, stopper.wait, stopper.patience, stopper.best, stopper.best_epoch)
    assert (line["epoch"], line["global_step"]) == (stopper.stopped_epoch, (stopper.stopped_epoch + 1) * STEPS)
    assert (line["reason"], line["source"]) == ("early_stopping", "EarlyStopping")
    assert undeclared_fields(EventType.EARLY_STOPPING, line) == []


# -- the learning rate -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "callback, values, expected",
    [
        (ReduceLROnPlateau(monitor="loss", patience=1, factor=0.5), [1.0, 1.0],
         [{"epoch": 1, "old": 0.1, "new": 0.05, "value": 0.05, "monitor": "loss", "monitor_value": 1.0, "best": 1.0,
           "wait": 1, "patience": 1, "factor": 0.5, "min_lr": 0.0, "source": "ReduceLROnPlateau"}]),
        (ReduceLROnPlateau(monitor="loss", patience=2, factor=0.1, min_lr=0.005), [1.0, 0.5, 0.6, 0.7, 0.8, 0.9],
         [{"epoch": 3, "old": 0.1, "new": 0.010000000000000002, "monitor_value": 0.7, "best": 0.5, "wait": 2},
          {"epoch": 5, "old": 0.010000000000000002, "new": 0.005, "monitor_value": 0.9, "best": 0.5, "wait": 2,
           "min_lr": 0.005}]),
        (LearningRateScheduler(lambda epoch, lr: lr / 2), [1.0, 1.0],
         [{"epoch": 0, "old": 0.1, "new": 0.05, "value": 0.05, "source": "LearningRateScheduler"},
          {"epoch": 1, "old": 0.05, "new": 0.025}]),
    ],
    ids=["plateau", "plateau-twice-to-min-lr", "scheduler"],
)
def test_an_lr_changed_event_carries_the_old_and_new_rate_and_what_caused_it(callback, values, expected, tmp_path):
    events = run_epochs(make_core([callback], lr=0.1), [{"loss": v} for v in values])
    lines = [e for e in written(events, tmp_path) if e["type"] == "lr_changed"]
    assert [{k: line[k] for k in want} for line, want in zip(lines, expected)] == expected
    assert len(lines) == len(expected)
    assert all(undeclared_fields(EventType.LR_CHANGED, line) == [] for line in lines)


def test_a_callback_that_gives_no_details_still_gets_the_old_rate_from_the_coordinator(tmp_path):
    class Halve(Callback):
        def on_epoch_end(self, epoch, logs=None):
            return [SetLearningRate(self.trainer.learning_rate / 2, "Halve"), SetLearningRate(0.01, "Halve")]

    events = run_epochs(make_core([Halve()], lr=0.1), [{"loss": 1.0}])
    changes = [(e["old"], e["new"]) for e in written(events, tmp_path) if e["type"] == "lr_changed"]
    assert changes == [(0.1, 0.05), (0.05, 0.01)]  # the second one changes what the first set


# -- stops of other callbacks, and what events.jsonl can hold -------------------------------------------


def test_a_user_stop_keeps_declared_details_at_the_top_and_the_rest_under_details(tmp_path):
    class Target(Callback):
        def on_epoch_end(self, epoch, logs=None):
            return StopTraining("target_reached", "Target", details={
                "monitor": "loss", "value": np.float32(0.25), "target": np.float64(0.3), "runs": np.int64(2)})

    line = only(written(run_epochs(make_core([Target()]), [{"loss": 0.25}]), tmp_path), "stopped")
    assert (line["monitor"], line["value"], line["details"]) == ("loss", 0.25, {"target": 0.3, "runs": 2})
    assert type(line["details"]["runs"]) is int


def test_terminate_on_nan_writes_the_non_finite_loss_it_stopped_on(tmp_path):
    line = only(written(run_epochs(make_core([TerminateOnNaN()]), [{"loss": 1.0}, {"loss": math.inf}]), tmp_path),
                "terminated_on_nan")
    assert (line["epoch"], line["monitor"], line["value"], line["source"]) == (1, "loss", math.inf, "TerminateOnNaN")


@pytest.mark.parametrize(
    "details, match",
    [({1: 2.0}, "keys must be strings"), ({"values": [1.0, 2.0]}, r"details\['values'\] is list"),
     ({"array": np.ones(3)}, r"details\['array'\] is ndarray")],
)
def test_details_that_events_jsonl_cannot_hold_are_refused_naming_the_key(details, match):
    with pytest.raises(TypeError, match=match):
        StopTraining("x", "Mine", details=details)


def test_details_become_plain_python_values_and_long_strings_are_cut():
    details = plain_details({"a": np.float32(0.5), "b": np.bool_(True), "c": np.array([3]), "d": "x" * 500,
                             "e": None, "f": math.nan})
    assert {k: type(v) for k, v in details.items()} == {"a": float, "b": bool, "c": int, "d": str, "e": type(None),
                                                        "f": float}
    assert len(details["d"]) == 200 and details["d"].endswith("...")


def test_details_do_not_change_what_a_decision_is():
    assert StopTraining("a", "b", details={"value": 1.0}) == StopTraining("a", "b")
    assert len({SetLearningRate(0.1, "x", details={"old": 0.2}), SetLearningRate(0.1, "x")}) == 1


def test_with_details_never_overwrites_the_decisions_own_fields():
    assert with_details(EventType.ROLLED_BACK, {"folder": "backup/step-4", "bad_step": 9},
                        {"bad_step": 1, "rollbacks": 2, "folder": "x", "colour": "red"}) == {
        "folder": "backup/step-4", "bad_step": 9, "rollbacks": 2, "details": {"colour": "red"}}


def test_rollback_on_nan_gives_its_loss_and_counts_with_each_decision():
    cb = RollbackOnNaN(max_rollbacks=1)
    _, rollback = cb.on_batch_end(2, {"loss": math.nan})
    stop = cb.on_batch_end(3, {"loss": math.inf})
    assert {k: rollback.details[k] for k in ("monitor", "rollbacks", "max_rollbacks")} == {
        "monitor": "loss", "rollbacks": 1, "max_rollbacks": 1}
    assert math.isnan(rollback.details["value"]) and stop.details["value"] == math.inf


# -- where the ranks are, and how far an attempt got ---------------------------------------------------


def test_progress_events_carry_the_global_step_counted_from_the_latest_sync_point():
    core = make_core([], steps=4)
    core.handle({0: Report(ReportKind.TRAIN_BEGIN, learning_rate=0.1, steps_per_epoch=4, global_step=0)})
    core.handle({0: Report(ReportKind.EPOCH_BEGIN, epoch=0, learning_rate=0.1, steps_per_epoch=4)})
    core.progress(0, 1, {"loss": 1.0})
    core.handle({0: Report(ReportKind.BATCH_END, epoch=0, step=2, learning_rate=0.1, steps_per_epoch=4,
                           global_step=3, train=PhaseSums({"loss": 1.0}, 1))})
    core.progress(0, 3, {"loss": 1.0})
    core.handle({0: Report(ReportKind.EPOCH_END, epoch=0, learning_rate=0.1, steps_per_epoch=4, global_step=4,
                           train=PhaseSums({"loss": 1.0}, 1))})
    core.progress(1, 0, {"loss": 1.0})  # the next epoch, from the end of this one
    core.progress(3, 0, {"loss": 1.0})  # an epoch the coordinator has not seen begin: not known
    steps = [e.get("global_step") for e in core.drain() if e["type"] in ("progress", "batch_end", "epoch_end")]
    assert steps == [2, 3, 4, 4, 5, None]


def test_a_position_saved_in_a_backup_says_where_its_epoch_resumes():
    assert Position.from_state(None) == Position(0, 0, 0)
    assert Position.from_state({"view": {"next_epoch": 2, "epoch_steps_done": 3, "global_step": 11}}) == \
        Position(2, 3, 11)
    old = Position.from_state({"view": {"epoch": 2, "step": 2, "global_step": 11}})  # written before positions
    assert old.done == -1 and old.global_at(2, 5) is None


def test_reached_step_reads_the_highest_step_of_one_attempt_only():
    events = [{"attempt": 1, "type": "progress", "global_step": 40}, {"attempt": 2, "type": "progress",
                                                                       "global_step": 12},
              {"attempt": 2, "type": "backup_committed", "step": 15}, {"attempt": 2, "type": "progress",
                                                                        "global_step": None},
              {"attempt": 2, "type": "epoch_end", "step": -1, "global_step": 14}]
    assert (reached_step(events, 1), reached_step(events, 2), reached_step(events, 3)) == (40, 15, None)


def test_a_worker_failed_event_rounds_its_detection_time_and_names_the_role():
    assert FailureRecord(2, 1, "10.0.0.2", "rank 1 died", detection_s=0.123456).event_fields() == {
        "rank": 1, "node": "10.0.0.2", "cause": "rank 1 died", "role": "worker", "detection_s": 0.123}
    assert FailureRecord(2, None, "n", "lost", role="coordinator").event_fields()["detection_s"] is None


def test_the_driver_keeps_a_bounded_number_of_events_and_prefers_the_persisted_ones():
    events: list[dict[str, Any]] = []
    for i in range(3 * MAX_EVENTS_IN_MEMORY):
        remember(events, {"type": "progress", "step": i})
        if i % 100 == 0:
            remember(events, {"type": "epoch_end", "epoch": i // 100})
        assert len(events) <= MAX_EVENTS_IN_MEMORY
    epochs = [e["epoch"] for e in events if e["type"] == "epoch_end"]
    assert epochs == list(range(3 * MAX_EVENTS_IN_MEMORY // 100))  # every persisted one fits: all kept
    steps = [e["step"] for e in events if e["type"] == "progress"]
    assert steps == sorted(steps) and steps[-1] == 3 * MAX_EVENTS_IN_MEMORY - 1  # the newest, in order
