"""CSVLogger: Keras 3.15's file format, written through the run storage, continuous across restarts.

The expected files of the Keras table were checked byte for byte against ``keras.callbacks.CSVLogger``
3.15 fed the same logs. Attempts are played as the coordinator plays them: each attempt gets a fresh
copy of the callback the driver holds (pickled, as Ray sends it), ``set_storage``, ``on_train_begin``,
then ``load_state_dict`` when it resumes from a backup.
"""

from __future__ import annotations

import math
import pickle
import warnings

import pytest

import restarted_run
from orchestrator.callbacks import CSVLogger
from orchestrator.storage.fs import StorageSpec
from s3_server import s3_bucket, s3_server

S3_FIXTURES = (s3_bucket, s3_server)  # imported for pytest, which finds fixtures by name

# -- helpers ------------------------------------------------------------------------------------


def storage_of(tmp_path, run_name="run"):
    return StorageSpec(str(tmp_path), run_name).open()


def attempt(cb, storage, epochs, restore=None, end=True):
    """One attempt on a fresh copy of ``cb``: train begin, (restore), the epochs given, (train end).

    ``epochs`` maps each epoch to its logs. Returns the copy, as the coordinator holds it.
    """
    live = pickle.loads(pickle.dumps(cb))
    live.set_storage(storage)
    live.on_train_begin({})
    if restore is not None:
        live.load_state_dict(restore)
    for epoch, logs in epochs.items():
        live.on_epoch_begin(epoch, {})
        live.on_epoch_end(epoch, dict(logs))
    if end:
        live.on_train_end({})
    return live


def text(storage, path="logs/log.csv"):
    return storage.read_bytes(path).decode()


def logs(epoch, run=0.0):
    """Distinct logs per epoch (and per run, to tell a replay from the original)."""
    return {"loss": 1.0 / (epoch + 1) + run, "val_loss": 2.0 + epoch + run, "learning_rate": 0.1}


def rows(*epochs, run=0.0):
    return "".join(f"{e},0.1,{1.0 / (e + 1) + run},{2.0 + e + run}\r\n" for e in epochs)


HEADER = "epoch,learning_rate,loss,val_loss\r\n"

# -- Keras's format ------------------------------------------------------------------------------

KERAS_CASES = [
    # (case, separator, logs per epoch, the file Keras 3.15 writes)
    ("keys sorted after epoch", ",",
     [{"val_loss": 0.7, "loss": 0.5, "learning_rate": 0.1}, {"loss": 0.25, "learning_rate": 0.1, "val_loss": 0.6}],
     "epoch,learning_rate,loss,val_loss\r\n0,0.1,0.5,0.7\r\n1,0.1,0.25,0.6\r\n"),
    ("separator", ";", [{"loss": 0.5, "val_loss": 0.7}],
     "epoch;loss;val_loss\r\n0;0.5;0.7\r\n"),
    ("tab separator", "\t", [{"loss": 0.5, "val_loss": 0.7}],
     "epoch\tloss\tval_loss\r\n0\t0.5\t0.7\r\n"),
    ("without val_ keys, Keras 3.15 adds a val_ column for each key", ",",
     [{"loss": 0.5, "learning_rate": 0.1}, {"loss": 0.4, "learning_rate": 0.05}],
     "epoch,learning_rate,loss,val_learning_rate,val_loss\r\n0,0.1,0.5,NA,NA\r\n1,0.05,0.4,NA,NA\r\n"),
    ("header fixed at the first epoch: NA for missing keys, new keys ignored", ",",
     [{"loss": 0.5, "val_loss": 1.0, "acc": 0.3}, {"loss": 0.4, "val_loss": 0.9},
      {"loss": 0.3, "val_loss": 0.8, "acc": 0.5, "new": 2.0}],
     "epoch,acc,loss,val_loss\r\n0,0.3,0.5,1.0\r\n1,NA,0.4,0.9\r\n2,0.5,0.3,0.8\r\n"),
    ("strings as is, iterables as a quoted list", "\t",
     [{"loss": 0.1, "val_loss": 0.2, "note": "a,b", "vec": [1, 2.5]}],
     'epoch\tloss\tnote\tval_loss\tvec\r\n0\t0.1\ta,b\t0.2\t"""[1, 2.5]"""\r\n'),
    ("values with str(): full float precision", ",",
     [{"loss": 0.1 + 0.2, "val_loss": 1e-20, "val_acc": 123456789.0}],
     "epoch,loss,val_acc,val_loss\r\n0,0.30000000000000004,123456789.0,1e-20\r\n"),
    ("non-finite values", ",", [{"loss": math.nan, "val_loss": math.inf, "x": -math.inf}],
     "epoch,loss,val_loss,x\r\n0,nan,inf,-inf\r\n"),
    ("empty logs: only the epoch", ",", [{}, {"loss": 1.0}],
     "epoch\r\n0\r\n1\r\n"),
    ("ints, bools and None", ",", [{"loss": 1, "val_loss": True, "z": None}],
     "epoch,loss,val_loss,z\r\n0,1,True,\r\n"),
]


