"""``data()`` returning ``ray.data.Dataset``\\ s: argument checks before any worker starts, batched sources in
the loop's stream (no Ray), and two fits on the session's Ray: every row once per epoch across ranks from a
lazily generated dataset under a small object-store budget, validation counting each row once, and a
mid-epoch failure resumed from a backup ending bit-identical to the uninterrupted run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import IterableDataset

from orchestrator import Trainer, callbacks
from orchestrator.cluster.ray_data import RayDataInput, RayDataShard, check_ray_data_config, is_ray_dataset
from orchestrator.core.config import LoopConfig
from orchestrator.loop.iterable import RankBatches, batch_loader
from orchestrator.storage.fs import StorageSpec
from orchestrator.storage.run_files import read_events
from ray_data_rows import FEATURES, features

pytestmark = pytest.mark.timeout(600)

N_TRAIN, N_VAL, BATCH, EPOCHS = 80, 31, 8, 2  # 40 rows, 5 steps per rank and epoch


def ray_datasets():
    """Lazily generated train and validation sets: nothing exists before a rank reads it; Ray Data may keep
    at most 64 KiB of blocks in the object store (past that by a block, to make progress), less than a pass
    (80 rows of 4 KiB padding each, in 4 blocks: few blocks, few tasks)."""
    import ray.data
    from ray.data import ExecutionResources

    made = []
    for n, offset in ((N_TRAIN, 0), (N_VAL, 10_000)):
        ds = ray.data.range(n, override_num_blocks=4).map_batches(features, batch_size=8, fn_kwargs={"offset": offset})
        ds.context.enable_progress_bars = False
        ds.context.execution_options.resource_limits = ExecutionResources(object_store_memory=64 * 1024)
        made.append(ds)
    return made[0], made[1]


def ray_train_dataset():
    """The training set of :func:`ray_datasets` alone (no validation: one split coordinator per attempt, not two)."""
    return ray_datasets()[0], None


class Recording(torch.nn.Module):
    """A linear classifier on ``x[:, 1:]`` that appends the ids of every training batch to
    ``<folder>/rank<r>-<pid>.txt``; rank 1 raises at its ``fail_at``-th training batch while ``flag`` exists."""

    def __init__(self, folder: str, fail_at: int = -1, flag: str | None = None) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(FEATURES, 3)
        self.folder, self.fail_at, self.flag, self.calls = folder, fail_at, flag, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            rank = dist.get_rank()
            if rank == 1 and self.calls == self.fail_at and self.flag and os.path.exists(self.flag):
                os.remove(self.flag)
                raise RuntimeError(f"injected failure at rank 1's training batch {self.fail_at}")
            self.calls += 1
            with open(Path(self.folder) / f"rank{rank}-{os.getpid()}.txt", "a") as f:
                f.write(" ".join(str(int(i)) for i in x[:, 0].tolist()) + "\n")
        return self.linear(x[:, 1:])


class ModelFactory:
    def __init__(self, *args) -> None:
        self.args = args

    def __call__(self) -> torch.nn.Module:
        return Recording(*self.args)


def sgd(params):
    return torch.optim.SGD(params, lr=0.2)


def make(tmp_path: Path, run_name: str, **overrides) -> Trainer:
    kwargs = dict(model=ModelFactory(str(tmp_path / run_name)), optimizer=sgd, loss=torch.nn.functional.cross_entropy,
                  data=ray_datasets, ray_data_columns=("x", "y"), ray_data_shuffle_buffer=16, batch_size=BATCH,
                  num_workers=2, seed=3, storage=str(tmp_path), run_name=run_name, warm_standbys=False,
                  callbacks=[callbacks.BackupAndRestore(save_freq=3, delete_checkpoint=False)])
    kwargs.update(overrides)
    (tmp_path / run_name).mkdir(exist_ok=True)
    return Trainer(**kwargs)


@pytest.fixture
def ray_data_cluster(ray_cluster):
    """The session's Ray; afterwards the detached actors Ray Data starts for itself (stats, autoscaling) end,
    so that the no-actor-left check of ``ray_cluster`` holds (Ray Data starts them again when used)."""
    yield ray_cluster
    from ray._private import state

    detached = {a["Name"] for a in state.actors().values() if a["State"] != "DEAD" and a["IsDetached"] and a["Name"]}
    for named in ray_cluster.util.list_named_actors(all_namespaces=True):
        if named["name"] in detached:
            try:
                ray_cluster.kill(ray_cluster.get_actor(named["name"], namespace=named["namespace"]), no_restart=True)
            except ValueError:  # gone meanwhile
                pass


# -- arguments ---------------------------------------------------------------------------------
def _trainer(**overrides) -> Trainer:
    kwargs = dict(model=ModelFactory("."), optimizer=sgd, loss=torch.nn.functional.cross_entropy, data=ray_datasets)
    kwargs.update(overrides)
    return Trainer(**kwargs)


@pytest.mark.parametrize("overrides", [
    {"ray_data_columns": ("x",)}, {"ray_data_columns": ("x", "x")}, {"ray_data_columns": "xy"},
    {"ray_data_columns": ("x", 1)}, {"ray_data_columns": ("", "y")}, {"ray_data_columns": {"x": "y"}},
    {"ray_data_columns": ("x", "y", "z")},
])
def test_a_bad_column_mapping_is_rejected_before_any_worker_starts_naming_the_argument(overrides):
    with pytest.raises(ValueError, match=r"ray_data_columns must be None or \(features, label\)"):
        _trainer(**overrides)


@pytest.mark.parametrize("value", [0, -4, 2.5, True, "16"])
def test_a_bad_shuffle_buffer_is_rejected_naming_the_argument(value):
    with pytest.raises(ValueError, match="ray_data_shuffle_buffer must be an integer >= 1"):
        _trainer(ray_data_shuffle_buffer=value)


def test_the_column_mapping_is_kept_as_a_pair_and_recorded_in_the_run_config():
    trainer = _trainer(ray_data_columns=["x", "y"], ray_data_shuffle_buffer=64)
    assert trainer.loop.ray_data_columns == ("x", "y")
    snapshot = trainer._config_snapshot(1)
    assert snapshot["ray_data_columns"] == ["x", "y"] and snapshot["ray_data_shuffle_buffer"] == 64


def _config(**overrides) -> LoopConfig:
    kwargs = dict(model=ModelFactory("."), optimizer=sgd, data=ray_datasets, loss=torch.nn.functional.cross_entropy)
    kwargs.update(overrides)
    return LoopConfig(**kwargs)


@pytest.mark.parametrize("overrides,match", [
    ({"loader_workers": 2, "ray_data_columns": ("x", "y")}, "loader_workers=2 does not apply"),
    ({}, r"pass Trainer\(ray_data_columns=\(features, label\)\)"),
])
def test_settings_that_ray_dataset_input_cannot_honour_fail_on_every_rank_before_the_split(overrides, match):
    with pytest.raises(ValueError, match=match):
        check_ray_data_config(_config(**overrides))


def test_ray_data_settings_without_a_ray_dataset_are_an_error_and_other_data_passes_through():
    data = [torch.zeros(2)] * 4
    assert RayDataInput()((data, None), 0, 1, _config()) == (data, None)
    assert RayDataInput()(data, 0, 1, _config()) == (data, None)
    with pytest.raises(ValueError, match="ray_data_columns and ray_data_shuffle_buffer apply to ray.data.Dataset"):
        RayDataInput()((data, None), 0, 1, _config(ray_data_columns=("x", "y")))
    assert not is_ray_dataset(data)


def test_a_shard_turns_dict_batches_into_the_mapped_pair_and_names_a_missing_column():
    batch = {"x": torch.ones(2, 3), "y": torch.zeros(2)}
    x, y = RayDataShard(None, batch_size=2, columns=("x", "y"))._pick(batch)
    assert x is batch["x"] and y is batch["y"]
    assert RayDataShard(None, batch_size=2, columns=None)._pick(batch) is batch
    with pytest.raises(ValueError, match=r"ray_data_columns=\('image', 'y'\) names column\(s\) \['image'\]"):
        RayDataShard(None, batch_size=2, columns=("image", "y"))._pick(batch)


# -- a batched source in the loop's stream (no Ray) ------------------------------------------------
class Batches(IterableDataset):
    """Batches ``[p*100 + 3i, ..., p*100 + 3i + 2]`` of pass ``p``: what a Ray Dataset shard yields."""

    rank_aware = True
    yields_batches = True

    def __init__(self, n: int) -> None:
        self.n, self.data_pass = n, 0

    def set_epoch(self, data_pass: int) -> None:
        self.data_pass = data_pass

    def __iter__(self):
        return (torch.arange(3) + 100 * self.data_pass + 3 * i for i in range(self.n))


def test_a_source_that_yields_batches_is_read_batch_by_batch_and_a_resume_skips_the_trained_ones():
    batches = RankBatches(Batches(5), rank=1, world_size=2, batch_size=64, stride=False)
    loader = batch_loader(batches, workers=0, pin_memory=False, seed=0)
    batches.begin(1)
    whole = [(b.tolist(), mark["batches"]) for b, mark in loader]
    assert whole == [([100 + 3 * i, 101 + 3 * i, 102 + 3 * i], i + 1) for i in range(5)]
    batches.begin(1, mark={"batches": 3, "read": 3, "inner": None})  # a resume after 3 trained batches
    assert [(b.tolist(), mark["batches"]) for b, mark in loader] == whole[3:]


# -- fits on Ray -------------------------------------------------------------------------------
def _ids_per_epoch(folder: Path) -> dict[int, list[list[int]]]:
    """rank -> the ids it trained on, epoch by epoch (5 batches an epoch), from an uninterrupted run's records."""
    out = {}
    for path in sorted(folder.glob("rank*.txt")):
        rank = int(path.name[4:path.name.index("-")])
        rows = [[int(v) for v in line.split()] for line in path.read_text().splitlines()]
        per = N_TRAIN // 2 // BATCH
        out[rank] = [sum(rows[e * per:(e + 1) * per], []) for e in range(EPOCHS)]
    return out


