"""The fault matrix: failures restart the group from the newest committed backup; nothing is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import restarted_run
import workloads
from orchestrator.errors import PREEMPTED_EXIT_CODE, TrainingFailedError, WorkerError
from orchestrator.storage.run_files import read_events
from orchestrator.storage.fs import StorageSpec
from s3_server import s3_bucket, s3_server  # noqa: F401

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parent.parent


def make(tmp_path, run_name, train_step, **overrides):
    return restarted_run.make(tmp_path, run_name, train_step, **overrides)


@pytest.fixture(scope="module")
def reference(restarted_runs):
    """The uninterrupted run the tests compare with (restarted_run.py: make()'s Trainer with a fault step
    that never fires, 3 epochs, no standbys: nothing fails, and they change no result)."""
    return restarted_runs.reference


def assert_same_run(a, b):
    assert a.history == b.history
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), name


def events_of(tmp_path, run_name):
    return read_events(StorageSpec(str(tmp_path), run_name).open())


def assert_restarted_from_the_newest_backup(reference, resumed, events, warm):
    """Rank 1 failed once at its 11th call; attempt 2 resumed from the newest committed backup, bit-identical.

    ``warm``: whether each attempt's workers were warm processes (parked by an earlier fit, or promoted standbys).
    """
    assert_same_run(reference, resumed)
    started = [e for e in events if e["type"] == "started"]
    assert [e["warm"] for e in started] == list(warm)
    failed = [e for e in events if e["type"] == "worker_failed"]
    assert len(failed) == 1 and failed[0]["rank"] == 1 and failed[0]["attempt"] == 1
    assert failed[0]["role"] == "worker" and failed[0]["node"]
    # None when no poll answer of the driver had heard from rank 1 before it died (FailureRecord)
    assert failed[0]["detection_s"] is None or failed[0]["detection_s"] >= 0
    restored = [e for e in events if e["type"] == "restored"]
    # which backup had committed when rank 1 failed is a matter of timing; the newest of them is used
    assert restored and restored[0]["attempt"] == 2
    assert restored[0]["step"] == newest_committed_before(events, failed[0])
    # the driver heard of at most the 11 steps done before rank 1's 12th failed, and at least the backup
    reached = restored[0]["reached_step"]
    assert restored[0]["step"] <= reached <= 11 and restored[0]["lost_steps"] == reached - restored[0]["step"]
    assert events[-1]["type"] == "finished" and events[-1]["attempt"] == 2


def test_a_worker_that_raises_mid_epoch_restarts_on_the_survivor_and_a_new_process_and_ends_bit_identical(
        restarted_runs):
    # restarted_run.py: epoch 1, batch 4 (7 steps per epoch), a first attempt on the workers the reference
    # run parked, and no standbys: rank 1's process is replaced, rank 0's (which returned once rank 1's
    # process was gone) is kept; live_recovery=False: the storage path (test_live_recovery.py: memory)
    assert not restarted_runs.flag_left  # the failure did happen
    events = restarted_runs.events("faulty")
    assert_restarted_from_the_newest_backup(restarted_runs.reference, restarted_runs.faulty, events,
                                            warm=(True, False))
    assert [e["warm_ranks"] for e in events if e["type"] == "started"] == [[0, 1], [0]]


def test_a_worker_sigkilled_mid_epoch_restarts_on_warm_standbys_and_ends_bit_identical(ray_cluster, reference,
                                                                                       tmp_path):
    flag = tmp_path / "armed"
    flag.write_text("x")
    # epoch 1, batch 4 (7 steps per epoch), once the standbys are up (2 workers + 2 standbys)
    step = workloads.faulty_step("sigkill", 1, 11, str(flag), wait_for_workers=4)
    # live_recovery=False: this is the storage path (tests/test_live_recovery.py: the survivors' memory)
    resumed = make(tmp_path, "killed", step, warm_standbys=True, live_recovery=False).fit(epochs=3, verbose=0)
    events = events_of(tmp_path, "killed")
    # the first attempt may start on workers an earlier fit of this session parked, or on new processes;
    # the restart runs every rank on a standby (promoted: no process started for it)
    first_warm = next(e["warm"] for e in events if e["type"] == "started")
    assert_restarted_from_the_newest_backup(reference, resumed, events, warm=(first_warm, True))
    assert [e["warm_ranks"] for e in events if e["type"] == "started"][-1] == [0, 1]


def newest_committed_before(events, failure):
    """The step of the newest backup the failed attempt committed before its failure was recorded."""
    before = events[:events.index(failure)]
    steps = [e["step"] for e in before if e["type"] == "backup_committed" and e["attempt"] == failure["attempt"]]
    assert steps, "no backup committed before the failure"
    return max(steps)


def test_more_failures_than_max_failures_raise_an_error_listing_every_failure(ray_cluster, tmp_path):
    step = workloads.faulty_step("raise", 1, 4, None)  # fails on every attempt
    with pytest.raises(TrainingFailedError) as info:
        make(tmp_path, "doomed", step, max_failures=1, warm_standbys=False).fit(epochs=2, verbose=0)
    assert len(info.value.failures) == 2
    assert "attempt 1: rank 1" in str(info.value) and "attempt 2: rank 1" in str(info.value)
    assert "injected failure on rank 1 at call 4" in str(info.value)
    assert isinstance(info.value.__cause__, WorkerError)
    types = [e["type"] for e in events_of(tmp_path, "doomed")]
    assert types.count("worker_failed") == 2 and types[-1] == "failed"


def test_a_rank_that_hangs_inside_a_step_is_restarted_by_the_watchdog(ray_cluster, reference, tmp_path):
    flag = tmp_path / "armed"
    flag.write_text("x")
    step = workloads.faulty_step("hang", 0, 8, str(flag))
    start = time.monotonic()
    resumed = make(tmp_path, "hung", step, hang_timeout_s=4, warm_standbys=False).fit(epochs=3, verbose=0)
    assert time.monotonic() - start < 120
    assert_same_run(reference, resumed)
    failed = [e for e in events_of(tmp_path, "hung") if e["type"] == "worker_failed"]
    assert len(failed) == 1 and "made no progress" in failed[0]["cause"]
    assert failed[0]["detection_s"] > 4  # the silence that tripped the watchdog (hang_timeout_s=4)


def test_sigterm_to_the_driver_commits_an_emergency_backup_and_a_rerun_loses_no_step(ray_cluster, tmp_path,
                                                                                      monkeypatch):
    import importlib.util

    import ray

    env = dict(os.environ, ORCHESTRATOR_TEST_STORAGE=str(tmp_path),
               RAY_ADDRESS=ray.get_runtime_context().gcs_address,
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "orchestrator", "run", str(ROOT / "tests" / "entries" / "preemptible.py"),
               "--epochs", "3"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    events_file = tmp_path / "preemptible" / "events.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until training is under way
        if events_file.exists() and "backup_committed" in events_file.read_text():
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("training never started: " + (proc.stdout.read() if proc.stdout else ""))
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    output, _ = proc.communicate(timeout=90)
    assert proc.returncode == PREEMPTED_EXIT_CODE, output
    assert time.monotonic() - sent < 60
    events = read_events(StorageSpec(str(tmp_path), "preemptible").open())
    preempted = [e for e in events if e["type"] == "preempted"]
    assert len(preempted) == 1
    committed = [e["step"] for e in events if e["type"] == "backup_committed"]
    stopped_at = max(committed)

    # the rerun: a new driver (this process) fits the same Trainer, as `orchestrator run` does (its
    # exit codes are tested above and in test_cli.py); no second driver process to start
    monkeypatch.setenv("ORCHESTRATOR_TEST_STORAGE", str(tmp_path))
    spec = importlib.util.spec_from_file_location("preemptible_entry", ROOT / "tests" / "entries" / "preemptible.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    history = entry.make_trainer().fit(epochs=3, verbose=0)
    assert history.epoch == [0, 1, 2]
    events = read_events(StorageSpec(str(tmp_path), "preemptible").open())
    restored = [e for e in events if e["type"] == "restored"]
    assert restored[-1]["step"] == stopped_at  # the emergency backup: 0 lost steps
    assert restored[-1]["lost_steps"] is None  # a new driver has not heard how far the old one got
    assert events[-1]["type"] == "finished"
    run_json = json.loads((tmp_path / "preemptible" / "run.json").read_text())
    assert run_json["status"] == "finished" and run_json["attempts"] == 2


def test_an_s3_outage_of_a_few_seconds_during_backups_is_retried_and_loses_nothing(ray_cluster, reference,
                                                                                    tmp_path, s3_server, s3_bucket):
    import threading

    url, options = f"s3://{s3_bucket}/runs", s3_server.storage_options(s3_bucket)
    # the module's reference: max_failures=1 there only allows a restart (and standbys) that an
    # uninterrupted run never uses, so its History is that of this run's settings

    def outage():
        time.sleep(5.0)  # well into training: workers are up and backing up every 3 steps
        s3_server.stop()
        time.sleep(2.0)
        s3_server.start()

    thread = threading.Thread(target=outage)
    thread.start()
    try:
        history = make(tmp_path, "outage", workloads.slow_step(0.25), storage=url, storage_options=options,
                       max_failures=0).fit(epochs=3, verbose=0)
    finally:
        thread.join()
    assert history.history == reference.history
    events = read_events(StorageSpec(url, "outage", options).open())
    assert events[-1]["type"] == "finished"
    assert not any(e["type"] in ("backup_failed", "worker_failed") for e in events)
    assert sum(e["type"] == "backup_committed" for e in events) >= 5
