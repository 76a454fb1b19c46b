"""Prometheus metrics through Ray: the exporter's counting on recorded events (no Ray), then the session's real
fit with a restart and an LR change (tests/restarted_run.py), whose metrics are read back from Ray's metrics
export (and whose run folder `orchestrator status` and `orchestrator plot` read)."""

from __future__ import annotations

import re

import pytest

from cli_output import cli_lines
from orchestrator.control.failures import AttemptFailed, FailureRecord
from orchestrator.control.metrics_export import METRICS, RunMetrics
from orchestrator.errors import WorkerError

# -- the exporter's values, in process (no Ray) ------------------------------------------------------


def fed(events, attempts=((1, None),)):
    """A RunMetrics (not exporting) fed ``events``; ``attempts`` is [(number, error ending it)], events split
    between them by their ``attempt``."""
    m = RunMetrics("r", samples_per_step=32, export=False)
    for number, error in attempts:
        mine = [e for e in events if e.get("attempt", 1) == number]
        m.begin_attempt(number, now=mine[0]["time"])
        for event in mine:
            m.observe(event)
        m.end_attempt(error, now=mine[-1]["time"])
    return m.snapshot()


def ev(time, type, attempt=1, **fields):
    return {"time": float(time), "type": type, "attempt": attempt, **fields}


ONE_ATTEMPT = [
    ev(100, "started"),
    ev(102, "train_begin", global_step=0, steps=10),
    ev(103, "batch_end", epoch=0, step=4, global_step=5, logs={"loss": 2.0}),
    ev(104, "backup_committed", epoch=0, step=5, folder="backup/step-5", bytes=1000, purged=[]),  # 1 s after step 5
    ev(107, "epoch_end", epoch=0, global_step=10, logs={"loss": 1.5, "val_loss": 1.7, "learning_rate": 0.1}),
    ev(107, "lr_changed", epoch=0, step=-1, value=0.05, new=0.05, old=0.1, global_step=10),
    ev(112, "epoch_end", epoch=1, global_step=20, logs={"loss": 1.0, "val_loss": 1.2, "learning_rate": 0.05}),
]


def test_the_exporter_counts_steps_samples_rates_losses_and_backups_from_the_events():
    s = fed(ONE_ATTEMPT)
    assert s["orchestrator_steps"] == 20 and s["orchestrator_samples"] == 20 * 32
    assert s["orchestrator_global_step"] == 20 and s["orchestrator_epoch"] == 1
    assert s["orchestrator_steps_per_second"] == pytest.approx(2.0)  # 10 steps in the 5 s up to the epoch's end
    assert s["orchestrator_samples_per_second"] == pytest.approx(64.0)
    assert s["orchestrator_step_seconds"] == pytest.approx(0.5)
    assert (s["orchestrator_loss:train"], s["orchestrator_loss:val"], s["orchestrator_learning_rate"]) == (1.0, 1.2, 0.05)
    assert s["orchestrator_backups_committed"] == 1 and s["orchestrator_backup_bytes"] == 1000
    assert "orchestrator_restarts" not in s and "orchestrator_backups_failed" not in s
    assert s["orchestrator_goodput_seconds:wall"] == pytest.approx(12.0, abs=0.01)  # 100 to 112 (its last event)
    assert s["orchestrator_goodput_seconds:startup"] == pytest.approx(2.0, abs=0.01)
    assert s["orchestrator_goodput"] == pytest.approx(10 / 12, abs=0.01)
    assert s["orchestrator_controller_state_seconds:running"] >= 0


def test_the_time_before_the_first_attempt_counts_as_the_starting_state():
    m = RunMetrics("r", samples_per_step=1, export=False)
    m.begin_starting()
    m.begin_attempt(1, now=100.0)
    m.end_attempt(None, now=101.0)
    s = m.snapshot()
    assert s["orchestrator_controller_state_seconds:starting"] > 0


