"""TerminateOnNaN, LambdaCallback, History, ProgbarLogger and CallbackList ordering."""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli_output import cli_lines

from callback_helpers import fit, make_list
from orchestrator.callbacks import (
    Callback,
    History,
    LambdaCallback,
    LearningRateScheduler,
    ProgbarLogger,
    ReduceLROnPlateau,
    TerminateOnNaN,
)
from orchestrator.callbacks.progbar_logger import format_value
from orchestrator.decisions import SetLearningRate, StopTraining

NAN_STOP = StopTraining(reason="nan_detected", source="TerminateOnNaN")
ROOT = Path(__file__).resolve().parents[1]


# -- TerminateOnNaN ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_terminate_on_nan_stops_on_a_non_finite_batch_loss(loss, capsys):
    assert TerminateOnNaN().on_train_batch_end(3, {"loss": loss}) == NAN_STOP
    assert cli_lines(capsys.readouterr().out) == ["Batch 3: Invalid loss, terminating training"]


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_terminate_on_nan_with_raise_error_raises_runtime_error(loss):
    with pytest.raises(RuntimeError, match="NaN or Inf loss encountered at batch 5"):
        TerminateOnNaN(raise_error=True).on_train_batch_end(5, {"loss": loss})


@pytest.mark.parametrize("logs", [{"loss": 0.3}, {"loss": 0.0}, {"accuracy": math.nan}, {}, None])
def test_terminate_on_nan_lets_finite_or_missing_losses_pass(logs):
    for raise_error in (False, True):
        cb = TerminateOnNaN(raise_error=raise_error)
        assert cb.on_train_batch_end(0, logs) is None
        assert cb.on_epoch_end(0, logs) is None


def test_terminate_on_nan_also_stops_on_a_non_finite_epoch_loss_and_needs_no_batch_sync():
    cb = TerminateOnNaN()
    assert cb.batch_sync_every is None
    run = fit([cb], [{"loss": 1.0}, {"loss": math.nan}, {"loss": 1.0}])
    assert run.epochs_run == 2 and run.decisions["epoch_end:1"] == [NAN_STOP]


# -- LambdaCallback ---------------------------------------------------------------------------


def test_lambda_callback_calls_each_function_with_keras_positional_arguments():
    calls = []
    cb = LambdaCallback(
        on_train_begin=lambda logs: calls.append(("train_begin", logs)),
        on_epoch_begin=lambda epoch, logs: calls.append(("epoch_begin", epoch)),
        on_epoch_end=lambda epoch, logs: calls.append(("epoch_end", epoch, logs["loss"])),
        on_train_end=lambda logs: calls.append(("train_end", logs.get("loss"))),  # Keras: the last epoch's logs
        on_test_begin=lambda logs: calls.append(("test_begin",)),
    )
    fit([cb], [{"loss": 0.5}, {"loss": 0.4}])
    cb.on_test_begin()
    assert calls == [("train_begin", {}), ("epoch_begin", 0), ("epoch_end", 0, 0.5), ("epoch_begin", 1),
                     ("epoch_end", 1, 0.4), ("train_end", 0.4), ("test_begin",)]


def test_lambda_callback_passes_decisions_through_and_ignores_other_return_values():
    cb = LambdaCallback(
        on_epoch_begin=lambda epoch, logs: print("epoch", epoch),
        on_epoch_end=lambda epoch, logs: StopTraining("target", "lambda") if logs["acc"] > 0.9 else "x",
        on_train_begin=lambda logs: [SetLearningRate(0.5, "lambda"), None, 3],
        on_train_end=lambda logs: [None, None],
    )
    run = fit([cb], [{"acc": 0.5}, {"acc": 0.95}, {"acc": 0.99}])
    assert run.decisions["train_begin"] == [SetLearningRate(0.5, "lambda")]
    assert run.epochs_run == 2 and run.decisions["epoch_end:1"] == [StopTraining("target", "lambda")]
    assert run.all() == [SetLearningRate(0.5, "lambda"), StopTraining("target", "lambda")]


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, None),
        ({"on_epoch_end": lambda e, logs: None}, None),
        ({"on_train_batch_begin": lambda b, logs: None}, 1),
        ({"on_train_batch_end": lambda b, logs: None}, 1),
        ({"on_batch_end": lambda b, logs: None}, 1),
    ],
)
def test_lambda_callback_asks_for_a_batch_sync_every_step_only_when_given_a_batch_function(kwargs, expected):
    assert LambdaCallback(**kwargs).batch_sync_every == expected


