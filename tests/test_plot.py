"""`orchestrator plot RUN_URL -o run.png`: curves, the learning rate and markers from a run's events, into a PNG
(a hand-built run with a restart and an LR change, locally and on S3; a real fit's run is drawn in
test_metrics_export.py)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from cli_output import cli_lines
from orchestrator import cli
from orchestrator.core.events import EventType
from orchestrator.plot import plot_data
from orchestrator.storage.fs import StorageSpec
from orchestrator.storage.run_files import EventLog
from s3_server import s3_bucket, s3_server  # noqa: F401


def assert_png(path: Path, width: int, height: int) -> None:
    """``path`` is a PNG of ``width`` x ``height`` pixels (read from its header) with more than two colours."""
    import matplotlib.image
    import numpy as np

    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (width, height)
    image = matplotlib.image.imread(str(path))
    assert image.shape[:2] == (height, width)
    rgb = np.rint(image[..., :3] * 255).astype(np.int64)  # one integer per colour: a 1-D unique, not rows
    assert len(np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])) > 2


def write_restarted_run(storage) -> None:
    """Three epochs; rank 1 fails in epoch 1, attempt 2 restores a mid-epoch backup; ReduceLROnPlateau halves
    the rate after epoch 1; EarlyStopping stops after epoch 2."""
    storage.write_json("run.json", {"status": "finished", "attempts": 2, "world_size": 2})
    first, second = EventLog(storage, attempt=1), EventLog(storage, attempt=2)
    first.append(EventType.STARTED, world_size=2)
    first.append(EventType.EPOCH_END, epoch=0, global_step=7,
                 logs={"loss": 1.2, "accuracy": 0.5, "val_loss": 1.3, "val_accuracy": 0.45, "learning_rate": 0.1})
    first.append(EventType.BACKUP_COMMITTED, epoch=1, step=9, folder="backup/step-9", bytes=10, purged=[])
    first.append(EventType.WORKER_FAILED, rank=1, node="n1", cause="rank 1 raised RuntimeError")
    second.append(EventType.RESTORED, epoch=1, step=9, folder="backup/step-9", phase="batch")
    second.append(EventType.STARTED, world_size=2)
    second.append(EventType.EPOCH_END, epoch=1, global_step=14,
                  logs={"loss": 0.9, "accuracy": 0.6, "val_loss": 1.0, "val_accuracy": 0.62, "learning_rate": 0.1})
    second.append(EventType.LR_CHANGED, epoch=1, step=-1, value=0.05, source="ReduceLROnPlateau", global_step=14)
    second.append(EventType.EPOCH_END, epoch=2, global_step=21,
                  logs={"loss": 0.7, "accuracy": 0.7, "val_loss": 0.8, "val_accuracy": 0.71, "learning_rate": 0.05})
    second.append(EventType.EARLY_STOPPING, epoch=2, step=-1, reason="early_stopping", source="EarlyStopping")
    second.append(EventType.FINISHED, epochs=3)


def test_plot_data_keeps_the_newest_record_of_each_epoch_and_places_each_marker():
    events = [
        {"time": 1, "type": "epoch_end", "epoch": 0, "logs": {"loss": 2.0, "learning_rate": 0.1}},
        {"time": 2, "type": "backup_committed", "epoch": 1, "step": 9},
        {"time": 3, "type": "worker_failed", "epoch": None},  # no epoch: where the newest event was
        {"time": 4, "type": "restored", "epoch": 1, "step": 9, "phase": "batch"},  # inside epoch 1
        {"time": 5, "type": "rolled_back", "epoch": 1, "step": 3, "folder": "backup/step-9"},
        {"time": 6, "type": "epoch_end", "epoch": 1, "logs": {"loss": 1.5, "val_loss": "n/a", "learning_rate": 0.1}},
        {"time": 7, "type": "lr_changed", "epoch": 1, "step": -1, "value": 0.05},  # at the epoch's end
        {"time": 8, "type": "node_draining", "epoch": None},
        {"time": 9, "type": "preempted", "epoch": 2, "step": 17},
        {"time": 10, "type": "restored", "epoch": 2, "step": 17, "phase": "epoch"},
        {"time": 11, "type": "epoch_end", "epoch": 1, "logs": {"loss": 1.4, "learning_rate": 0.1}},  # again
        {"time": 12, "type": "early_stopping", "epoch": 1, "step": -1},
        {"time": 13, "type": "from_a_newer_version", "epoch": 5},
        {"type": ["junk"]},
    ]
    data = plot_data(events)
    assert data.epochs == {1: {"loss": 2.0, "learning_rate": 0.1}, 2: {"loss": 1.4, "learning_rate": 0.1}}
    assert data.markers == {"worker_failed": [1.5], "restored": [1.5, 3.0], "rolled_back": [1.5],
                            "lr_changed": [2.0], "node_draining": [2.0], "preempted": [2.5], "early_stopping": [2.0]}
    assert data.panels() == ["loss", "learning_rate"]
    assert data.rates == [(2.0, 0.05)]


def test_plot_writes_a_png_of_the_default_size_for_a_run_with_a_restart_and_an_lr_change(tmp_path, capsys):
    write_restarted_run(StorageSpec(str(tmp_path), "r").open())
    out = tmp_path / "run.png"
    assert cli.main(["plot", f"{tmp_path}/r", "-o", str(out)]) == cli.EXIT_FINISHED
    assert_png(out, 1200, 3 * 260 + 80)  # panels: loss, accuracy, learning_rate
    assert capsys.readouterr().out.strip() == f"wrote {out} (1200x860 pixels) from {tmp_path}/r"


def test_plot_reads_a_run_on_s3_through_its_storage_options(s3_server, s3_bucket, tmp_path):
    options = s3_server.storage_options()
    write_restarted_run(StorageSpec(s3_server.url(s3_bucket, "runs"), "r", options).open())
    out = tmp_path / "s3.png"
    argv = ["plot", s3_server.url(s3_bucket, "runs", "r"), "-o", str(out), "--size", "640x480",
            "--option", f"key={options['key']}", "--option", f"secret={options['secret']}",
            "--option", f"client_kwargs={json.dumps(options['client_kwargs'])}"]
    assert cli.main(argv) == cli.EXIT_FINISHED
    assert_png(out, 640, 480)


def test_plot_draws_what_it_can_read_of_a_damaged_event_log_and_exits_3(tmp_path, capsys):
    write_restarted_run(StorageSpec(str(tmp_path), "r").open())
    with open(tmp_path / "r" / "events.jsonl", "a") as f:
        f.write("[1, 2]\n")
    out = tmp_path / "run.png"
    assert cli.main(["plot", f"{tmp_path}/r", "-o", str(out)]) == cli.EXIT_DAMAGED
    assert_png(out, 1200, 860)
    assert cli_lines(capsys.readouterr().err) == [f"orchestrator plot: damaged run file: {tmp_path}/r/events.jsonl "
                                                  "line 12: not a JSON object (a list); skipped"]


@pytest.mark.parametrize("extra,message", [
    (["--size", "big"], "orchestrator plot: --size expects WIDTHxHEIGHT in pixels such as 1200x800, got 'big'"),
    (["--size", "100x100"], "orchestrator plot: size must be at least 200x150 pixels, got 100x100"),
])
def test_plot_argument_errors_are_one_line_with_exit_code_2(tmp_path, capsys, extra, message):
    write_restarted_run(StorageSpec(str(tmp_path), "r").open())
    assert cli.main(["plot", f"{tmp_path}/r", "-o", str(tmp_path / "x.png"), *extra]) == cli.EXIT_USAGE
    assert cli_lines(capsys.readouterr().err) == [message]
    assert not (tmp_path / "x.png").exists()


def test_plot_of_a_run_without_an_ended_epoch_or_without_a_run_says_so(tmp_path, capsys):
    storage = StorageSpec(str(tmp_path), "r").open()
    storage.write_json("run.json", {"status": "running", "attempts": 1})
    EventLog(storage, attempt=1).append(EventType.STARTED, world_size=1)
    assert cli.main(["plot", f"{tmp_path}/r", "-o", str(tmp_path / "x.png")]) == cli.EXIT_USAGE
    assert "no epoch of this run has ended yet" in capsys.readouterr().err
    assert cli.main(["plot", f"{tmp_path}/nothing"]) == cli.EXIT_USAGE
    assert "no run at" in capsys.readouterr().err


def test_plot_without_matplotlib_names_the_extra_to_install(tmp_path, capsys, monkeypatch):
    write_restarted_run(StorageSpec(str(tmp_path), "r").open())
    for name in ["matplotlib", *(m for m in sys.modules if m.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing any of it raises ImportError
    assert cli.main(["plot", f"{tmp_path}/r", "-o", str(tmp_path / "x.png")]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == 'orchestrator plot: matplotlib is not installed; pip install "orchestrator[plot]"'
    assert not (tmp_path / "x.png").exists()
