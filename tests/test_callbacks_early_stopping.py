"""EarlyStopping, on Keras 3's own cases (keras/src/callbacks/early_stopping_test.py) and more."""

from __future__ import annotations

import math
import operator
import warnings

import pytest

from cli_output import cli_lines

from callback_helpers import fit, make_list, restored_epochs
from orchestrator.callbacks import Callback, CallbackList, EarlyStopping, ReduceLROnPlateau
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
    assert stopper.best is None  # Keras: the first monitored value becomes the best


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
    assert cli_lines(capsys.readouterr().out) == []


# -- Keras's best = None and float32 comparisons ------------------------------------------------
# Each row: (monitor, EarlyStopping arguments, monitored values, Keras's stopped_epoch (0: not
# stopped, all epochs run), best epoch, epoch whose weights are restored or None). Checked against keras/src/callbacks/early_stopping.py at 3.15:
# on_train_begin sets best = None, _is_improvement(x, None) is True, and ops.less/ops.greater
# compare float32 tensors (x - min_delta is computed on Python floats first).


def check_trace(monitor, kwargs, values, stopped_epoch, best_epoch, restored):
    stopper = EarlyStopping(monitor=monitor, **kwargs)
    run = fit([stopper], losses(values, monitor))
    assert run.epochs_run == (stopped_epoch + 1 if stopped_epoch else len(values))
    assert (run.stopped, stopper.stopped_epoch) == (stopped_epoch > 0, stopped_epoch)
    assert stopper.best_epoch == best_epoch
    assert restored_epochs(run) == ({} if restored is None else {stopper.weights_key: restored})


@pytest.mark.parametrize(
    "monitor, kwargs, values, stopped_epoch, best_epoch, restored",
    [
        # The case: NaN is the best so far and nothing improves on it, so patience=1 stops at
        # epoch 1 and epoch 0's weights come back (starting from +inf, all 3 epochs would run).
        ("loss", {"patience": 1, "restore_best_weights": True}, [math.nan, 1.0, 0.5], 1, 0, 0),
        ("loss", {"patience": 2, "restore_best_weights": True}, [math.nan, 1.0, 0.5, 0.4], 2, 0, 0),
        ("loss", {"patience": 1, "restore_best_weights": True}, [math.inf, 2.0, 1.0], 0, 2, 2),
        ("accuracy", {"patience": 1, "restore_best_weights": True}, [-math.inf, 0.5, 0.6], 0, 2, 2),
        # The baseline is not the initial best: the first value is, even when worse than the baseline;
        # it restarts the count only when it also beats the baseline (NaN never does).
        ("loss", {"patience": 2, "baseline": 0.5, "restore_best_weights": True}, [math.nan, 0.4, 0.3], 1, 0, 0),
        ("loss", {"patience": 2, "baseline": 0.5, "restore_best_weights": True}, [0.9, 0.4, 0.45, 0.45], 3, 1, 1),
        ("loss", {"patience": 2, "baseline": 0.5, "restore_best_weights": True}, [0.9, 0.95, 0.96], 1, 0, 0),
        # The first monitored epoch after start_from_epoch is the best so far, whatever its value.
        ("loss", {"patience": 1, "start_from_epoch": 1, "restore_best_weights": True},
         [0.1, math.nan, 0.05], 2, 1, 1),
    ],
)
def test_early_stopping_takes_the_first_monitored_value_as_best_even_when_it_is_nan_or_inf(
    monitor, kwargs, values, stopped_epoch, best_epoch, restored
):
    check_trace(monitor, kwargs, values, stopped_epoch, best_epoch, restored)


@pytest.mark.parametrize(
    "monitor, kwargs, values, stopped_epoch, best_epoch, restored",
    [
        # 0.7 + 0.1 is 0.7999999999999999 in double precision, 0.8 in float32: not an improvement.
        ("loss", {"patience": 1, "min_delta": 0.1}, [0.8, 0.7, 0.6], 1, 0, None),
        # 0.8 - 0.1 is 0.7000000000000001 in double precision, 0.7 in float32.
        ("accuracy", {"patience": 1, "min_delta": 0.1}, [0.7, 0.8, 0.9], 1, 0, None),
        # 0.5 + 0.1 is exactly 0.6 in both precisions: a change of exactly min_delta never counts.
        ("loss", {"patience": 1, "min_delta": 0.1}, [0.6, 0.5, 0.4], 1, 0, None),
        # 0.99999999 rounds to 1.0 in float32, 0.9999999 and 0.9999998 do not.
        ("loss", {"patience": 1, "restore_best_weights": True}, [1.0, 0.99999999, 0.9], 1, 0, 0),
        ("loss", {"patience": 1, "restore_best_weights": True}, [1.0, 0.9999999, 0.9999998], 0, 2, 2),
    ],
)
def test_early_stopping_compares_values_in_float32_as_keras_does(
    monitor, kwargs, values, stopped_epoch, best_epoch, restored
):
    check_trace(monitor, kwargs, values, stopped_epoch, best_epoch, restored)


# -- one snapshot per instance ------------------------------------------------------------------


def test_two_early_stoppings_on_the_same_monitor_each_restore_their_own_best_weights():
    # Both watch loss; the second starts at epoch 2, so its best epoch is 3 while the first's is 0.
    first = EarlyStopping(monitor="loss", patience=5, restore_best_weights=True)
    second = EarlyStopping(monitor="loss", patience=5, restore_best_weights=True, start_from_epoch=2)
    run = fit([first, second], losses([0.5, 0.9, 0.8, 0.7, 0.75, 0.76], "loss"))
    assert (first.best_epoch, second.best_epoch) == (0, 3)
    assert first.weights_key != second.weights_key
    assert run.decisions["train_end"] == [RestoreWeights(first.weights_key), RestoreWeights(second.weights_key)]
    assert restored_epochs(run) == {first.weights_key: 0, second.weights_key: 3}


def user_callbacks():
    return [ReduceLROnPlateau(monitor="loss"), EarlyStopping(monitor="loss", restore_best_weights=True),
            EarlyStopping(monitor="loss", patience=2, restore_best_weights=True)]


def test_early_stopping_weights_keys_are_the_same_in_a_resumed_attempt_built_from_the_same_callbacks():
    attempt = user_callbacks()
    make_list(attempt)
    resumed = user_callbacks()
    make_list(resumed)
    keys = [cb.weights_key for cb in attempt[1:]]
    assert keys == [cb.weights_key for cb in resumed[1:]]
    assert len(set(keys)) == 2
    assert [cb.position for cb in attempt] == [0, 1, 2]


# -- CallbackList.running ---------------------------------------------------------------------


class Probe(Callback):
    """Records what its CallbackList says is running while its hooks run."""

    def __init__(self) -> None:
        super().__init__()
        self.callbacks: CallbackList | None = None
        self.seen: list[tuple[str, str] | None] = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(self.callbacks.running)

    def on_train_end(self, logs=None):
        self.seen.append(self.callbacks.running)
        raise RuntimeError("boom")


def test_callback_list_names_the_running_callback_and_hook_and_clears_it_after():
    probe = Probe()
    cl = CallbackList([EarlyStopping(monitor="loss"), probe])
    probe.callbacks = cl
    assert cl.running is None
    cl.call("on_epoch_end", 0, {"loss": 1.0})
    assert (probe.seen, cl.running) == ([("Probe", "on_epoch_end")], None)
    with pytest.raises(RuntimeError, match="boom"):
        cl.call("on_train_end", {})
    assert (probe.seen[-1], cl.running) == (("Probe", "on_train_end"), None)
