"""BackupAndRestore: an interrupted run resumed from storage ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import shutil
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


def never_failing_step(tmp_path):
    return workloads.failing_step(fail_at_call=10_000, flag_path=str(tmp_path / "none"))


def double_backups():
    return [callbacks.BackupAndRestore(save_freq=3, double_checkpoint=True, delete_checkpoint=False)]


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """The uninterrupted run of make()'s default callbacks over 3 epochs, fitted once for the module: the
    file and the s3 cases compare with it (storage does not change the training)."""
    tmp = tmp_path_factory.mktemp("reference")
    step = workloads.failing_step(fail_at_call=10, flag_path=str(tmp / "no-flag"))
    return make(f"file://{tmp}/runs", {}, "reference", step).fit(epochs=3, verbose=0)


@pytest.fixture(scope="module")
def double_reference(ray_session, tmp_path_factory):
    """The uninterrupted run with ``double_backups()`` over 2 epochs, fitted once for the module."""
    tmp = tmp_path_factory.mktemp("double-reference")
    return make(f"file://{tmp}/runs", {}, "reference", never_failing_step(tmp), double_backups()).fit(
        epochs=2, verbose=0)


@pytest.fixture(scope="module")
def double_interrupted(ray_session, tmp_path_factory):
    """A run with ``double_backups()`` interrupted at the 8th step, done once for the module: each test
    copies its run directory (``interrupted`` under the returned folder) and damages its own copy."""
    tmp = tmp_path_factory.mktemp("double-interrupted")
    interrupt(f"file://{tmp}/runs", {}, "interrupted", double_backups(), tmp)
    return tmp / "runs"


def copy_of(runs, tmp_path):
    """A private copy of the interrupted run: (url, its storage)."""
    shutil.copytree(runs / "interrupted", tmp_path / "runs" / "interrupted")
    url = f"file://{tmp_path}/runs"
    return url, StorageSpec(url, "interrupted", {}).open()


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


def test_an_interrupted_run_resumes_at_the_next_batch_and_ends_bit_identical(ray_cluster, reference, storage,
                                                                              tmp_path):
    url, options = storage
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
    # the failed fit parked rank 1 if it returned within the survivors' grace after rank 0's failure (the
    # rule itself: test_controller.py); rank 0's process, which raised, is never reused
    assert [e["warm_ranks"] for e in events if e["type"] == "started"][-1] in ([1], [])
    restored = next(e for e in events if e["type"] == "restored")
    # which backups (every 3 steps) had committed when rank 0 failed in step 11 is a matter of timing; the
    # newest of them is used, and each is inside an epoch (7 steps per epoch)
    committed = [e["step"] for e in events if e["type"] == "backup_committed" and e["attempt"] == 1]
    assert restored["step"] == max(committed) and restored["phase"] == "batch"
    assert restored["epoch"] == restored["step"] // 7
    assert json.loads(storage_.read_bytes("run.json"))["attempts"] == 2


def test_a_torn_or_corrupt_newest_backup_is_skipped_and_the_previous_one_is_used(ray_cluster, double_reference,
                                                                                   double_interrupted, tmp_path):
    url, storage_ = copy_of(double_interrupted, tmp_path)
    steps = [s for s in list_steps(storage_, "backup") if storage_.exists(f"{step_dir('backup', s)}/{MANIFEST}")]
    assert steps == [6, 3]  # double_checkpoint keeps two
    newest = step_dir("backup", 6)
    shard = f"{newest}/rank-1.pt"
    storage_.write_bytes(shard, storage_.read_bytes(shard)[:100])  # truncated
    trainer = make(url, {}, "interrupted", never_failing_step(tmp_path), double_backups())
    with pytest.warns(UserWarning, match="skipping backup step 6"):
        resumed = trainer.fit(epochs=2, verbose=0)
    assert_same_run(double_reference, resumed)
    events = read_events(storage_)
    assert any(e["type"] == "backup_skipped" and e["step"] == 6 for e in events)
    assert next(e for e in events if e["type"] == "restored")["step"] == 3


def test_a_step_without_a_manifest_never_counts(ray_cluster, double_reference, double_interrupted, tmp_path):
    url, storage_ = copy_of(double_interrupted, tmp_path)
    storage_.rm(f"{step_dir('backup', 6)}/{MANIFEST}")
    trainer = make(url, {}, "interrupted", never_failing_step(tmp_path), double_backups())
    with pytest.warns(UserWarning, match="no manifest"):
        resumed = trainer.fit(epochs=2, verbose=0)
    assert_same_run(double_reference, resumed)


def test_backups_are_deleted_at_the_end_when_delete_checkpoint_is_true(ray_cluster, tmp_path):
    url = f"file://{tmp_path}/runs"
    step = workloads.failing_step(fail_at_call=10_000, flag_path=str(tmp_path / "none"))
    name = f"del-{uuid.uuid4().hex[:6]}"
    make(url, {}, name, step, [callbacks.BackupAndRestore(save_freq="epoch")]).fit(epochs=1, verbose=0)
    storage_ = StorageSpec(url, name, {}).open()
    assert list_steps(storage_, "backup") == []
    assert any(e["type"] == "backup_committed" for e in read_events(storage_))
