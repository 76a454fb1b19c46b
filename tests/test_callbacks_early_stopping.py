"""EarlyStopping, on Keras 3's own cases (keras/src/callbacks/early_stopping_test.py) and more."""

from __future__ import annotations

import math
import operator
import warnings

import pytest

from callback_helpers import fit, make_list
from orchestrator.callbacks import EarlyStopping
from orchestrator.decisions import RestoreWeights, SnapshotWeights, StopTraining

KERAS_LOSSES = [10.0, 9.0, 8.0, 9.0, 8.9, 8.8, 8.7, 8.6, 8.5]
STOP = StopTraining(reason="early_stopping", source="EarlyStopping")


def losses(values, key="val_loss"):
    return [{key: v} for v in values]


@pytest.mark.parametrize("patience", [0, 1, 2, 3])
def test_early_stopping_stops_at_patience_plus_two_on_keras_losses(patience):
    stopper = EarlyStopping(monitor="loss", patience=patience)
    run = fit([stopper], losses(KERAS_LOSSES, "loss"))
    assert stopper.stopped_epoch == max(patience, 1) + 2
    assert run.decisions[f"epoch_end:{stopper.stopped_epoch}"] == [STOP]
    assert run.epochs_run == stopper.stopped_epoch + 1


@pytest.mark.parametrize(
    "monitor, values, baseline, patience, stopped_epoch",
    [
        # Beating the baseline resets the count, as without a baseline.
        ("val_accuracy", [0.6, 0.65, 0.65, 0.65, 0.65], None, 2, 3),
        ("val_accuracy", [0.6, 0.65, 0.65, 0.65, 0.65], 0.5, 2, 3),
        # Improving on the best but never reaching the baseline keeps counting.
        ("val_accuracy", [0.6, 0.65, 0.65, 0.65, 0.65], 0.7, 2, 2),
        ("val_accuracy", [0.4, 0.45, 0.45, 0.45, 0.45], 0.5, 2, 2),
        ("val_accuracy", [0.3, 0.3, 0.3, 0.3], 0.5, 2, 1),
        # Keras: no epoch improves on baseline=0.5, so training runs for `patience` epochs.
        ("val_loss", [0.9, 0.8, 0.7, 0.71, 0.72, 0.73], 0.5, 5, 4),
        ("val_loss", [0.9, 0.4, 0.3, 0.31, 0.32, 0.33], 0.5, 5, None),
    ],
)
def test_early_stopping_with_baseline_counts_epochs_that_do_not_beat_it(
    monitor, values, baseline, patience, stopped_epoch
):
    stopper = EarlyStopping(monitor=monitor, patience=patience, baseline=baseline)
    run = fit([stopper], losses(values, monitor))
    assert run.stopped == (stopped_epoch is not None)
    assert stopper.stopped_epoch == (stopped_epoch or 0)


@pytest.mark.parametrize(
    "monitor, values, min_delta, should_stop_at",
    [
        ("loss", [1.0, 0.95, 0.85, 0.8], 0.1, 1),
        ("loss", [1.0, 0.95, 0.85, 0.8], 0.01, None),
        ("loss", [1.0, 0.5, 0.5], 0.5, 1),  # a change of exactly min_delta is not an improvement
        ("loss", [1.0, 0.5, 0.5], -0.5, 1),  # the sign of min_delta is ignored, as in Keras
        ("loss", [1.0, 0.75, 0.75], 0.5, 1),
        ("accuracy", [0.5, 0.55, 0.56], 0.1, 1),
        ("accuracy", [0.5, 0.75, 1.0], 0.25, 1),
        ("accuracy", [0.5, 0.7, 0.9], 0.1, None),
    ],
)
def test_early_stopping_requires_an_improvement_strictly_larger_than_min_delta(
    monitor, values, min_delta, should_stop_at
):
    stopper = EarlyStopping(monitor=monitor, patience=1, min_delta=min_delta)
    run = fit([stopper], losses(values, monitor))
    assert run.stopped == (should_stop_at is not None)
    if should_stop_at is not None:
        assert stopper.stopped_epoch == should_stop_at


