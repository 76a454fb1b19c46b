"""`orchestrator run TARGET` and `orchestrator status RUN_URL` (on the session's Ray cluster)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli_output import cli_lines
from orchestrator import cli
from orchestrator.core.events import EventType
from orchestrator.storage.fs import StorageSpec
from orchestrator.storage.run_files import EventLog, read_events

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
def test_cli_run_accepts_module_function_targets_with_set_overrides_and_takes_a_held_run_over(ray_cluster, capsys,
                                                                                               tmp_path):
    from orchestrator.storage.lease import Owner, RunLease, read_lease
    storage = StorageSpec(str(tmp_path), "cli-target").open()
    held = RunLease.acquire(storage, Owner.current("a-job-that-is-gone"), ttl_s=600)  # live for 10 minutes
    argv = ["run", "cli_target:make_trainer", "--set", "hidden=4", "--storage", str(tmp_path), "--epochs", "1",
            "--num-workers", "1", "--takeover"]
    assert cli.main(argv) == cli.EXIT_FINISHED
    assert (tmp_path / "cli-target" / "run.json").exists()
    assert '"num_workers": 1' in (tmp_path / "cli-target" / "run.json").read_text()
    assert {e["owner"] for e in read_events(storage)} == {held.token + 1}
    assert read_lease(storage).released and read_lease(storage).token == held.token + 1


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
    out = cli_lines(capsys.readouterr().out)
    assert out[0].endswith("status finished, attempts 2, world size 2")
    assert out[1].split() == ["epoch", "loss", "learning_rate"]
    assert [line.split()[:2] for line in out[2:4]] == [["1", "2"], ["2", "1"]]
    assert out[4] == "newest committed backup: backup/step-4 (epoch 0, step 4)"
    assert [line.split()[:3] for line in out[5:9]] == [
        ["attempt", "1:", "lr_changed"], ["attempt", "1:", "worker_failed"], ["attempt", "2:", "restored"],
        ["attempt", "2:", "early_stopping"]]
    assert out[9].startswith("goodput ") and "(2 attempts, 1 restart, 0 rollbacks" in out[9]  # then one line a cause
    assert [line.split()[2] for line in out[10:]] == ["start-up", "restore", "replayed", "interrupted", "between",
                                                       "backup"]


# -- `status` on damaged run files: one line per damaged place, exit 3, the rest printed -------------


def _run_with_epochs(tmp_path: Path, run_json: str) -> Path:
    storage = StorageSpec(str(tmp_path), "r").open()
    log = EventLog(storage, attempt=1)
    log.append(EventType.EPOCH_END, epoch=0, logs={"loss": 2.0})
    log.append(EventType.EPOCH_END, epoch=1, logs={"loss": 1.0})
    (tmp_path / "r" / "run.json").write_text(run_json)
    return tmp_path / "r"


@pytest.mark.parametrize("run_json,problem", [
    ('{"status": "finished",\n  "attempts": }\n', "run.json line 2: not JSON (Expecting value at column 15)"),
    ('[1, 2]\n', "run.json line 1: not a JSON object (a list)"),
    ('"finished"\n', "run.json line 1: not a JSON object (a str)"),
])
def test_cli_status_of_a_damaged_run_json_names_file_and_line_exits_3_and_prints_the_events(
        tmp_path, capsys, run_json, problem):
    run_dir = _run_with_epochs(tmp_path, run_json)
    assert cli.main(["status", str(run_dir)]) == cli.EXIT_DAMAGED == 3
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert out[0] == f"run {run_dir}: status ?, attempts ?, world size ?"
    assert [line.split()[:2] for line in out[2:]] == [["1", "2"], ["2", "1"]]
    assert captured.err.splitlines() == [
        f"orchestrator status: damaged run file: {run_dir}/{problem}; its fields are unknown"]


def test_cli_status_skips_event_lines_it_cannot_use_and_names_each_with_file_and_line(tmp_path, capsys):
    run_dir = _run_with_epochs(tmp_path, '{"status": "running", "attempts": 1, "world_size": 2}\n')
    with open(run_dir / "events.jsonl", "a") as f:
        f.write('[1, 2]\n')
        f.write('{"type": "epoch_end", "epoch": "two", "logs": {"loss": 0.5}}\n')
        f.write('{"type": "backup_committed", "attempt": 1}\n')  # missing fields: printed as ?
        f.write('{"type": ["lr_changed"]}\n')
        f.write('{"type": "epoch_end", "attempt": 1, "epoch": 2, "logs": {"loss": "n/a"}}\n')
        f.write('{"type": "worker_failed", "rank": 1}\n')
    assert cli.main(["status", str(run_dir)]) == cli.EXIT_DAMAGED
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert out[0] == f"run {run_dir}: status running, attempts 1, world size 2"
    assert [line.split() for line in out[2:5]] == [["1", "2"], ["2", "1"], ["3", "n/a"]]
    assert out[5] == "newest committed backup: ? (epoch ?, step ?)"
    assert out[6].startswith("attempt ?: worker_failed ")
    events = run_dir / "events.jsonl"
    assert captured.err.splitlines() == [
        f"orchestrator status: damaged run file: {events} line 3: not a JSON object (a list); skipped",
        f"orchestrator status: damaged run file: {events} line 6: no string 'type'; skipped",
        f"orchestrator status: damaged run file: {events} line 4: epoch_end without an integer 'epoch' and a "
        "'logs' object; skipped",
    ]


def test_the_status_command_exits_3_on_a_damaged_run_as_a_program(tmp_path):
    run_dir = _run_with_epochs(tmp_path, "not json\n")
    done = subprocess.run([sys.executable, "-m", "orchestrator", "status", str(run_dir)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip() == (f"orchestrator status: damaged run file: {run_dir}/run.json line 1: not JSON "
                                   "(Expecting value at column 1); its fields are unknown")
    assert "status ?" in done.stdout and "    2  " in done.stdout


# -- the one-line error never shows a storage option value or URL userinfo --------------------------


def test_cli_status_with_an_endpoint_the_client_rejects_prints_one_line_without_its_token(tmp_path, capsys):
    pytest.importorskip("s3fs")
    token = "tok-a1b2c3d4e5f6"
    endpoint = f'client_kwargs={{"endpoint_url": "http://127.0.0.1:9?token={token}"}}'
    code = cli.main(["status", "s3://bucket/runs/r", "--option", endpoint, "--option", "key=k", "--option", "secret=s"])
    err = "\n".join(cli_lines(capsys.readouterr().err))
    assert code == cli.EXIT_USAGE
    assert len(err.strip().splitlines()) == 1 and "check storage_options" in err
    assert token not in err and "s3://bucket/runs/r/run.json" in err


@pytest.mark.parametrize("raised,code,prefix", [
    ("ValueError('endpoint s3://alice:p@ss/w@minio:9000 refused\\nsecond line')", cli.EXIT_USAGE,
     "orchestrator run: endpoint s3://***@minio:9000 refused"),
    ("RuntimeError('cannot reach https://bob:hunter2@host/x')", cli.EXIT_FAILED,
     "orchestrator run: training failed: RuntimeError: cannot reach https://***@host/x"),
])
def test_cli_final_error_line_is_one_line_without_url_userinfo(tmp_path, capsys, raised, code, prefix):
    entry = tmp_path / "broken.py"
    entry.write_text(f"def make_trainer():\n    raise {raised}\n")
    assert cli.main(["run", str(entry)]) == code
    assert cli_lines(capsys.readouterr().err) == [prefix]
