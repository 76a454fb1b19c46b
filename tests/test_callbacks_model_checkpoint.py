"""ModelCheckpoint, on Keras 3.15's cases (keras/src/callbacks/model_checkpoint_test.py) and more."""

from __future__ import annotations

import ast
import math
import pathlib
import warnings

import pytest

from cli_output import cli_lines

from callback_helpers import fit, make_list
from checkpoint_helpers import at, every, fit_batches, saved_paths
from orchestrator.callbacks import ModelCheckpoint
from orchestrator.decisions import SaveModel


def logs_of(values, key="val_loss"):
    return [{key: v} for v in values]


def saved_epochs(run):
    """1-based epochs at whose end a SaveModel was returned."""
    return [e + 1 for e in range(run.epochs_run)
            if any(isinstance(d, SaveModel) for d in run.decisions[f"epoch_end:{e}"])]


# -- which epochs save ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "monitor, mode, save_best_only, values, epochs_saved",
    [
        # Keras cases 1-4: one epoch always saves, whatever the mode.
        ("val_loss", "auto", False, [0.5], [1]),
        ("val_loss", "min", False, [0.5], [1]),
        ("val_acc", "max", False, [0.5], [1]),
        ("val_acc", "max", True, [0.5], [1]),
        # Without save_best_only every epoch saves.
        ("val_loss", "auto", False, [0.5, 0.4, 0.45, 0.3], [1, 2, 3, 4]),
        # save_best_only saves improvements only, in the monitored direction.
        ("val_loss", "auto", True, [0.5, 0.4, 0.45, 0.3], [1, 2, 4]),
        ("val_loss", "min", True, [0.5, 0.4, 0.45, 0.3], [1, 2, 4]),
        ("val_loss", "max", True, [0.5, 0.4, 0.45, 0.6], [1, 4]),
        ("val_acc", "max", True, [0.5, 0.6, 0.55, 0.7], [1, 2, 4]),
        ("val_accuracy", "auto", True, [0.5, 0.6, 0.55, 0.7], [1, 2, 4]),
        ("loss", "auto", True, [1.0, 1.0, 0.9], [1, 3]),  # an equal value is no improvement
        # Keras starts from best=None, so even a first value of inf is an improvement.
        ("loss", "auto", True, [math.inf, 1.0], [1, 2]),
    ],
)
def test_model_checkpoint_saves_the_epochs_keras_saves(monitor, mode, save_best_only, values, epochs_saved):
    checkpoint = ModelCheckpoint("{epoch:02d}.pt", monitor=monitor, mode=mode, save_best_only=save_best_only)
    run = fit([checkpoint], logs_of(values, monitor))
    assert saved_epochs(run) == epochs_saved
    assert saved_paths(run.all()) == [f"{e:02d}.pt" for e in epochs_saved]


@pytest.mark.parametrize(
    "monitor, mode, threshold, values, epochs_saved",
    [
        ("val_acc", "max", -0.01, [0.3], [1]),  # Keras case 11
        ("val_loss", "auto", None, [0.3], [1]),  # Keras case 12
        ("val_loss", "min", 0, [0.3], []),  # Keras case 13
        ("val_loss", "auto", 0, [0.3], []),  # Keras case 14
        ("val_loss", "auto", 0.5, [0.6, 0.4, 0.45, 0.3], [2, 4]),
        ("val_acc", "max", 0.9, [0.6, 0.95, 0.7], [2]),
    ],
)
def test_model_checkpoint_saves_only_values_that_beat_initial_value_threshold(
    monitor, mode, threshold, values, epochs_saved
):
    checkpoint = ModelCheckpoint("{epoch:02d}.pt", monitor=monitor, mode=mode, save_best_only=True,
                                 initial_value_threshold=threshold)
    assert saved_epochs(fit([checkpoint], logs_of(values, monitor))) == epochs_saved