def test_lambda_callback_batch_functions_receive_the_batch_index_and_logs():
    seen = []
    cb = LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append((batch, logs)),
                        on_batch_begin=lambda batch, logs: seen.append(("begin", batch)))
    cl = make_list([cb])
    cl.call("on_train_batch_begin", 0, {})
    cl.call("on_train_batch_end", 0, {"loss": 1.0})
    assert seen == [("begin", 0), (0, {"loss": 1.0})]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"custom_method": lambda logs: None}, "custom_method"),
        ({"on_predict_begin": lambda logs: None}, "on_predict_begin"),
        ({"on_epoch_end": "print"}, "on_epoch_end"),
        ({"on_test_end": 3}, "on_test_end"),
    ],
)
def test_lambda_callback_rejects_unknown_hooks_and_non_callables_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LambdaCallback(**kwargs)


# -- History ------------------------------------------------------------------------------------


def test_history_records_every_log_key_per_epoch_and_runs_on_the_driver():
    history = History()
    assert history.runs_on == "driver" and history.model is None
    fit([history], [{"loss": 0.5, "val_loss": 0.6}, {"loss": 0.4, "val_loss": 0.55}])
    assert history.epoch == [0, 1]
    assert history.history == {"loss": [0.5, 0.4], "val_loss": [0.6, 0.55]}


def test_history_restarts_epochs_but_keeps_values_when_reused_as_in_keras_3():
    history = History()
    fit([history], [{"loss": 0.5}])
    fit([history], [{"loss": 0.4}, {"loss": 0.3}])
    assert history.epoch == [0, 1]
    assert history.history == {"loss": [0.5, 0.4, 0.3]}


def test_history_state_dict_round_trips_without_sharing_lists():
    history = History()
    fit([history], [{"loss": 0.5}, {"loss": 0.4}])
    state = history.state_dict()
    restored = History()
    restored.load_state_dict(state)
    restored.on_epoch_end(2, {"loss": 0.3})
    assert restored.epoch == [0, 1, 2] and restored.history == {"loss": [0.5, 0.4, 0.3]}
    assert history.history == {"loss": [0.5, 0.4]}


# -- ProgbarLogger ------------------------------------------------------------------------------

LOGS = {"loss": 0.12341, "val_loss": 0.23449, "learning_rate": 0.1}


def drive_progbar(stream, verbose, epochs=3, steps=4):
    logger = ProgbarLogger(stream=stream)
    logger.set_params({"epochs": epochs, "steps": steps, "verbose": verbose})
    logger.on_train_begin()
    for epoch in range(epochs):
        logger.on_epoch_begin(epoch)
        for batch in range(steps):
            logger.on_train_batch_end(batch, {"loss": 0.5})
        logger.on_epoch_end(epoch, dict(LOGS))
    logger.on_train_end()
    return stream.getvalue()


@pytest.mark.parametrize("verbose", ["auto", 1, 2])
def test_progbar_logger_prints_exactly_one_line_per_epoch_when_not_a_tty(verbose):
    lines = drive_progbar(io.StringIO(), verbose).splitlines()
    assert len(lines) == 3
    for epoch, line in enumerate(lines, start=1):
        assert re.fullmatch(rf"Epoch {epoch}/3 - \d+\.\ds - loss: 0\.1234 - val_loss: 0\.2345 - "
                            r"learning_rate: 0\.1000", line), line