def test_early_stopping_snapshots_on_improvements_and_restores_the_best_epoch_at_train_end():
    # Keras: best is epoch 2 (0.1); patience 2 stops at epoch 4 and restores epoch 2.
    stopper = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    run = fit([stopper], losses([0.2, 0.15, 0.1, 0.11, 0.12]))
    snap = SnapshotWeights(key=stopper.weights_key)
    assert [run.decisions[f"epoch_end:{e}"] for e in range(5)] == [[snap], [snap], [snap], [], [STOP]]
    assert run.decisions["train_end"] == [RestoreWeights(key=stopper.weights_key)]
    assert (stopper.best_epoch, stopper.stopped_epoch, stopper.has_best_weights) == (2, 4, True)


def test_early_stopping_restores_the_best_epoch_when_no_epoch_beats_the_baseline():
    stopper = EarlyStopping(monitor="val_loss", patience=5, baseline=0.5, restore_best_weights=True)
    run = fit([stopper], losses([0.9, 0.8, 0.7, 0.71, 0.72, 0.73]))
    assert run.epochs_run == 5
    assert stopper.best_epoch == 2
    assert run.decisions["train_end"] == [RestoreWeights(key=stopper.weights_key)]


def test_early_stopping_restores_best_weights_at_train_end_even_without_an_early_stop():
    stopper = EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True)
    run = fit([stopper], losses([0.2, 0.15, 0.16]))
    assert not run.stopped and stopper.stopped_epoch == 0
    assert stopper.best_epoch == 1
    assert run.decisions["train_end"] == [RestoreWeights(key=stopper.weights_key)]


def test_early_stopping_without_restore_best_weights_never_snapshots_or_restores():
    run = fit([EarlyStopping(patience=1)], losses([0.2, 0.15, 0.16, 0.17]))
    assert run.all() == [STOP]


def test_early_stopping_snapshots_the_first_monitored_epoch_even_when_it_does_not_improve():
    stopper = EarlyStopping(monitor="loss", patience=3, restore_best_weights=True, start_from_epoch=1)
    run = fit([stopper], losses([math.inf, math.inf, 1.0], "loss"))
    assert run.decisions["epoch_end:0"] == []
    assert run.decisions["epoch_end:1"] == [SnapshotWeights(key=stopper.weights_key)]
    assert run.decisions["epoch_end:2"] == [SnapshotWeights(key=stopper.weights_key)]
    assert stopper.best_epoch == 2


@pytest.mark.parametrize(
    "start_from_epoch, patience, values, stopped_epoch",
    [
        (2, 0, [1.0] * 6, 3),
        (3, 2, [1.0] * 8, 5),
        (2, 3, [5.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0], 5),
        (0, 0, [math.inf, math.inf], 1),  # never stops at epoch 0
    ],
)
def test_early_stopping_ignores_epochs_before_start_from_epoch(start_from_epoch, patience, values, stopped_epoch):
    stopper = EarlyStopping(monitor="loss", patience=patience, start_from_epoch=start_from_epoch)
    fit([stopper], losses(values, "loss"))
    assert stopper.stopped_epoch == stopped_epoch
    assert stopper.stopped_epoch >= patience + start_from_epoch


@pytest.mark.parametrize(
    "mode, monitor, expected",
    [
        ("max", "val_mse", operator.gt),
        ("min", "val_loss", operator.lt),
        ("auto", "val_mse", operator.lt),
        ("auto", "loss", operator.lt),
        ("auto", "acc", operator.gt),
        ("auto", "val_accuracy", operator.gt),
        ("auto", "f1_score", operator.gt),  # direction given by the run's metric_directions
    ],
)
def test_early_stopping_resolves_the_direction_at_validate(mode, monitor, expected):
    stopper = EarlyStopping(monitor=monitor, mode=mode)
    make_list([stopper], directions={"loss": "min", "accuracy": "max", "acc": "max", "mse": "min",
                                     "f1_score": "max"})
    assert stopper.monitor_op is expected
    assert stopper.best == (math.inf if expected is operator.lt else -math.inf)