def test_the_exporter_counts_a_restart_its_lost_steps_and_a_rollback():
    events = ONE_ATTEMPT[:4] + [
        ev(105, "progress", epoch=0, step=7, global_step=8, logs={"loss": 1.8}),
        ev(106, "warning", message="the last word of attempt 1", category="UserWarning"),
        ev(110, "started", attempt=2),
        ev(112, "train_begin", attempt=2, global_step=5, steps=10),  # back to the backup at step 5: 3 steps lost
        ev(115, "epoch_end", attempt=2, epoch=0, global_step=10, logs={"loss": 1.5}),
        ev(116, "nan_detected", attempt=2, epoch=1, step=2, global_step=13),
        ev(116, "rolled_back", attempt=2, epoch=1, step=2, folder="backup/step-10", bad_step=13, target_step=10),
        ev(120, "epoch_end", attempt=2, epoch=1, global_step=20, logs={"loss": 1.0}),
    ]
    failure = AttemptFailed(FailureRecord(1, 1, "n", "died"), WorkerError(1, "n", "RuntimeError", "x", ""))
    s = fed(events, attempts=[(1, failure), (2, None)])
    assert s["orchestrator_restarts"] == 1 and s["orchestrator_rollbacks"] == 1
    assert s["orchestrator_lost_steps"] == 3 + 3
    assert s["orchestrator_steps"] == 8 + 8 + 10  # 0..8, 5..13, 10..20: the steps run, replays included
    assert s["orchestrator_steps"] - s["orchestrator_lost_steps"] == 20
    assert s["orchestrator_goodput_seconds:interrupted"] > 0 and s["orchestrator_goodput_seconds:replayed"] > 0
    assert s["orchestrator_controller_state_seconds:restarting"] >= 0


def test_odd_events_are_counted_as_far_as_they_go_and_never_raise():
    m = RunMetrics("r", samples_per_step=1, export=False)
    m.begin_attempt(1)
    for event in [{"type": "progress"}, {"type": "from_a_newer_version", "time": 1.0}, {"time": 2.0},
                  ev(3, "epoch_end", epoch="two", logs=None), ev(4, "backup_committed", step="x", bytes=None),
                  ev(5, "lr_changed", value="fast"), ev(6, "progress", global_step=True, logs={"loss": "low"})]:
        m.observe(event)
    m.end_attempt(None)
    assert m.snapshot()["orchestrator_backups_committed"] == 1


def test_a_bad_samples_per_step_is_refused_naming_it():
    with pytest.raises(ValueError, match="samples_per_step must be at least 1, got 0"):
        RunMetrics("r", samples_per_step=0)


def test_every_metric_is_named_with_the_orchestrator_prefix_and_a_kind_ray_knows():
    for name, spec in METRICS.items():
        assert re.fullmatch(r"orchestrator_[a-z_]+", name) and spec.kind in ("counter", "gauge", "histogram")
        assert spec.description and (spec.kind != "histogram" or spec.boundaries)


# -- a real fit: the metrics in Ray's export, and `status` / `plot` on its run folder -------------------


@pytest.fixture(scope="module")
def restarted_run(restarted_runs):
    """The session's 3-epoch run whose rank 1 failed once in epoch 1 (restarted from a backup) and whose learning
    rate ReduceLROnPlateau halved (tests/restarted_run.py), fitted by this process: (storage, run name, History).
    No other run of the session is named like it, so its tag in Ray's export is its own."""
    return restarted_runs.root, "faulty", restarted_runs.faulty