def test_model_checkpoint_warns_and_saves_anyway_when_the_monitor_is_missing_as_keras_3_15_does():
    checkpoint = ModelCheckpoint("{epoch:02d}.pt", monitor="val_loss", save_best_only=True)
    cl = make_list([checkpoint])
    assert checkpoint.on_epoch_end(0, {"val_loss": 0.5}) is not None
    with pytest.warns(UserWarning, match=r"^Can save best model only with val_loss available\.$"):
        made = cl.call("on_epoch_end", 1, {"loss": 0.4})
    assert made == [SaveModel(filepath="02.pt", weights_only=False, source="ModelCheckpoint")]
    assert checkpoint.best == 0.5  # the missing value changes nothing


def test_model_checkpoint_rejects_an_unknown_metric_in_auto_mode_before_training():
    # Keras raises the same error at the first epoch end.
    with pytest.raises(ValueError, match=r"monitor=unknown.*mode='max'"):
        make_list([ModelCheckpoint("m.pt", monitor="unknown", save_best_only=True)])


def test_model_checkpoint_returns_a_save_decision_with_weights_only_and_its_name():
    run = fit([ModelCheckpoint("w.pth", save_weights_only=True)], logs_of([0.5]))
    assert run.decisions["epoch_end:0"] == [SaveModel(filepath="w.pth", weights_only=True, delete=(),
                                                      source="ModelCheckpoint")]


# -- file names -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "filepath, logs, expected",
    [
        ("{epoch:02d}-{val_loss:.2f}.pt", {"val_loss": 0.12345}, "03-0.12.pt"),
        ("ckpt/e{epoch}-acc{val_accuracy:.3f}.pth", {"val_accuracy": 0.98765}, "ckpt/e3-acc0.988.pth"),
        ("s3://bucket/models/{epoch:03d}.pt", {}, "s3://bucket/models/003.pt"),
        ("best.pt", {"val_loss": 0.1}, "best.pt"),
    ],
)
def test_model_checkpoint_formats_the_filepath_with_the_1_based_epoch_and_the_logs(filepath, logs, expected):
    checkpoint = ModelCheckpoint(filepath, mode="min")
    make_list([checkpoint])
    assert checkpoint.on_epoch_end(2, dict(logs)).filepath == expected


@pytest.mark.parametrize(
    "filepath, logs, key",
    [
        ("{epoch:02d}-{val_loss:.2f}.pt", {"loss": 0.1}, "val_loss"),
        ("{epoch:02d}-{batch}.pt", {"val_loss": 0.1}, "batch"),  # no batch at epoch level
    ],
)
def test_model_checkpoint_raises_a_keras_key_error_naming_the_key_and_the_filepath(filepath, logs, key):
    checkpoint = ModelCheckpoint(filepath, monitor="loss")
    make_list([checkpoint])
    with pytest.raises(KeyError) as info:
        checkpoint.on_epoch_end(0, logs)
    message = info.value.args[0]
    assert message == f"Failed to format this callback filepath: \"{filepath}\". Reason: '{key}'"


def test_model_checkpoint_uses_a_logged_batch_value_instead_of_its_own_as_keras_does():
    checkpoint = ModelCheckpoint("{epoch}-{batch}.pt", monitor="loss", save_freq=1)
    make_list([checkpoint])
    checkpoint.on_epoch_begin(0)
    assert checkpoint.on_train_batch_end(4, {"loss": 1.0, "batch": 99}).filepath == "1-99.pt"


# -- save_freq as a number of batches --------------------------------------------------------


def test_model_checkpoint_saves_every_15_batches_across_epochs_of_5_like_keras_case_8():
    # Keras case 8a/8b: 5 batches an epoch and save_freq=15 save in epochs 3, 6 and 9.
    for sync in (every(1), every(15)):
        checkpoint = ModelCheckpoint("checkpoint.epoch{epoch:02d}.pt", monitor="val_acc", mode="max", save_freq=15)
        made = fit_batches([checkpoint], epochs=10, steps=5, sync=sync)
        assert [(e, s) for e, s, _ in made] == [(2, 4), (5, 4), (8, 4)]
        assert saved_paths(made) == ["checkpoint.epoch03.pt", "checkpoint.epoch06.pt", "checkpoint.epoch09.pt"]


