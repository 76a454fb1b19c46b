"""strategy="fsdp" in real fits: DDP's numbers, exact resumes from sharded backups, resharding, plain files."""

from __future__ import annotations

import shutil

import pytest
import torch

import workloads
from orchestrator import Trainer, callbacks
from orchestrator.cli import main as cli_main
from orchestrator.errors import WorkerError
from orchestrator.storage.checkpoint import MANIFEST, Manifest, list_steps, step_dir
from orchestrator.storage.fs import StorageSpec
from orchestrator.storage.run_files import read_events

pytestmark = pytest.mark.timeout(600)


def backups(**kw):
    return callbacks.BackupAndRestore(save_freq=3, double_checkpoint=True, delete_checkpoint=False, **kw)


def make(url, run_name, train_step=None, cbs=None, **overrides):
    kwargs = dict(model=workloads.dropout_model, optimizer=workloads.adam, loss=None if train_step else
                  workloads.cross_entropy, data=workloads.odd_data, metrics=None if train_step else ["accuracy"],
                  train_step=train_step, batch_size=16, num_workers=2, seed=0, storage=url, run_name=run_name,
                  strategy="fsdp", callbacks=cbs if cbs is not None else [
                      backups(),
                      callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=0, min_delta=0.05),
                      callbacks.EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True)])
    kwargs.update(overrides)
    return Trainer(**kwargs)


def never_failing(tmp):
    return workloads.failing_step(fail_at_call=10_000, flag_path=str(tmp / "none"))


def interrupt(url, run_name, tmp):
    """Fail at the 11th step (epoch 1, batch 3; 7 steps per epoch): backups at steps 3, 6, 9 committed."""
    flag = tmp / f"fail-{run_name}"
    flag.write_text("x")
    with pytest.raises(WorkerError):
        make(url, run_name, workloads.failing_step(10, str(flag))).fit(epochs=3, verbose=0)


def assert_same_run(a, b):
    assert a.history == b.history
    assert a.epoch == b.epoch
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), name


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """The uninterrupted FSDP run over 3 epochs (fitted once for the module)."""
    tmp = tmp_path_factory.mktemp("fsdp-reference")
    return make(f"file://{tmp}/runs", "reference", never_failing(tmp)).fit(epochs=3, verbose=0)


@pytest.fixture(scope="module")
def interrupted(ray_session, tmp_path_factory):
    """An FSDP run interrupted at its 11th step; each test copies its run directory."""
    tmp = tmp_path_factory.mktemp("fsdp-interrupted")
    interrupt(f"file://{tmp}/runs", "interrupted", tmp)
    return tmp / "runs"


def copy_of(runs, tmp_path):
    shutil.copytree(runs / "interrupted", tmp_path / "runs" / "interrupted")
    url = f"file://{tmp_path}/runs"
    return url, StorageSpec(url, "interrupted", {}).open()


@pytest.mark.parametrize("options", [{}, {"accumulate_grad_batches": 2, "clip_grad_norm": 0.5},
                                     {"precision": "bf16-mixed"}], ids=["plain", "accumulate-clip", "bf16"])
def test_fsdp_on_two_workers_trains_as_ddp_does_on_the_same_data(ray_cluster, tmp_path, options):
    url = f"file://{tmp_path}/runs"
    runs = {strategy: make(url, strategy, cbs=[], strategy=strategy, **options).fit(epochs=2, verbose=0)
            for strategy in ("ddp", "fsdp")}
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert fsdp.history.keys() == ddp.history.keys()
    for key, values in ddp.history.items():
        assert fsdp.history[key] == pytest.approx(values, rel=1e-5, abs=1e-6), key
    for (name, a), (_, b) in zip(ddp.model.named_parameters(), fsdp.model.named_parameters()):
        assert type(b) is torch.nn.Parameter and not hasattr(b, "to_local"), name  # a plain module
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_an_interrupted_fsdp_run_resumes_from_its_sharded_backup_bit_identical(ray_cluster, reference, interrupted,
                                                                                tmp_path):
    url, storage = copy_of(interrupted, tmp_path)
    manifest = Manifest.from_json(storage.read_json(f"{step_dir('backup', 9)}/{MANIFEST}"))
    names = [e.name for e in manifest.files]
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= set(names)
    resumed = make(url, "interrupted", never_failing(tmp_path)).fit(epochs=3, verbose=0)
    assert_same_run(reference, resumed)
    restored = next(e for e in read_events(storage) if e["type"] == "restored")
    assert restored["step"] == 9 and restored["phase"] == "batch"


def test_a_truncated_shard_in_the_newest_backup_makes_the_resume_use_the_previous_one(ray_cluster, reference,
                                                                                     interrupted, tmp_path):
    url, storage = copy_of(interrupted, tmp_path)
    committed = [s for s in list_steps(storage, "backup") if storage.exists(f"{step_dir('backup', s)}/{MANIFEST}")]
    assert committed == [9, 6]
    shard = f"{step_dir('backup', 9)}/sharded/__1_0.distcp"
    storage.write_bytes(shard, storage.read_bytes(shard)[:100])
    with pytest.warns(UserWarning, match="skipping backup step 9"):
        resumed = make(url, "interrupted", never_failing(tmp_path)).fit(epochs=3, verbose=0)
    assert_same_run(reference, resumed)
    assert next(e for e in read_events(storage) if e["type"] == "restored")["step"] == 6


# before the fits on 1 and 3 workers: it takes over the 2-worker group the fit above parked
def test_model_checkpoint_and_export_files_of_an_fsdp_run_load_into_a_plain_module(ray_cluster, tmp_path):
    url = f"file://{tmp_path}/runs"
    cbs = [callbacks.BackupAndRestore(save_freq="epoch", delete_checkpoint=False),
           callbacks.ModelCheckpoint("last.pt", save_weights_only=True)]
    history = make(url, "files", cbs=cbs).fit(epochs=2, verbose=0)
    storage = StorageSpec(url, "files", {}).open()
    exported = tmp_path / "exported.pt"
    assert cli_main(["export", f"{url}/files", "-o", str(exported)]) == 0
    x = workloads.make_classification(16, seed=9).tensors[0]
    history.model.eval()
    expected = history.model(x)
    for path in (storage.path("checkpoints/last.pt"), str(exported)):
        plain = workloads.dropout_model()
        plain.load_state_dict(torch.load(path, weights_only=True))
        plain.eval()
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("workers", [1, 3])
def test_a_backup_of_two_fsdp_workers_resumes_on_another_number_at_the_start_of_its_epoch(
        ray_cluster, reference, interrupted, tmp_path, workers):
    url, storage = copy_of(interrupted, tmp_path)
    resumed = make(url, "interrupted", never_failing(tmp_path), num_workers=workers).fit(epochs=3, verbose=0)
    events = read_events(storage)
    assert next(e for e in events if e["type"] == "restored")["step"] == 9
    assert resumed.epoch == [0, 1, 2]
    # epoch 0 ended before the backup: its logs are the reference's; epoch 1 restarted on `workers` ranks
    assert resumed.history["loss"][0] == reference.history["loss"][0]
    assert all(torch.isfinite(torch.tensor(v)) for v in resumed.history["loss"])
    # training goes on from the resharded state: better than after epoch 0 (more steps on 1 worker: batches of 16)
    assert resumed.history["val_loss"][-1] < resumed.history["val_loss"][0]
    assert resumed.history["val_loss"][1] < reference.history["val_loss"][0]
