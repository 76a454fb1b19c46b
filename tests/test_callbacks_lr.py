"""ReduceLROnPlateau and LearningRateScheduler, on Keras 3's own cases and LR traces."""

from __future__ import annotations

import math
import operator

import pytest

from callback_helpers import fit, make_list, make_resumed_list
from orchestrator.callbacks import LearningRateScheduler, ReduceLROnPlateau
from orchestrator.decisions import SetLearningRate


def val_losses(values):
    return [{"val_loss": v} for v in values]


@pytest.mark.parametrize(
    "kwargs, values, expected_lrs",
    [
        # Keras test_reduces_lr_with_model_fit: min_delta=100 means no epoch after the first improves.
        ({"patience": 1, "factor": 0.1, "min_delta": 100}, [1.0, 0.9], [0.1, 0.01]),
        # Keras test_honors_min_lr.
        ({"patience": 1, "factor": 0.1, "min_delta": 10, "min_lr": 0.005}, [1.0] * 4,
         [0.1, 0.01, 0.005, 0.005]),
        # Keras test_cooldown: with cooldown=2 the rate drops every other epoch.
        ({"patience": 1, "factor": 0.1, "min_delta": 100, "cooldown": 2}, [1.0] * 4,
         [0.1, 0.01, 0.01, 0.001]),
        ({"patience": 2, "factor": 0.1, "min_delta": 0}, [1.0, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8],
         [0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001]),
        # Keras decrements the cooldown counter before checking it, so cooldown=1 never skips an epoch.
        ({"patience": 1, "factor": 0.5, "min_delta": 0, "cooldown": 1}, [1.0, 1.0, 1.0, 1.0, 0.5, 0.6],
         [0.1, 0.05, 0.025, 0.0125, 0.0125, 0.00625]),
        ({"patience": 1, "factor": 0.5, "min_delta": 0, "cooldown": 3}, [1.0] * 7,
         [0.1, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025]),
        ({"patience": 0, "factor": 0.5, "min_delta": 0}, [1.0, 0.9, 0.8], [0.1, 0.1, 0.1]),
        ({"patience": 0, "factor": 0.5, "min_delta": 0}, [1.0, 1.0, 1.0], [0.1, 0.05, 0.025]),
    ],
)
def test_reduce_lr_on_plateau_follows_keras_learning_rate_traces(kwargs, values, expected_lrs):
    run = fit([ReduceLROnPlateau(monitor="val_loss", **kwargs)], val_losses(values), lr=0.1)
    assert run.lrs == pytest.approx(expected_lrs)


def test_reduce_lr_on_plateau_does_not_reduce_again_once_at_min_lr():
    cb = ReduceLROnPlateau(patience=1, factor=0.1, min_delta=10, min_lr=0.005)
    run = fit([cb], val_losses([1.0] * 6), lr=0.1)
    sets = [d for d in run.all() if isinstance(d, SetLearningRate)]
    assert sets == [SetLearningRate(0.010000000000000002, "ReduceLROnPlateau"),
                    SetLearningRate(0.005, "ReduceLROnPlateau")]


def test_reduce_lr_on_plateau_logs_the_learning_rate_the_epoch_ran_with():
    run = fit([ReduceLROnPlateau(patience=1, min_delta=100)], val_losses([1.0, 0.9, 0.8]), lr=0.1)
    assert [logs["learning_rate"] for logs in run.logs] == pytest.approx([0.1, 0.1, 0.01])
    assert run.lrs == pytest.approx([0.1, 0.01, 0.001])


@pytest.mark.parametrize(
    "monitor, mode, values, expected_lrs",
    [
        ("val_accuracy", "auto", [0.5, 0.6, 0.6, 0.6], [0.1, 0.1, 0.1, 0.01]),
        ("val_accuracy", "min", [0.5, 0.6, 0.6, 0.6], [0.1, 0.1, 0.01, 0.01]),
        ("val_loss", "max", [0.5, 0.4, 0.4], [0.1, 0.1, 0.01]),
    ],
)
def test_reduce_lr_on_plateau_uses_the_monitor_direction(monitor, mode, values, expected_lrs):
    cb = ReduceLROnPlateau(monitor=monitor, mode=mode, patience=2, min_delta=0)
    run = fit([cb], [{monitor: v} for v in values], lr=0.1)
    assert run.lrs == pytest.approx(expected_lrs)
    assert cb.monitor_op is (operator.gt if (mode == "max" or (mode == "auto" and "acc" in monitor))
                             else operator.lt)