def _val_loss(model: torch.nn.Module) -> float:
    """The mean loss of ``model`` over every validation row, computed here from the same features."""
    rows = features({"id": np.arange(N_VAL)}, offset=10_000)
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(rows["x"]))
        return float(torch.nn.functional.cross_entropy(out, torch.from_numpy(rows["y"])))


def test_a_lazily_generated_ray_dataset_trains_every_row_once_per_epoch_and_a_mid_epoch_resume_is_exact(
        ray_data_cluster, tmp_path):
    reference = make(tmp_path, "reference").fit(epochs=EPOCHS, verbose=0)
    ids = _ids_per_epoch(tmp_path / "reference")
    assert sorted(ids) == [0, 1]
    for epoch in range(EPOCHS):  # equal=True: 40 rows each; together every row once
        assert len(ids[0][epoch]) == len(ids[1][epoch]) == N_TRAIN // 2
        assert sorted(ids[0][epoch] + ids[1][epoch]) == list(range(N_TRAIN))
    assert ids[0][0] != ids[0][1]  # the local shuffle is reseeded each pass
    assert len(reference.history["val_loss"]) == EPOCHS
    assert reference.history["val_loss"][-1] == pytest.approx(_val_loss(reference.model), rel=1e-5)

    flag = tmp_path / "armed"
    flag.write_text("x")
    # Validation re-reads its whole set at every epoch end, resumed or not: the resumed run trains without it
    # and is compared on what training made (its losses and parameters).
    resumed = make(tmp_path, "resumed", max_failures=1, data=ray_train_dataset,
                   model=ModelFactory(str(tmp_path / "resumed"), 8, str(flag))).fit(epochs=EPOCHS, verbose=0)
    events = read_events(StorageSpec(str(tmp_path), "resumed").open())
    restored = [e for e in events if e["type"] == "restored"]
    assert restored and restored[0]["step"] % 5 != 0  # backups at steps 3 and 6: inside an epoch
    assert resumed.history == {k: v for k, v in reference.history.items() if not k.startswith("val_")}
    for (name, a), (_, b) in zip(reference.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