def test_model_checkpoint_saves_every_batch_with_the_1_based_batch_in_the_name_like_keras_case_10():
    checkpoint = ModelCheckpoint("checkpoint.epoch{epoch:02d}batch{batch:02d}.pt", save_freq=1)
    made = fit_batches([checkpoint], epochs=5, steps=2, sync=every(1))
    assert saved_paths(made) == [f"checkpoint.epoch{e:02d}batch{b:02d}.pt" for e in range(1, 6) for b in (1, 2)]
    assert all(s is not None for _, s, _ in made)  # no saves at epoch end with an integer save_freq


@pytest.mark.parametrize(
    "sync, expected",
    [
        # Hooks after every batch (another callback syncs every step): Keras's own count.
        (every(1), ["01-2.pt", "02-1.pt", "02-3.pt", "03-2.pt"]),
        # The trainer's sync points (every 2 global steps) land exactly on Keras's saves.
        (every(2), ["01-2.pt", "02-1.pt", "02-3.pt", "03-2.pt"]),
        # Calls every 2 steps within each epoch (step index 1 only): the call in epoch 2 has
        # seen 3 batches (1 left in epoch 1 + 2), >= 2, so it saves; the count restarts there.
        (every(2, per="epoch"), ["01-2.pt", "02-2.pt", "03-2.pt"]),
        # Extra calls from non-finite losses add the batches since the previous call, not 1.
        (at([(0, 0), (1, 0), (1, 2), (2, 2)]), ["02-1.pt", "02-3.pt", "03-3.pt"]),
    ],
)
def test_model_checkpoint_counts_batches_between_sync_points_across_epoch_boundaries(sync, expected):
    checkpoint = ModelCheckpoint("{epoch:02d}-{batch}.pt", monitor="loss", save_freq=2)
    assert checkpoint.batch_sync_every == 2
    assert saved_paths(fit_batches([checkpoint], epochs=3, steps=3, sync=sync)) == expected


def test_model_checkpoint_counts_like_keras_when_the_steps_per_epoch_are_unknown():
    # Keras's rule: a batch index not above the last one seen starts a new epoch (batch + 1).
    checkpoint = ModelCheckpoint("{epoch}-{batch}.pt", monitor="loss", save_freq=4)
    checkpoint.set_params({})
    calls = [(0, 1), (0, 3), (1, 1), (1, 3)]
    made = []
    for epoch, batch in calls:
        checkpoint.on_epoch_begin(epoch)
        made.append(checkpoint.on_train_batch_end(batch, {"loss": 1.0}))
    assert saved_paths(made) == ["1-4.pt", "2-4.pt"]


def test_model_checkpoint_with_save_best_only_at_batch_level_compares_the_running_logs():
    checkpoint = ModelCheckpoint("{epoch}-{batch}.pt", monitor="loss", save_freq=1, save_best_only=True)
    losses = {(0, 0): 3.0, (0, 1): 2.0, (1, 0): 2.5, (1, 1): 1.0}
    made = fit_batches([checkpoint], epochs=2, steps=2, sync=every(1), batch_logs=lambda e, s: {"loss": losses[e, s]})
    assert saved_paths(made) == ["1-1.pt", "1-2.pt", "2-2.pt"]


def test_model_checkpoint_asks_for_batch_syncs_only_with_an_integer_save_freq():
    assert ModelCheckpoint("m.pt").batch_sync_every is None
    assert ModelCheckpoint("m.pt", save_freq=50).batch_sync_every == 50


# -- max_to_keep --------------------------------------------------------------------------


def deletions(run):
    return [(d.filepath, d.delete) for d in run.all() if isinstance(d, SaveModel)]