def test_reduce_lr_on_plateau_rejects_an_unknown_metric_in_auto_mode_at_validate():
    with pytest.raises(ValueError, match="ReduceLROnPlateau callback received monitor=f1"):
        make_list([ReduceLROnPlateau(monitor="f1")])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"factor": 1.0}, "does not support a factor >= 1.0. Received factor=1.0"),
        ({"factor": 2}, "factor"),
        ({"factor": -0.5}, "factor"),
        ({"patience": -1}, "patience"),
        ({"cooldown": -1}, "cooldown"),
        ({"min_lr": -1e-3}, "min_lr"),
        ({"mode": "up"}, "mode"),
    ],
)
def test_reduce_lr_on_plateau_rejects_invalid_arguments_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReduceLROnPlateau(**kwargs)


def test_reduce_lr_on_plateau_warns_and_keeps_the_rate_when_the_monitor_is_missing():
    cb = ReduceLROnPlateau(patience=0)
    with pytest.warns(UserWarning, match=r"`val_loss` which is not available. Available metrics are: "
                                         r"loss,learning_rate\."):
        run = fit([cb], [{"loss": 1.0}, {"loss": 1.0}], lr=0.1)
    assert run.lrs == [0.1, 0.1]


def test_reduce_lr_on_plateau_resumes_from_its_state_dict():
    first = ReduceLROnPlateau(patience=3, cooldown=2, min_delta=0)
    fit([first], val_losses([1.0, 1.0, 1.0, 1.0]), lr=0.1)
    state = first.state_dict()
    assert state == {"wait": 0, "cooldown_counter": 2, "best": 1.0}
    resumed = ReduceLROnPlateau(patience=3, cooldown=2, min_delta=0)
    resumed.on_train_begin()
    resumed.load_state_dict(state)
    assert (resumed.wait, resumed.cooldown_counter, resumed.best) == (0, 2, 1.0)


# Each row: (ReduceLROnPlateau arguments, monitored values, learning rate after each epoch), from
# keras/src/callbacks/reduce_lr_on_plateau.py at 3.15: _reset sets best = None at on_train_begin,
# _is_improvement(x, None) is True, and ops.less/ops.greater compare float32 tensors.
@pytest.mark.parametrize(
    "kwargs, values, expected_lrs",
    [
        # NaN is the best so far and nothing improves on it (from +inf, epoch 0 would already reduce).
        ({"patience": 1, "factor": 0.5, "min_delta": 0}, [math.nan, 1.0, 0.5], [0.1, 0.05, 0.025]),
        ({"patience": 1, "factor": 0.5, "min_delta": 0}, [math.inf, math.inf, 1.0], [0.1, 0.05, 0.05]),
        # 0.7 + 0.1 is 0.7999999999999999 in double precision, 0.8 in float32: no improvement at
        # epoch 1; 0.6 + 0.1 = 0.7 improves on 0.8 at epoch 2.
        ({"patience": 1, "factor": 0.5, "min_delta": 0.1}, [0.8, 0.7, 0.6], [0.1, 0.05, 0.05]),
        ({"patience": 1, "factor": 0.5, "min_delta": 0.1, "mode": "max"}, [0.7, 0.8, 0.9], [0.1, 0.05, 0.05]),
        # 0.99999999 rounds to 1.0 in float32.
        ({"patience": 1, "factor": 0.5, "min_delta": 0}, [1.0, 0.99999999, 0.9], [0.1, 0.05, 0.05]),
    ],
)
def test_reduce_lr_on_plateau_takes_the_first_value_as_best_and_compares_in_float32(kwargs, values, expected_lrs):
    run = fit([ReduceLROnPlateau(monitor="val_loss", **kwargs)], val_losses(values), lr=0.1)
    assert run.lrs == pytest.approx(expected_lrs)


