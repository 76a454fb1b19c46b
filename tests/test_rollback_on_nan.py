"""RollbackOnNaN: every rank reloads the newest committed backup, skips the bad batch, and trains on."""

from __future__ import annotations

import math

import pytest
import torch

import workloads
from orchestrator import Trainer, callbacks
from orchestrator.storage.run_files import read_events
from orchestrator.storage.fs import StorageSpec

pytestmark = pytest.mark.timeout(240)


def make(tmp_path, run_name, rollback):
    return Trainer(model=workloads.tiny_model, optimizer=workloads.sgd, loss=workloads.cross_entropy,
                   data=workloads.poisoned_data, metrics=["accuracy"], batch_size=16, num_workers=2, seed=0,
                   storage=str(tmp_path), run_name=run_name,
                   callbacks=[callbacks.BackupAndRestore(save_freq=2, delete_checkpoint=False), rollback])


def test_a_nan_on_one_rank_rolls_every_rank_back_and_skips_the_batch(ray_cluster, tmp_path):
    history = make(tmp_path, "rollback", callbacks.RollbackOnNaN(max_rollbacks=3, lr_factor=0.5)).fit(
        epochs=2, verbose=0)
    assert history.epoch == [0, 1]
    assert all(math.isfinite(v) for v in history.history["loss"] + history.history["val_loss"])
    assert all(torch.isfinite(p).all() for p in history.model.parameters())
    events = read_events(StorageSpec(str(tmp_path), "rollback").open())
    rolled = [e for e in events if e["type"] == "rolled_back"]
    assert len(rolled) == 2  # the poisoned sample lands in one batch per epoch
    assert [tuple(p) for p in rolled[-1]["skip"]][0][0] == 0 and len(rolled[-1]["skip"]) == 2
    assert events[-1]["type"] == "finished"
    # the learning rate was halved at each rollback, on every rank alike
    assert history.results[0].learning_rates == history.results[1].learning_rates
    assert history.history["learning_rate"][-1] == pytest.approx(0.1 * 0.5 ** 2)
    assert not any(e["type"] == "backup_committed" and e.get("error") for e in events)


def test_past_max_rollbacks_training_stops_like_terminate_on_nan(ray_cluster, tmp_path):
    history = make(tmp_path, "stop", callbacks.RollbackOnNaN(max_rollbacks=0)).fit(epochs=2, verbose=0)
    assert history.results[0].stopped_at is not None
    assert history.results[0].stopped_at == history.results[1].stopped_at
    types = [e["type"] for e in read_events(StorageSpec(str(tmp_path), "stop").open())]
    assert "terminated_on_nan" in types and "rolled_back" not in types