@pytest.mark.timeout(400)
def test_a_fit_exports_its_metrics_through_rays_metrics_export(ray_cluster, restarted_runs, restarted_run):
    from orchestrator.storage.fs import StorageSpec
    from orchestrator.storage.run_files import read_events

    storage, run, history = restarted_run
    events = read_events(StorageSpec(str(storage), run).open())
    steps_per_epoch, epochs = 7, 3  # 203 samples on 2 ranks at batch size 16
    tag = f"run={run}"
    # Ray's agent exports what the driver recorded every few seconds, and drops a gauge nothing set for a
    # few intervals: a watch started as the run ended scraped until the final values were there (conftest.py)
    final = restarted_runs.export.final  # what this driver counted, handed to Ray at the attempt's end
    seen = restarted_runs.export.result(timeout=200)
    steps = seen["ray_orchestrator_steps_total"][tag]
    lost = seen.get("ray_orchestrator_lost_steps_total", {}).get(tag, 0)  # a counter appears once counted
    assert steps - lost == steps_per_epoch * epochs, seen  # every step once, plus those replayed after the restart
    assert seen["ray_orchestrator_samples_total"][tag] == steps * 16 * 2
    assert seen["ray_orchestrator_restarts_total"][tag] == 1
    assert seen["ray_orchestrator_backups_committed_total"][tag] == sum(e["type"] == "backup_committed" for e in events)
    assert all(e["stall_s"] > 0 for e in events if e["type"] == "backup_committed")  # each rank timed its copy
    assert seen["ray_orchestrator_global_step"][tag] == steps_per_epoch * epochs
    changes = [e["value"] for e in events if e["type"] == "lr_changed"]
    assert changes and seen["ray_orchestrator_learning_rate"][tag] == changes[-1] < 0.1  # the rate now
    assert seen["ray_orchestrator_loss"][f"{tag},phase=val"] == pytest.approx(history.history["val_loss"][-1])
    assert seen["ray_orchestrator_steps_per_second"][tag] > 0 and seen["ray_orchestrator_step_seconds"][tag] > 0
    assert 0 < seen["ray_orchestrator_goodput"][tag] <= 1
    wall = seen["ray_orchestrator_goodput_seconds"][f"{tag},cause=wall"]
    parts = [v for k, v in seen["ray_orchestrator_goodput_seconds"].items() if k.startswith(tag) and "wall" not in k]
    assert sum(parts) == pytest.approx(wall, rel=1e-3)
    assert seen["ray_orchestrator_controller_state_seconds_total"][f"{tag},state=running"] > 0
    assert seen["ray_orchestrator_controller_state_seconds_total"][f"{tag},state=starting"] > 0
    assert seen["ray_orchestrator_backup_persist_seconds_count"][tag] >= 1
    for name, value in final.items():  # and every value Ray has is the driver's
        if not name.startswith("orchestrator_controller_state_seconds"):  # counted until the very end
            prefix, _, tag_value = name.partition(":")
            spec = METRICS[prefix]
            key = tag + (f",{spec.tags[0]}={tag_value}" if tag_value else "")
            exported = f"ray_{prefix}" + ("_total" if spec.kind == "counter" else "")
            assert seen[exported][key] == pytest.approx(value), name


def test_status_prints_the_goodput_of_a_real_restarted_run(restarted_run, capsys):
    from orchestrator import cli

    storage, run, _ = restarted_run
    assert cli.main(["status", f"{storage}/{run}"]) == cli.EXIT_FINISHED
    out = cli_lines(capsys.readouterr().out)
    summary = next(line for line in out if line.startswith("goodput "))
    assert re.match(r"goodput \d+\.\d%: [\d.]+ s productive of [\d.]+ s wall \(2 attempts, 1 restart, 0 rollbacks",
                    summary), summary
    assert [line.split()[2] for line in out if line.startswith("  lost to ")] == [
        "start-up", "restore", "replayed", "interrupted", "between", "backup"]


def test_plot_draws_a_real_restarted_run_with_its_markers(restarted_run, tmp_path):
    pytest.importorskip("matplotlib")
    from orchestrator import cli
    from test_plot import assert_png

    storage, run, _ = restarted_run
    out = tmp_path / "run.png"
    assert cli.main(["plot", f"{storage}/{run}", "-o", str(out), "--size", "1000x700"]) == 0
    assert_png(out, 1000, 700)