def test_reduce_lr_on_plateau_starts_fresh_in_a_second_fit_with_the_same_instance():
    cb = ReduceLROnPlateau(patience=1, factor=0.5, min_delta=0, cooldown=3)
    assert fit([cb], val_losses([0.1, 0.1]), lr=0.1).lrs == pytest.approx([0.1, 0.05])
    assert (cb.best, cb.cooldown_counter) == (0.1, 3)
    # Keras's _reset: best, wait and cooldown start over, so 0.5 is the new best, not worse than 0.1.
    assert fit([cb], val_losses([0.5, 0.4]), lr=0.1).lrs == pytest.approx([0.1, 0.1])
    assert (cb.best, cb.wait, cb.cooldown_counter) == (0.4, 0, 0)


def test_reduce_lr_on_plateau_resumed_from_a_backup_keeps_the_best_value_of_the_backup():
    first = ReduceLROnPlateau(patience=2, factor=0.5, min_delta=0)
    fit([first], val_losses([1.0, 0.9, 0.9]), lr=0.1)
    assert first.state_dict() == {"wait": 1, "cooldown_counter": 0, "best": 0.9}
    # The resumed attempt's coordinator loads the backup after on_train_begin has reset the callback:
    # 0.95 does not improve on the backed-up 0.9, so the second epoch without improvement reduces.
    resumed = ReduceLROnPlateau(patience=2, factor=0.5, min_delta=0)
    run = fit(make_resumed_list([resumed], {"callbacks": [first.state_dict()]}, lr=0.1), val_losses([0.95]))
    assert run.lrs == pytest.approx([0.05])
    assert resumed.best == 0.9


def test_reduce_lr_on_plateau_prints_the_keras_message_when_verbose(capsys):
    fit([ReduceLROnPlateau(patience=1, min_delta=100, verbose=1)], val_losses([1.0, 0.9]), lr=0.1)
    assert "Epoch 2: ReduceLROnPlateau reducing learning rate to 0.01" in capsys.readouterr().out


# -- LearningRateScheduler --------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule, initial_lr, epochs, expected",
    [
        (lambda epoch: 1.0 / (2.0 + epoch), 0.01, 1, 0.5),  # Keras test_updates_learning_rate
        (lambda epoch, lr: lr / 2, 0.03, 2, 0.03 / 4.0),  # test_schedule_dependent_on_previous_lr
        (lambda epoch, lr: lr if epoch < 10 else lr * math.exp(-0.1), 0.01, 15, 0.00607),  # docstring
        (lambda epoch, lr=None: 0.2 * (epoch + 1), 0.01, 3, 0.6),
    ],
)
def test_learning_rate_scheduler_sets_the_scheduled_rate_in_both_call_forms(schedule, initial_lr, epochs, expected):
    run = fit([LearningRateScheduler(schedule)], [{"loss": 1.0}] * epochs, lr=initial_lr)
    assert round(run.lrs[-1], 5) == pytest.approx(expected)


def test_learning_rate_scheduler_records_the_rate_as_a_float_in_the_logs():
    run = fit([LearningRateScheduler(lambda epoch, lr: 0.5)], [{"loss": 1.0}], lr=0.1)
    assert run.logs[0]["learning_rate"] == 0.5 and type(run.logs[0]["learning_rate"]) is float
    assert run.decisions["epoch_begin:0"] == [SetLearningRate(0.5, source="LearningRateScheduler")]


@pytest.mark.parametrize("bad", [1, True, "0.1", None, [0.1]])
def test_learning_rate_scheduler_rejects_a_schedule_that_returns_no_float(bad):
    cb = LearningRateScheduler(lambda epoch, lr: bad)
    with pytest.raises(ValueError, match="The output of the `schedule` function should be a float. Got: "):
        cb.on_epoch_begin(0)


def test_learning_rate_scheduler_accepts_numpy_floats():
    np = pytest.importorskip("numpy")
    for value in (np.float32(0.25), np.float64(0.25)):
        assert LearningRateScheduler(lambda epoch, lr: value).on_epoch_begin(0).value == 0.25


@pytest.mark.parametrize("schedule", [None, 0.1, "cosine"])
def test_learning_rate_scheduler_rejects_a_non_callable_schedule(schedule):
    with pytest.raises(ValueError, match="schedule"):
        LearningRateScheduler(schedule)


def test_learning_rate_scheduler_prints_the_keras_message_when_verbose(capsys):
    fit([LearningRateScheduler(lambda epoch: 1.0 / (1.0 + epoch), verbose=1)], [{"loss": 1.0}])
    assert "Epoch 1: LearningRateScheduler setting learning rate to 1.0." in capsys.readouterr().out
