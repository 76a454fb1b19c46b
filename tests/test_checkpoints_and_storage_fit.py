"""ModelCheckpoint files, storage errors before any worker starts, and no credential in the run directory."""

from __future__ import annotations

import json
import time

import pytest
import torch

import workloads
from orchestrator import Trainer, callbacks
from orchestrator.storage.run_files import read_events
from orchestrator.storage.fs import StorageSpec
from s3_server import free_port, s3_bucket, s3_server  # noqa: F401

pytestmark = pytest.mark.timeout(240)


def make(url, **overrides):
    kwargs = dict(model=workloads.tiny_model, optimizer=workloads.slow_sgd, loss=workloads.cross_entropy,
                  data=workloads.odd_data, metrics=["accuracy"], batch_size=16, num_workers=2, seed=0,
                  storage=url)
    kwargs.update(overrides)
    return Trainer(**kwargs)


def test_model_checkpoint_keeps_the_top_k_best_files_and_an_integer_save_freq_counts_batches_across_epochs(
        ray_cluster, tmp_path):
    best = callbacks.ModelCheckpoint("best-{epoch:02d}-{val_loss:.4f}.pt", monitor="val_loss",
                                     save_best_only=True, save_weights_only=True, max_to_keep=2)
    every_4 = callbacks.ModelCheckpoint("step-{epoch}-{batch}.pt", save_freq=4)
    history = make(str(tmp_path), run_name="ckpt", callbacks=[best, every_4]).fit(epochs=4, verbose=0)
    folder = tmp_path / "ckpt" / "checkpoints"

    names = sorted(p.name for p in folder.iterdir() if p.name.startswith("best-"))
    losses = history.history["val_loss"]
    improved, lowest = [], float("inf")
    for epoch, loss in enumerate(losses):  # save_best_only writes on improvement; max_to_keep keeps 2
        if loss < lowest:
            improved.append(epoch)
            lowest = loss
    kept = sorted(improved, key=lambda e: losses[e])[:2]
    assert len(improved) >= 2
    assert names == sorted(f"best-{e + 1:02d}-{losses[e]:.4f}.pt" for e in kept)
    for name in names:
        state = torch.load(folder / name, weights_only=True)
        workloads.tiny_model().load_state_dict(state)  # plain weights of the user's module
    saved = [e for e in read_events(StorageSpec(str(tmp_path), "ckpt").open()) if e["type"] == "checkpoint_saved"]
    assert len([e for e in saved if e["path"].startswith("best-")]) >= 2

    # 7 steps per epoch; Keras saves after global batches 4, 8, 12, ...: epoch 1 batch 4, epoch 2 batches 1 and 5, ...
    steps = sorted(p.name for p in folder.iterdir() if p.name.startswith("step-"))
    assert steps == sorted(f"step-{(g - 1) // 7 + 1}-{g - 7 * ((g - 1) // 7)}.pt" for g in range(4, 29, 4))
    assert {"step-1-4.pt", "step-2-1.pt", "step-2-5.pt"} <= set(steps)
    full = torch.load(folder / "step-2-5.pt", weights_only=True)
    assert set(full) == {"model", "optimizer", "epoch", "step"}
    assert full["step"] == 12


def test_an_unreachable_s3_endpoint_fails_before_any_worker_starts(ray_cluster):
    endpoint = f"http://127.0.0.1:{free_port()}"
    trainer = make("s3://bucket/runs", storage_options={"key": "AKIDSECRETKEY1", "secret": "SHHH-very-secret",
                                                         "client_kwargs": {"endpoint_url": endpoint}})
    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        trainer.fit(epochs=1, verbose=0)
    assert time.monotonic() - start < 30
    assert "s3://bucket/runs" in str(info.value)
    assert "SHHH-very-secret" not in str(info.value) and "AKIDSECRETKEY1" not in str(info.value)


def test_a_missing_bucket_fails_with_a_clear_error_naming_it(ray_cluster, s3_server):
    trainer = make("s3://no-such-bucket-here/runs", storage_options=s3_server.storage_options())
    with pytest.raises(FileNotFoundError, match="no-such-bucket-here"):
        trainer.fit(epochs=1, verbose=0)


def test_memory_storage_is_rejected_because_workers_cannot_share_it():
    with pytest.raises(ValueError, match="memory://"):
        make("memory://runs")


def test_no_credential_appears_in_run_json_or_events(ray_cluster, s3_server, s3_bucket, tmp_path):
    options = s3_server.storage_options(s3_bucket)
    secret = options["secret"] = "Sup3r-Secret-Value-42"
    options["key"] = "AKIAEXAMPLEKEY42"
    trainer = make(f"s3://{s3_bucket}/runs", storage_options=options, run_name="secret",
                   callbacks=[callbacks.BackupAndRestore(save_freq="epoch", delete_checkpoint=False)])
    trainer.fit(epochs=1, verbose=0)
    storage = StorageSpec(f"s3://{s3_bucket}/runs", "secret", options).open()
    run_json = storage.read_bytes("run.json").decode()
    assert json.loads(run_json)["world_size"] == 2
    events = json.dumps(read_events(storage))
    assert "epoch_end" in events
    for text in (run_json, events):
        assert secret not in text and "AKIAEXAMPLEKEY42" not in text
    assert "s3fs" in run_json or "fsspec" in run_json  # versions are recorded


def test_a_backup_that_cannot_be_written_is_reported_as_an_event_and_an_error(ray_cluster, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "backup").write_text("a file where the backup folder should be")
    trainer = make(str(tmp_path), run_name="broken",
                   callbacks=[callbacks.BackupAndRestore(save_freq=3, delete_checkpoint=False)])
    with pytest.raises(Exception, match="background save failed"):
        trainer.fit(epochs=1, verbose=0)
    events = read_events(StorageSpec(str(tmp_path), "broken").open())
    assert any(e["type"] == "backup_failed" for e in events)
    assert events[-1]["type"] == "failed"
    assert not any(e["type"] == "backup_committed" for e in events)