def test_progbar_logger_prints_nothing_at_verbose_zero():
    assert drive_progbar(io.StringIO(), 0) == ""


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progbar_logger_draws_a_bar_per_epoch_on_a_tty():
    out = drive_progbar(FakeTTY(), "auto", epochs=2, steps=4)
    assert "Epoch 1/2" in out and "Epoch 2/2" in out and "4/4" in out
    assert "val_loss=" in out or "val_loss: 0.2345" in out


def test_progbar_logger_verbose_two_prints_lines_even_on_a_tty():
    lines = drive_progbar(FakeTTY(), 2, epochs=2).splitlines()
    assert [line.split(" - ")[0] for line in lines] == ["Epoch 1/2", "Epoch 2/2"]


@pytest.mark.parametrize(
    "value, text",
    [(0.12345, "0.1235"), (12.0, "12.0000"), (1e-5, "1.0000e-05"), (0.0, "0.0000e+00"), (math.nan, "nan"),
     (3, "3.0000"), ("adam", "adam")],
)
def test_progbar_logger_formats_numbers_like_keras(value, text):
    assert format_value(value) == text


def test_progbar_logger_writes_to_sys_stdout_as_it_is_at_call_time(capsys):
    logger = ProgbarLogger()
    logger.set_params({"epochs": 1, "steps": 1, "verbose": 2})
    logger.on_epoch_end(0, {"loss": 1.0})
    assert capsys.readouterr().out.startswith("Epoch 1/1 - ")


# -- CallbackList ordering and import hygiene -----------------------------------------------------


def test_callback_list_lets_a_later_callback_see_the_rate_an_earlier_one_set():
    seen = []
    watcher = LambdaCallback(on_epoch_begin=lambda epoch, logs: seen.append(watcher.trainer.learning_rate))
    fit([LearningRateScheduler(lambda epoch, lr: 0.5 / (epoch + 1)), watcher], [{"loss": 1.0}] * 2, lr=0.1)
    assert seen == [0.5, 0.25]

    seen.clear()
    fit([watcher, LearningRateScheduler(lambda epoch, lr: 0.5 / (epoch + 1))], [{"loss": 1.0}] * 2, lr=0.1)
    assert seen == [0.1, 0.5]


def test_callback_list_logs_the_rate_before_a_reduction_decided_in_the_same_hook():
    run = fit([LearningRateScheduler(lambda epoch, lr: lr), ReduceLROnPlateau(patience=0, min_delta=0)],
              [{"val_loss": 1.0}, {"val_loss": 1.0}], lr=0.1)
    assert [logs["learning_rate"] for logs in run.logs] == pytest.approx([0.1, 0.1])
    assert run.lrs == pytest.approx([0.1, 0.01])


def test_callback_hooks_may_return_decisions_to_a_callback_list():
    class Stopper(Callback):
        def on_epoch_end(self, epoch, logs=None):
            return StopTraining("custom", self.name) if epoch == 1 else None

    run = fit([Stopper()], [{"loss": 1.0}] * 5)
    assert run.epochs_run == 2 and run.all() == [StopTraining("custom", "Stopper")]


def test_importing_orchestrator_callbacks_loads_neither_torch_nor_ray():
    code = ("import sys, orchestrator.callbacks; "
            "print(sorted(m for m in ('torch', 'ray', 'numpy', 'tqdm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_progbar_logger_on_a_tty_still_shows_an_epoch_it_got_no_batch_reports_for():
    logger = ProgbarLogger(stream=FakeTTY())
    logger.set_params({"epochs": 2, "steps": 3, "verbose": 1})
    logger.on_epoch_end(1, {"loss": 0.25})
    out = logger.stream.getvalue()
    assert "Epoch 2/2" in out and "3/3" in out and "loss: 0.2500" in out