def test_model_checkpoint_max_to_keep_keeps_the_most_recent_files_without_save_best_only():
    run = fit([ModelCheckpoint("{epoch:02d}.pt", max_to_keep=2)], logs_of([0.5, 0.4, 0.45, 0.3]))
    assert deletions(run) == [("01.pt", ()), ("02.pt", ()), ("03.pt", ("01.pt",)), ("04.pt", ("02.pt",))]


def test_model_checkpoint_max_to_keep_keeps_the_best_files_by_monitored_value_with_save_best_only():
    checkpoint = ModelCheckpoint("{epoch:02d}.pt", save_best_only=True, max_to_keep=2)
    run = fit([checkpoint], logs_of([0.5, 0.4, 0.45, 0.3, 0.2]))
    assert deletions(run) == [("01.pt", ()), ("02.pt", ()), ("04.pt", ("01.pt",)), ("05.pt", ("02.pt",))]
    assert checkpoint.kept == [{"filepath": "04.pt", "value": 0.3}, {"filepath": "05.pt", "value": 0.2}]


def test_model_checkpoint_max_to_keep_drops_files_saved_without_a_monitored_value_first():
    checkpoint = ModelCheckpoint("{epoch:02d}.pt", monitor="val_accuracy", save_best_only=True, max_to_keep=2)
    with pytest.warns(UserWarning, match="Can save best model only with val_accuracy available"):
        run = fit([checkpoint], [{"val_accuracy": 0.5}, {"loss": 1.0}, {"val_accuracy": 0.6}, {"val_accuracy": 0.7}])
    assert deletions(run) == [("01.pt", ()), ("02.pt", ()), ("03.pt", ("02.pt",)), ("04.pt", ("01.pt",))]


@pytest.mark.parametrize(
    "filepath, save_best_only, values, expected",
    [
        # A fixed name replaces the kept file: nothing is ever deleted.
        ("best.pt", True, [0.5, 0.4, 0.3], [("best.pt", ())] * 3),
        ("last.pt", False, [0.5, 0.4, 0.3], [("last.pt", ())] * 3),
        # A name formatted again replaces its old self and becomes the most recent.
        ("{val_loss:.1f}.pt", False, [0.5, 0.4, 0.5, 0.3],
         [("0.5.pt", ()), ("0.4.pt", ()), ("0.5.pt", ()), ("0.3.pt", ("0.4.pt",))]),
    ],
)
def test_model_checkpoint_max_to_keep_never_deletes_the_file_it_writes(filepath, save_best_only, values, expected):
    run = fit([ModelCheckpoint(filepath, save_best_only=save_best_only, max_to_keep=1 if "{" not in filepath else 2)],
              logs_of(values))
    assert deletions(run) == expected


def test_model_checkpoint_max_to_keep_of_one_keeps_only_the_latest_best():
    run = fit([ModelCheckpoint("{epoch}.pt", save_best_only=True, max_to_keep=1)], logs_of([0.5, 0.6, 0.4]))
    assert deletions(run) == [("1.pt", ()), ("3.pt", ("1.pt",))]


# -- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"filepath": "checkpoint.keras"}, r"Received: filepath=checkpoint\.keras"),
        ({"filepath": "checkpoint.weights.h5", "save_weights_only": True}, r"checkpoint\.pt"),
        ({"filepath": "{epoch}"}, r"\.pt"),
        ({"save_freq": "invalid_save_freq"}, r"Unrecognized save_freq: invalid_save_freq"),  # Keras case 9
        ({"save_freq": 0}, "save_freq"),
        ({"save_freq": -5}, "save_freq"),
        ({"save_freq": 2.5}, "save_freq"),
        ({"save_freq": True}, "save_freq"),
        ({"max_to_keep": 0}, "max_to_keep"),
        ({"max_to_keep": -1}, "max_to_keep"),
        ({"max_to_keep": 1.5}, "max_to_keep"),
        ({"mode": "unknown"}, "mode"),
    ],
)
def test_model_checkpoint_rejects_invalid_arguments_naming_them(kwargs, match):
    kwargs = {"filepath": "m.pt", **kwargs}
    with pytest.raises(ValueError, match=match):
        ModelCheckpoint(**kwargs)


