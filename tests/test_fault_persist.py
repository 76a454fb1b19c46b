"""A worker killed while a backup is being persisted: that backup never counts; the previous one is used."""

from __future__ import annotations

import pytest
import torch

import workloads_big
from orchestrator import Trainer, callbacks
from orchestrator.storage.run_files import read_events
from orchestrator.storage.fs import StorageSpec

pytestmark = pytest.mark.timeout(300)
EPOCHS = 1  # 64 samples, 2 workers, batch 8: 4 steps, the kill lands at the start of the last one


def make(tmp_path, run_name, train_step, **overrides):
    kwargs = dict(model=workloads_big.big_model, optimizer=workloads_big.adam, loss=workloads_big.mse,
                  data=workloads_big.data, train_step=train_step, batch_size=8, num_workers=2, seed=0,
                  storage=str(tmp_path), run_name=run_name, max_failures=1,
                  callbacks=[callbacks.BackupAndRestore(save_freq=1, delete_checkpoint=False)])
    kwargs.update(overrides)
    return Trainer(**kwargs)


def test_sigkill_during_a_background_persist_falls_back_to_the_previous_committed_backup(ray_cluster, tmp_path):
    # The uninterrupted reference needs no backups (nor restarts, nor standbys): they never change the
    # training, and BackupAndRestore logs nothing to History; writing ~50 MB a step would only cost time.
    reference = make(tmp_path, "reference", workloads_big.step_killing_rank0_at(0, None), callbacks=[],
                     max_failures=0).fit(epochs=EPOCHS, verbose=0)

    flag = tmp_path / "armed"
    flag.write_text("x")
    # rank 0 kills itself at the start of its 4th step: the backup of step 3 was submitted a moment
    # earlier and its ~50 MB are still being serialised and written in the background
    kill = workloads_big.step_killing_rank0_at(3, str(flag))
    resumed = make(tmp_path, "killed", kill, live_recovery=False,  # the storage path
                   warm_standbys=False).fit(epochs=EPOCHS, verbose=0)  # (standbys: three more process starts)

    events = read_events(StorageSpec(str(tmp_path), "killed").open())
    committed = [e["step"] for e in events if e["type"] == "backup_committed" and e["attempt"] == 1]
    restored = [e for e in events if e["type"] == "restored"]
    # the step being persisted when rank 0 died (3) never counts; the newest committed one is used
    assert committed and 3 not in committed
    assert restored and restored[0]["step"] == max(committed)
    # the driver heard of at most the 3 steps done before the kill; the steps after the backup are lost
    reached = restored[0]["reached_step"]
    assert max(committed) <= reached <= 3 and restored[0]["lost_steps"] == reached - max(committed)
    (failed,) = [e for e in events if e["type"] == "worker_failed"]
    # detection_s is None when no poll answer of the driver had heard from rank 0 before it died (FailureRecord)
    assert failed["role"] == "worker" and (failed["detection_s"] is None or failed["detection_s"] >= 0)
    leftovers = [e["step"] for e in events if e["type"] == "backup_skipped"]
    assert all(step > max(committed) for step in leftovers)
    assert reference.history == resumed.history
    for (name, a), (_, b) in zip(reference.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