@pytest.mark.parametrize("case,separator,epoch_logs,expected", KERAS_CASES, ids=[c[0] for c in KERAS_CASES])
def test_the_file_is_the_one_keras_writes(tmp_path, case, separator, epoch_logs, expected):
    storage = storage_of(tmp_path)
    attempt(CSVLogger("log.csv", separator=separator), storage, dict(enumerate(epoch_logs)))
    assert storage.read_bytes("logs/log.csv") == expected.encode()


@pytest.mark.parametrize("existing,expected", [
    (None, HEADER + rows(0, 1)),  # no file: a header
    ("", HEADER + rows(0, 1)),  # an empty file: a header
    ("a,b\r\n1,2\r\n", "a,b\r\n1,2\r\n" + rows(0, 1)),  # Keras appends without a header
    ("\n", "\n" + rows(0, 1)),  # Keras: a first line, even blank, means no header
    ("a,b", "a,b\r\n" + rows(0, 1)),  # beyond Keras: the last line ends before our rows
])
def test_append_keeps_the_file_and_writes_the_header_only_to_an_empty_one(tmp_path, existing, expected):
    path = tmp_path / "shared.csv"
    if existing is not None:
        path.write_bytes(existing.encode())
    attempt(CSVLogger(str(path), append=True), storage_of(tmp_path / "runs"), {0: logs(0), 1: logs(1)})
    assert path.read_bytes() == expected.encode()


def test_append_across_two_runs_writes_one_header(tmp_path):
    path = str(tmp_path / "shared.csv")
    cb = CSVLogger(path, append=True)
    attempt(cb, storage_of(tmp_path / "runs", "first"), {0: logs(0), 1: logs(1)})
    attempt(cb, storage_of(tmp_path / "runs", "second"), {0: logs(0, run=1), 1: logs(1, run=1)})
    assert (tmp_path / "shared.csv").read_bytes().decode() == HEADER + rows(0, 1) + rows(0, 1, run=1)


def test_without_append_the_file_is_overwritten_at_the_first_hook(tmp_path):
    storage = storage_of(tmp_path)
    storage.write_bytes("logs/log.csv", b"old content\r\n")
    live = attempt(CSVLogger("log.csv"), storage, {}, end=False)
    assert text(storage) == "old content\r\n"  # nothing written before the first hook that may follow a restore
    live.on_epoch_begin(0, {})
    assert text(storage) == ""  # Keras truncates at train begin
    live.on_epoch_end(0, logs(0))
    assert text(storage) == HEADER + rows(0)


# -- where the file goes -----------------------------------------------------------------------


def test_a_relative_filename_lands_under_the_run_logs_folder(tmp_path):
    storage = storage_of(tmp_path, "digits")
    attempt(CSVLogger("sub/log.csv"), storage, {0: logs(0)})
    assert (tmp_path / "digits" / "logs" / "sub" / "log.csv").read_bytes().decode() == HEADER + rows(0)


@pytest.mark.parametrize("as_url", [False, True])
def test_an_absolute_path_or_file_url_is_used_as_is(tmp_path, as_url):
    target = tmp_path / "elsewhere" / "log.csv"
    attempt(CSVLogger(f"file://{target}" if as_url else str(target)), storage_of(tmp_path / "runs"), {0: logs(0)})
    assert target.read_bytes().decode() == HEADER + rows(0)


def test_a_url_on_another_filesystem_than_the_run_fails_at_train_begin_naming_the_callback(tmp_path):
    live = CSVLogger("memory://elsewhere/log.csv")
    live.set_storage(storage_of(tmp_path))
    with pytest.raises(ValueError, match=r"CSVLogger: filename cannot be written: .*memory"):
        live.on_train_begin({})