def test_early_stopping_rejects_an_unknown_metric_in_auto_mode_at_validate():
    with pytest.raises(ValueError, match=r"monitor=unknown.*mode='max'"):
        make_list([EarlyStopping(monitor="unknown")])


def test_early_stopping_resolves_the_direction_lazily_when_validate_was_not_called():
    stopper = EarlyStopping(monitor="accuracy", patience=0)
    stopper.set_params({"metric_directions": {"loss": "min", "accuracy": "max"}})
    stopper.on_train_begin()
    assert stopper.on_epoch_end(0, {"accuracy": 0.5}) is None
    assert stopper.on_epoch_end(1, {"accuracy": 0.4}) == [STOP]


@pytest.mark.parametrize(
    "kwargs, name",
    [({"mode": "maximum"}, "mode"), ({"patience": -1}, "patience"), ({"start_from_epoch": -2}, "start_from_epoch")],
)
def test_early_stopping_rejects_invalid_arguments_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EarlyStopping(**kwargs)


def test_early_stopping_warns_with_the_available_keys_when_the_monitor_is_missing():
    stopper = EarlyStopping(monitor="val_loss", patience=0)
    make_list([stopper])
    stopper.on_train_begin()
    with pytest.warns(UserWarning, match="Early stopping conditioned on metric `val_loss` which is not "
                                         "available. Available metrics are: loss,accuracy"):
        assert stopper.on_epoch_end(0, {"loss": 1.0, "accuracy": 0.5}) is None
    assert stopper.wait == 0


def test_early_stopping_resumes_from_its_state_dict_as_if_never_interrupted():
    values = losses(KERAS_LOSSES, "loss")
    whole = EarlyStopping(monitor="loss", patience=3, restore_best_weights=True)
    fit([whole], values)

    first = EarlyStopping(monitor="loss", patience=3, restore_best_weights=True)
    fit([first], values[:4])
    state = first.state_dict()
    assert state == {"wait": 1, "stopped_epoch": 0, "best": 8.0, "best_epoch": 2, "has_best_weights": True}

    resumed = EarlyStopping(monitor="loss", patience=3, restore_best_weights=True)
    cl = make_list([resumed])
    cl.call("on_train_begin", {})
    cl.load_state_dict([state])
    made = {e: cl.call("on_epoch_end", e, dict(values[e])) for e in range(4, 6)}
    assert made == {4: [], 5: [STOP]}
    assert (resumed.stopped_epoch, resumed.best_epoch) == (whole.stopped_epoch, whole.best_epoch)


def test_early_stopping_resets_its_counters_when_reused_for_another_fit():
    stopper = EarlyStopping(monitor="loss", patience=1, restore_best_weights=True)
    fit([stopper], losses([1.0, 2.0], "loss"))
    assert stopper.stopped_epoch == 1
    run = fit([stopper], losses([3.0, 2.5], "loss"))
    assert not run.stopped and stopper.stopped_epoch == 0 and stopper.best == 2.5


def test_early_stopping_prints_keras_messages_when_verbose(capsys):
    fit([EarlyStopping(patience=1, verbose=1, restore_best_weights=True)], losses([0.3, 0.2, 0.25]))
    out = capsys.readouterr().out
    assert "Epoch 3: early stopping" in out
    assert "Restoring model weights from the end of the best epoch: 2." in out


def test_early_stopping_is_silent_when_not_verbose(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit([EarlyStopping(patience=1, restore_best_weights=True)], losses([0.3, 0.2, 0.25]))
    assert capsys.readouterr().out == ""