def test_model_checkpoint_message_for_a_keras_extension_says_what_to_change():
    with pytest.raises(ValueError) as info:
        ModelCheckpoint("ckpt/{epoch:02d}.keras")
    assert "`.pt` or `.pth`" in str(info.value) and "ckpt/{epoch:02d}.pt" in str(info.value)
    assert "Received: filepath=ckpt/{epoch:02d}.keras" in str(info.value)


def test_model_checkpoint_accepts_keras_case_9_save_freq_values_and_path_like_filepaths():
    ModelCheckpoint("m.pt", save_freq="epoch")
    ModelCheckpoint("m.pt", save_freq=3)
    assert ModelCheckpoint(pathlib.PurePosixPath("dir/m.pth")).filepath == "dir/m.pth"


# -- state, messages, layering ---------------------------------------------------------------


def test_model_checkpoint_resumes_from_its_state_dict_with_the_same_decisions():
    values = logs_of([0.5, 0.4, 0.45, 0.3, 0.35, 0.2])

    def make():
        return ModelCheckpoint("{epoch:02d}-{val_loss:.2f}.pt", save_best_only=True, max_to_keep=2)

    whole = fit([make()], values)
    first = make()
    fit([first], values[:3])
    state = first.state_dict()
    assert state == {
        "best": 0.4,
        "kept": [{"filepath": "01-0.50.pt", "value": 0.5}, {"filepath": "02-0.40.pt", "value": 0.4}],
        "batches_seen_since_last_saving": 0, "last_epoch_seen": None, "last_batch_seen": None,
    }
    resumed = make()
    cl = make_list([resumed])
    cl.load_state_dict([state])
    made = {e: cl.call("on_epoch_end", e, dict(values[e])) for e in range(3, 6)}
    assert made == {e: whole.decisions[f"epoch_end:{e}"] for e in range(3, 6)}


def test_model_checkpoint_resumes_its_batch_count_across_a_restart():
    def make():
        return ModelCheckpoint("{epoch}-{batch}.pt", monitor="loss", save_freq=4)

    whole = saved_paths(fit_batches([make()], epochs=3, steps=3, sync=every(2)))
    first = make()
    cl = make_list([first], epochs=3, steps=3)
    before = saved_paths(fit_batches(cl, epochs=1, steps=3, sync=every(2)))
    resumed = make()
    cl2 = make_list([resumed], epochs=3, steps=3)
    cl2.load_state_dict([first.state_dict()])
    after = saved_paths(fit_batches(cl2, epochs=3, steps=3, sync=every(2), start_epoch=1))
    assert before == []  # 2 batches counted, carried over in the state
    assert before + after == whole == ["2-1.pt", "3-2.pt"]


def test_model_checkpoint_prints_keras_messages_when_verbose(capsys):
    fit([ModelCheckpoint("{epoch:02d}.pt", save_best_only=True, verbose=1)], logs_of([0.5, 0.4, 0.45]))
    fit([ModelCheckpoint("{epoch:02d}.pt", verbose=1)], logs_of([0.5]))
    assert cli_lines(capsys.readouterr().out) == [
        "Epoch 1: val_loss improved from None to 0.50000, saving model to 01.pt",
        "Epoch 2: val_loss improved from 0.50000 to 0.40000, saving model to 02.pt",
        "Epoch 3: val_loss did not improve from 0.40000",
        "Epoch 1: saving model to 01.pt",
    ]


def test_model_checkpoint_is_silent_when_not_verbose(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit([ModelCheckpoint("{epoch:02d}.pt", save_best_only=True)], logs_of([0.5, 0.4, 0.45]))
    assert cli_lines(capsys.readouterr().out) == []


def test_model_checkpoint_module_imports_no_torch_ray_or_fsspec():
    import orchestrator.callbacks.model_checkpoint as module

    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"torch", "ray", "fsspec"}