def test_without_a_run_storage_the_filename_is_written_as_given(tmp_path):
    target = tmp_path / "plain.csv"
    attempt(CSVLogger(str(target)), None, {0: logs(0)})
    assert target.read_bytes().decode() == HEADER + rows(0)


def test_loading_a_state_outside_training_writes_nothing(tmp_path):
    # the driver loads the final state into the user's callback after fit: it must not write a file there
    live = attempt(CSVLogger("log.csv"), storage_of(tmp_path), {0: logs(0)})
    driver_copy = CSVLogger(str(tmp_path / "driver.csv"))
    driver_copy.load_state_dict(live.state_dict())
    assert not (tmp_path / "driver.csv").exists()
    assert driver_copy.rows == live.rows


@pytest.mark.parametrize("kwargs,match", [
    (dict(filename=""), "filename must be a non-empty path"),
    (dict(filename="   "), "filename must be a non-empty path"),
    (dict(filename=None), "filename must be a non-empty path"),
    (dict(filename=3), "filename must be a non-empty path"),
    (dict(filename="../../outside.csv"), "must name a file inside the run directory"),
    (dict(filename="log.csv", separator=""), "separator must be one character"),
    (dict(filename="log.csv", separator=";;"), "separator must be one character"),
    (dict(filename="log.csv", separator=1), "separator must be one character"),
    (dict(filename="log.csv", separator='"'), "cannot separate CSV values"),
    (dict(filename="log.csv", append="yes"), "append must be True or False"),
])
def test_bad_arguments_raise_a_clear_error_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=f"CSVLogger: .*{match}"):
        CSVLogger(**kwargs)


# -- continuity across restarts, resumes and rollbacks --------------------------------------------


def test_a_rollback_replaces_the_rows_of_the_rolled_back_epochs(tmp_path):
    storage = storage_of(tmp_path)
    live = attempt(CSVLogger("log.csv"), storage, {0: logs(0), 1: logs(1)}, end=False)
    backup = pickle.loads(pickle.dumps(live.state_dict()))  # the state a backup after epoch 1 holds
    for epoch in (2, 3):
        live.on_epoch_begin(epoch, {})
        live.on_epoch_end(epoch, logs(epoch))
    assert text(storage) == HEADER + rows(0, 1, 2, 3)
    live.load_state_dict(backup)  # RollbackOnNaN: the coordinator reloads every callback's state
    assert text(storage) == HEADER + rows(0, 1)  # the rolled-back epochs are gone at once
    for epoch in (2, 3):
        live.on_epoch_begin(epoch, {})
        live.on_epoch_end(epoch, logs(epoch, run=1))
    live.on_train_end({})
    assert text(storage) == HEADER + rows(0, 1) + rows(2, 3, run=1)


def test_a_rollback_to_a_mid_epoch_backup_replaces_the_replayed_epoch_row(tmp_path):
    storage = storage_of(tmp_path)
    live = attempt(CSVLogger("log.csv"), storage, {0: logs(0)}, end=False)
    backup = live.state_dict()  # mid-epoch 1
    live.on_epoch_begin(1, {})
    live.on_epoch_end(1, logs(1))
    live.load_state_dict(backup)
    live.on_epoch_end(1, logs(1, run=1))  # the replay of epoch 1 ends; no epoch_begin for a resumed epoch
    assert text(storage) == HEADER + rows(0) + rows(1, run=1)


@pytest.mark.parametrize("append", [False, True])
def test_a_resume_from_a_backup_writes_each_epoch_once(tmp_path, append):
    storage = storage_of(tmp_path)
    prior = "prior,content\r\n" if append else ""
    storage.write_bytes("logs/log.csv", prior.encode())
    cb = CSVLogger("log.csv", append=append)
    first = attempt(cb, storage, {0: logs(0)}, end=False)
    backup = first.state_dict()  # committed during epoch 1
    first.on_epoch_begin(1, {})
    first.on_epoch_end(1, logs(1))
    first.on_epoch_begin(2, {})  # a worker dies here: no train end
    assert text(storage) == prior + ("" if append else HEADER) + rows(0, 1)
    attempt(cb, storage, {1: logs(1, run=1), 2: logs(2, run=1)}, restore=backup)
    assert text(storage) == prior + ("" if append else HEADER) + rows(0) + rows(1, 2, run=1)


