"""BackupAndRestore: an interrupted run resumed from storage ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import uuid

import pytest
import torch

import workloads
from orchestrator import Trainer, callbacks
from orchestrator.storage.checkpoint import MANIFEST, list_steps, step_dir
from orchestrator.errors import WorkerError
from orchestrator.storage.run_files import read_events
from orchestrator.storage.fs import StorageSpec
from s3_server import s3_bucket, s3_server  # noqa: F401

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(params=["file", "s3"])
def storage(request, tmp_path):
    """(url, storage_options) on a local folder and on the moto S3 server."""
    if request.param == "file":
        return f"file://{tmp_path}/runs", {}
    bucket = request.getfixturevalue("s3_bucket")
    server = request.getfixturevalue("s3_server")
    return f"s3://{bucket}/runs", server.storage_options(bucket)


def make(url, options, run_name, train_step, epochs_callbacks=None, **overrides):
    kwargs = dict(model=workloads.dropout_model, optimizer=workloads.adam, loss=None, data=workloads.odd_data,
                  metrics=None, train_step=train_step, batch_size=16, num_workers=2, seed=0, storage=url,
                  storage_options=options, run_name=run_name,
                  callbacks=epochs_callbacks if epochs_callbacks is not None else [
                      callbacks.BackupAndRestore(save_freq=3, delete_checkpoint=False),
                      callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=0, min_delta=0.05),
                      callbacks.EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True),
                  ])
    kwargs.update(overrides)
    return Trainer(**kwargs)


def interrupt(url, options, run_name, cbs, tmp_path):
    """Fail on the 8th step (epoch 1, batch 0; 7 steps per epoch): backups at steps 3 and 6 commit."""
    flag = tmp_path / f"fail-{run_name}"
    flag.write_text("x")
    with pytest.raises(WorkerError):
        make(url, options, run_name, workloads.failing_step(7, str(flag)), cbs).fit(epochs=2, verbose=0)


def assert_same_run(a, b):
    assert a.history == b.history
    assert a.epoch == b.epoch
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), name


def test_an_interrupted_run_resumes_at_the_next_batch_and_ends_bit_identical(ray_cluster, storage, tmp_path):
    url, options = storage
    step = workloads.failing_step(fail_at_call=10, flag_path=str(tmp_path / "no-flag"))
    reference = make(url, options, "reference", step).fit(epochs=3, verbose=0)

    flag = tmp_path / "fail-once"
    flag.write_text("x")
    failing = workloads.failing_step(fail_at_call=10, flag_path=str(flag))
    with pytest.raises(WorkerError, match="injected failure at call 10"):
        make(url, options, "interrupted", failing).fit(epochs=3, verbose=0)
    assert not flag.exists()

    resumed = make(url, options, "interrupted", failing).fit(epochs=3, verbose=0)
    assert_same_run(reference, resumed)

    storage_ = StorageSpec(url, "interrupted", options).open()
    events = read_events(storage_)
    types = [e["type"] for e in events]
    assert "restored" in types and types.count("started") == 2 and types[-1] == "finished"
    restored = next(e for e in events if e["type"] == "restored")
    assert restored["phase"] == "batch" and restored["epoch"] == 1  # mid-epoch: 7 steps per epoch
    assert json.loads(storage_.read_bytes("run.json"))["attempts"] == 2


def test_a_torn_or_corrupt_newest_backup_is_skipped_and_the_previous_one_is_used(ray_cluster, tmp_path):
    url, options = f"file://{tmp_path}/runs", {}
    step = workloads.failing_step(fail_at_call=10_000, flag_path=str(tmp_path / "none"))
    cbs = lambda: [callbacks.BackupAndRestore(save_freq=3, double_checkpoint=True, delete_checkpoint=False)]  # noqa: E731
    reference = make(url, options, "reference", step, cbs()).fit(epochs=2, verbose=0)

    interrupt(url, options, "corrupt", cbs(), tmp_path)
    storage_ = StorageSpec(url, "corrupt", options).open()
    steps = [s for s in list_steps(storage_, "backup") if storage_.exists(f"{step_dir('backup', s)}/{MANIFEST}")]
    assert steps == [6, 3]  # double_checkpoint keeps two
    newest = step_dir("backup", 6)
    shard = f"{newest}/rank-1.pt"
    storage_.write_bytes(shard, storage_.read_bytes(shard)[:100])  # truncated
    with pytest.warns(UserWarning, match="skipping backup step 6"):
        resumed = make(url, options, "corrupt", step, cbs()).fit(epochs=2, verbose=0)
    assert_same_run(reference, resumed)
    events = read_events(storage_)
    assert any(e["type"] == "backup_skipped" and e["step"] == 6 for e in events)
    assert next(e for e in events if e["type"] == "restored")["step"] == 3


def test_a_step_without_a_manifest_never_counts(ray_cluster, tmp_path):
    url = f"file://{tmp_path}/runs"
    step = workloads.failing_step(fail_at_call=10_000, flag_path=str(tmp_path / "none"))
    cbs = lambda: [callbacks.BackupAndRestore(save_freq=3, double_checkpoint=True, delete_checkpoint=False)]  # noqa: E731
    reference = make(url, {}, "reference", step, cbs()).fit(epochs=2, verbose=0)
    interrupt(url, {}, "torn", cbs(), tmp_path)
    storage_ = StorageSpec(url, "torn", {}).open()
    storage_.rm(f"{step_dir('backup', 6)}/{MANIFEST}")
    with pytest.warns(UserWarning, match="no manifest"):
        resumed = make(url, {}, "torn", step, cbs()).fit(epochs=2, verbose=0)
    assert_same_run(reference, resumed)


def test_backups_are_deleted_at_the_end_when_delete_checkpoint_is_true(ray_cluster, tmp_path):
    url = f"file://{tmp_path}/runs"
    step = workloads.failing_step(fail_at_call=10_000, flag_path=str(tmp_path / "none"))
    name = f"del-{uuid.uuid4().hex[:6]}"
    make(url, {}, name, step, [callbacks.BackupAndRestore(save_freq="epoch")]).fit(epochs=1, verbose=0)
    storage_ = StorageSpec(url, name, {}).open()
    assert list_steps(storage_, "backup") == []
    assert any(e["type"] == "backup_committed" for e in read_events(storage_))
