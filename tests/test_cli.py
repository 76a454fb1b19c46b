"""`orchestrator run TARGET` and `orchestrator status RUN_URL` (on the session's Ray cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.core.events import EventType
from orchestrator.storage.fs import StorageSpec
from orchestrator.storage.run_files import EventLog

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_cli_run_fits_the_example_then_status_prints_its_epochs_and_a_rerun_does_nothing(ray_cluster, capsys,
                                                                                         tmp_path):
    argv = ["run", str(ROOT / "examples" / "digits.py"), "--epochs", "2", "--storage", str(tmp_path),
            "--run-name", "cli-digits"]
    assert cli.main(argv) == cli.EXIT_FINISHED
    out = capsys.readouterr().out
    assert "Epoch 2/2" in out
    assert "finished:" in out and "val_accuracy=" in out
    assert cli.main(["status", f"{tmp_path}/cli-digits"]) == 0
    status = capsys.readouterr().out
    assert "status finished, attempts 1" in status
    assert "val_accuracy" in status and status.count("\n    2  ") == 1
    assert cli.main(argv) == cli.EXIT_FINISHED
    assert "already finished" in capsys.readouterr().out


@pytest.mark.timeout(180)
def test_cli_run_accepts_module_function_targets_with_set_overrides(ray_cluster, capsys, tmp_path):
    argv = ["run", "cli_target:make_trainer", "--set", "hidden=4", "--storage", str(tmp_path), "--epochs", "1",
            "--num-workers", "1"]
    assert cli.main(argv) == cli.EXIT_FINISHED
    assert (tmp_path / "cli-target" / "run.json").exists()
    assert '"num_workers": 1' in (tmp_path / "cli-target" / "run.json").read_text()


@pytest.mark.parametrize("argv,message", [
    (["run", "nope.py"], "nope.py is not a file"),
    (["run", "no_colon_here"], "TARGET must be a .py file or module:function"),
    (["run", "cli_target:missing"], "has no attribute 'missing'"),
    (["run", "cli_target:make_trainer", "--set", "oops"], "--set expects KEY=VALUE"),
    (["run", "cli_target:make_trainer", "--set", "depth=3"], "does not accept ['depth']"),
])
def test_cli_argument_errors_are_one_clear_line_with_exit_code_2(argv, message, capsys):
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_run_names_a_file_that_has_no_trainer(tmp_path, capsys):
    entry = tmp_path / "empty.py"
    entry.write_text("x = 1\n")
    assert cli.main(["run", str(entry)]) == cli.EXIT_USAGE
    assert "defines neither `trainer` nor `make_trainer" in capsys.readouterr().err


def test_cli_status_of_a_missing_run_says_so(tmp_path, capsys):
    assert cli.main(["status", f"{tmp_path}/nothing"]) == cli.EXIT_USAGE
    assert "run.json is missing" in capsys.readouterr().err


def test_cli_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert "75 preempted" in capsys.readouterr().out


def test_cli_status_reads_the_event_vocabulary_and_lists_epochs_the_newest_backup_and_decisions(tmp_path, capsys):
    storage = StorageSpec(str(tmp_path), "r").open()
    storage.write_json("run.json", {"status": "finished", "attempts": 2, "world_size": 2})
    first, second = EventLog(storage, attempt=1), EventLog(storage, attempt=2)
    first.append(EventType.STARTED, world_size=2)
    first.append(EventType.EPOCH_END, epoch=0, logs={"loss": 2.0, "learning_rate": 0.1})
    first.append(EventType.BACKUP_COMMITTED, epoch=0, step=4, folder="backup/step-4", bytes=1, purged=[])
    first.append(EventType.LR_CHANGED, epoch=0, step=-1, value=0.05, source="ReduceLROnPlateau")
    first.append(EventType.WORKER_FAILED, rank=1, node="n1", cause="died")
    second.append(EventType.RESTORED, epoch=0, step=4, folder="backup/step-4", phase="epoch_end")
    second.append(EventType.EPOCH_END, epoch=1, logs={"loss": 1.0, "learning_rate": 0.05})
    second.append(EventType.EARLY_STOPPING, epoch=1, step=-1, reason="early_stopping", source="EarlyStopping")
    second.append(EventType.CHECKPOINT_SAVED, epoch=1, step=-1, path="m.pt")
    with open(tmp_path / "r" / "events.jsonl", "a") as f:
        f.write('{"time": 1, "attempt": 2, "epoch": 1, "step": null, "type": "from_a_newer_version"}\n')

    assert cli.main(["status", f"{tmp_path}/r"]) == cli.EXIT_FINISHED
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("status finished, attempts 2, world size 2")
    assert out[1].split() == ["epoch", "loss", "learning_rate"]
    assert [line.split()[:2] for line in out[2:4]] == [["1", "2"], ["2", "1"]]
    assert out[4] == "newest committed backup: backup/step-4 (epoch 0, step 4)"
    assert [line.split()[:3] for line in out[5:]] == [
        ["attempt", "1:", "lr_changed"], ["attempt", "1:", "worker_failed"], ["attempt", "2:", "restored"],
        ["attempt", "2:", "early_stopping"]]