def test_an_attempt_from_scratch_with_append_does_not_keep_the_failed_attempts_rows(tmp_path):
    storage = storage_of(tmp_path)
    storage.write_bytes("logs/log.csv", b"earlier run\r\n")
    cb = CSVLogger("log.csv", append=True)
    attempt(cb, storage, {0: logs(0), 1: logs(1)}, end=False)  # fails before any backup
    assert text(storage) == "earlier run\r\n" + rows(0, 1)
    # the next attempt (a restart, or a resubmission with the same run_name) starts from scratch
    attempt(cb, storage, {0: logs(0, run=1), 1: logs(1, run=1), 2: logs(2, run=1)})
    assert text(storage) == "earlier run\r\n" + rows(0, 1, 2, run=1)


def test_an_attempt_from_scratch_with_append_to_a_new_file_writes_one_header(tmp_path):
    storage = storage_of(tmp_path)
    cb = CSVLogger("log.csv", append=True)
    attempt(cb, storage, {0: logs(0)}, end=False)
    attempt(cb, storage, {0: logs(0, run=1), 1: logs(1, run=1)})
    assert text(storage) == HEADER + rows(0, 1, run=1)


def test_a_failed_write_warns_and_the_next_epoch_writes_the_whole_file(tmp_path):
    storage = storage_of(tmp_path)
    live = attempt(CSVLogger("log.csv"), storage, {0: logs(0)}, end=False)
    blocker = tmp_path / "run" / "logs" / "log.csv"
    blocker.unlink()
    blocker.mkdir()  # a directory where the file goes: the next write fails
    with pytest.warns(UserWarning, match="CSVLogger could not write 'log.csv'.*written whole again"):
        live.on_epoch_end(1, logs(1))
    blocker.rmdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        live.on_epoch_begin(2, {})  # the pending write happens at the next hook
    assert text(storage) == HEADER + rows(0, 1)


# -- object stores -------------------------------------------------------------------------------


def test_on_s3_the_file_is_rewritten_whole_and_survives_a_resume(s3_server, s3_bucket):
    options = s3_server.storage_options()
    storage = StorageSpec(f"s3://{s3_bucket}/runs", "run", options).open()
    cb = CSVLogger("log.csv")
    first = attempt(cb, storage, {0: logs(0), 1: logs(1)}, end=False)
    backup = first.state_dict()
    first.on_epoch_end(2, logs(2))
    attempt(cb, storage, {2: logs(2, run=1), 3: logs(3, run=1)}, restore=backup)
    assert text(storage) == HEADER + rows(0, 1) + rows(2, 3, run=1)


def test_on_s3_append_to_an_absolute_url_across_runs(s3_server, s3_bucket):
    options = s3_server.storage_options()
    url = f"s3://{s3_bucket}/shared/log.csv"
    cb = CSVLogger(url, append=True)
    first = StorageSpec(f"s3://{s3_bucket}/runs", "first", options).open()
    attempt(cb, first, {0: logs(0)})
    second = StorageSpec(f"s3://{s3_bucket}/runs", "second", options).open()
    attempt(cb, second, {0: logs(0, run=1)}, end=False)  # fails, then restarts from scratch
    attempt(cb, second, {0: logs(0, run=2), 1: logs(1, run=2)})
    assert second.read_bytes(url).decode() == HEADER + rows(0) + rows(0, 1, run=2)


# -- a real fit ----------------------------------------------------------------------------------


def test_a_run_resumed_after_a_worker_failure_writes_the_csv_of_an_uninterrupted_run(restarted_runs):
    # restarted_run.py: both runs append to a file with earlier content; rank 1 raises at its 11th training
    # call (epoch 1, batch 4 of 7) and the group restarts from a backup
    reference, resumed = restarted_runs.reference, restarted_runs.faulty
    assert not restarted_runs.flag_left  # the failure did happen
    events = restarted_runs.events("faulty")
    assert [e["attempt"] for e in events if e["type"] == "restored"] == [2]  # attempt 2 resumed from a backup
    assert resumed.history == reference.history
    resumed_csv = restarted_runs.csv("faulty").read_bytes()
    assert resumed_csv == restarted_runs.csv("reference").read_bytes()
    lines = resumed_csv.decode().split("\r\n")
    assert lines[:2] == ["epoch,note", "-1,from an earlier run"]
    assert restarted_run.PRIOR_CSV == b"epoch,note\r\n-1,from an earlier run\r\n"
    assert [line.split(",")[0] for line in lines[2:-1]] == ["0", "1", "2"]
    assert float(lines[3].split(",")[2]) == reference.history["loss"][1]
