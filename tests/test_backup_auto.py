"""BackupAndRestore(save_freq="auto") in a real fit: backups commit, every interval is an event, and an
interrupted run resumes bit-identical."""

from __future__ import annotations

import pytest

import workloads
from orchestrator import Trainer, callbacks
from orchestrator.storage.fs import StorageSpec
from orchestrator.storage.run_files import read_events

pytestmark = pytest.mark.timeout(180)


def make(url: str, run_name: str, train_step, max_failures: int = 0) -> Trainer:
    # a failure every millisecond and no lower bound: the interval is as short as the measured persist allows
    auto = callbacks.BackupAndRestore(save_freq="auto", mtbf_s=1e-3, min_interval_s=0.0, delete_checkpoint=False)
    return Trainer(model=workloads.dropout_model, optimizer=workloads.adam, loss=None, data=workloads.odd_data,
                   metrics=None, train_step=train_step, batch_size=16, num_workers=2, seed=0, storage=url,
                   run_name=run_name, callbacks=[auto], max_failures=max_failures,
                   warm_standbys=False)  # the restart starts new processes: standbys would only cost the suite


def test_an_auto_interval_run_commits_backups_records_its_intervals_and_resumes_bit_identical(ray_cluster, tmp_path):
    url = f"file://{tmp_path}/runs"
    reference = make(url, "reference", workloads.failing_step(10_000, str(tmp_path / "none"))).fit(epochs=2, verbose=0)

    flag = tmp_path / "fail-once"
    flag.write_text("x")
    failing = workloads.failing_step(fail_at_call=10, flag_path=str(flag))  # epoch 1, batch 3 (7 steps an epoch)
    # the failure restarts the group (a raised error: from the newest committed backup, not from memory)
    resumed = make(url, "interrupted", failing, max_failures=1).fit(epochs=2, verbose=0)

    assert resumed.history == reference.history and resumed.epoch == reference.epoch
    for (name, a), (_, b) in zip(reference.model.named_parameters(), resumed.model.named_parameters()):
        assert a.equal(b), name

    events = read_events(StorageSpec(url, "interrupted", {}).open())
    first = [e for e in events if e["attempt"] == 1]
    commits = [e for e in first if e["type"] == "backup_committed"]
    intervals = [e for e in first if e["type"] == "backup_interval"]
    assert commits and all(e["stall_s"] >= 0 and e["persist_s"] >= 0 for e in commits)
    assert intervals[0]["bound"] == "no_cost" and intervals[0]["steps"] == 1  # the first timed step, no cost yet
    assert all(e["source"] == "BackupAndRestore" and e["steps"] >= 1 and e["mtbf_s"] == 1e-3 for e in intervals)
    (failed,) = [e for e in events if e["type"] == "worker_failed"]
    assert "injected failure at call 10" in failed["cause"]
    restored = next(e for e in events if e["type"] == "restored")
    assert restored["step"] == max(e["step"] for e in commits)
