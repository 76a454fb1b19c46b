"""A rank's named components: one save path and one load path over the mapping (no Ray, no process group)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from orchestrator.decisions import Backup
from orchestrator.loop.rank_state import (
    Component,
    MetricSums,
    Position,
    Snapshots,
    rank_components,
)
from orchestrator.loop.saver import RankSaver
from orchestrator.loop.specs import LoopResult
from orchestrator.storage.checkpoint import COORDINATOR_FILE, SHARED_FILE, decode_state, rank_file, step_dir
from orchestrator.storage.fs import StorageSpec

CPU = torch.device("cpu")


class Counter:
    """A toy component: nothing in the saver knows about it."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = int(state["value"])


class Recorder:
    """Stands in for the link's ``persisted``: keeps every call."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, rank, folder, entries, meta) -> None:
        self.calls.append((rank, folder, entries, meta))


class RankParts:
    """One rank's training state, built from a seed so that two ranks (or runs) differ."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(3, 2)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1 * (seed + 1), momentum=0.9)
        self.model(torch.randn(4, 3)).sum().backward()
        self.optimizer.step()  # momentum buffers exist
        self.snapshots = Snapshots()
        self.snapshots.keep("best", self.model)
        self.position = Position(epoch=seed, batch=2, global_step=7 + seed, phase="batch")
        self.metric_sums = MetricSums(CPU)
        self.metric_sums.train.add(torch.tensor(0.5 + seed), {"mae": torch.tensor(0.25)}, n=4)
        self.metric_sums.see(loss_sum=2.0 + seed, count=4.0)
        self.result = LoopResult(rank=0, learning_rates=[0.1, 0.05], epochs_run=seed, steps_run=7 + seed,
                                 stopped_at=(seed, 2) if seed else None)
        self.components = rank_components(self.model, self.optimizer, snapshots=self.snapshots,
                                          position=self.position, metric_sums=self.metric_sums, result=self.result)


def _storage(tmp_path):
    return StorageSpec(url=str(tmp_path), run_name="r").open()


def _save(components, storage, rank: int = 0, world_size: int = 1, state=None, position=None):
    done = Recorder()
    saver = RankSaver(components, rank=rank, world_size=world_size, storage=storage, on_persisted=done)
    saver.backup(Backup(backup_dir="backup", coordinator_state=state), position or Position(global_step=7))
    saver.flush()
    return done


def _assert_same_state(a: RankParts, b: RankParts) -> None:
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    opt_a, opt_b = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for key in opt_a["state"]:
        assert torch.equal(opt_a["state"][key]["momentum_buffer"], opt_b["state"][key]["momentum_buffer"])
    assert a.snapshots.kept.keys() == b.snapshots.kept.keys()
    assert all(torch.equal(a.snapshots.kept["best"][k], b.snapshots.kept["best"][k]) for k in a.snapshots.kept["best"])
    assert a.position == b.position
    assert a.metric_sums.train.phase_sums() == b.metric_sums.train.phase_sums()
    assert (a.metric_sums.seen_loss, a.metric_sums.seen_count) == (b.metric_sums.seen_loss, b.metric_sums.seen_count)
    assert (a.result.learning_rates, a.result.epochs_run, a.result.steps_run, a.result.stopped_at) == \
        (b.result.learning_rates, b.result.epochs_run, b.result.steps_run, b.result.stopped_at)


def test_save_then_load_round_trips_every_component_of_the_mapping(tmp_path):
    storage = _storage(tmp_path)
    saved, restored = RankParts(seed=1), RankParts(seed=2)
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    done = _save(saved.components, storage, state={"best": float("inf"), "wait": 2},
                 position=saved.position)
    expected_rng = (random.random(), float(np.random.rand()), torch.rand(2))

    (rank, folder, entries, meta), = done.calls
    assert (rank, folder) == (0, step_dir("backup", saved.position.global_step))
    assert {e.name for e in entries} == {SHARED_FILE, COORDINATOR_FILE, rank_file(0)}
    assert (meta["epoch"], meta["batch"], meta["step"], meta["phase"]) == (1, 2, 8, "batch")
    assert decode_state(storage.read_bytes(f"{folder}/{COORDINATOR_FILE}")) == {"best": float("inf"), "wait": 2}

    RankSaver(restored.components, rank=0, world_size=1, storage=storage, on_persisted=Recorder()).load(folder).apply()
    _assert_same_state(saved, restored)
    assert (random.random(), float(np.random.rand())) == expected_rng[:2]
    assert torch.equal(torch.rand(2), expected_rng[2])


def test_shared_components_are_written_by_rank_0_only_and_every_rank_writes_its_own_file(tmp_path):
    storage = _storage(tmp_path)
    rank0, rank1 = RankParts(seed=0), RankParts(seed=0)
    rank1.metric_sums.see(loss_sum=5.0, count=1.0)  # a rank's own state differs from rank 0's
    done0 = _save(rank0.components, storage, rank=0, world_size=2)
    done1 = _save(rank1.components, storage, rank=1, world_size=2)

    assert {e.name for e in done0.calls[0][2]} == {SHARED_FILE, COORDINATOR_FILE, rank_file(0)}
    assert [e.name for e in done1.calls[0][2]] == [rank_file(1)]
    folder = done0.calls[0][1]
    assert storage.listdir(folder) and not storage.exists(f"{folder}/rank-2.pt")
    reloaded = RankParts(seed=3)
    RankSaver(reloaded.components, rank=1, world_size=2, storage=storage, on_persisted=Recorder()).load(folder)
    assert torch.equal(reloaded.model.weight, rank0.model.weight)  # the shared file, written by rank 0
    assert reloaded.metric_sums.seen_loss == rank1.metric_sums.seen_loss  # rank 1's own file


def test_a_component_added_to_the_mapping_is_saved_and_restored_without_touching_the_saver(tmp_path):
    storage = _storage(tmp_path)
    saved, restored = RankParts(seed=1), RankParts(seed=2)
    saved_extra = {"scaler": Component(Counter(41), shared=True), "loader": Component(Counter(7))}
    restored_extra = {name: Component(Counter(), shared=c.shared) for name, c in saved_extra.items()}
    done = _save({**saved.components, **saved_extra}, storage)
    folder = done.calls[0][1]

    RankSaver({**restored.components, **restored_extra}, rank=0, world_size=1, storage=storage,
              on_persisted=Recorder()).load(folder).apply()
    assert restored_extra["scaler"].stateful.value == 41
    assert restored_extra["loader"].stateful.value == 7
    _assert_same_state(saved, restored)


def test_components_that_restore_last_are_restored_only_when_the_pending_restore_is_applied(tmp_path):
    storage = _storage(tmp_path)
    saved = {**RankParts(seed=1).components, "late": Component(Counter(9), restore_last=True)}
    torch.manual_seed(5)
    done = _save(saved, storage)
    expected = torch.rand(3)  # what the saved torch stream draws next
    late = Counter()
    components = {**RankParts(seed=2).components, "late": Component(late, restore_last=True)}
    torch.manual_seed(123)
    before = torch.get_rng_state()

    pending = RankSaver(components, rank=0, world_size=1, storage=storage,
                        on_persisted=Recorder()).load(done.calls[0][1])
    assert late.value == 0 and torch.equal(torch.get_rng_state(), before)
    assert components["position"].stateful == Position(1, 2, 8, "batch")  # the others are already restored
    pending.apply()
    assert late.value == 9 and torch.equal(torch.rand(3), expected)


def test_a_backup_missing_a_component_fails_to_load_naming_it(tmp_path):
    storage = _storage(tmp_path)
    done = _save(RankParts(seed=1).components, storage)
    components = {**RankParts(seed=2).components, "scheduler": Component(Counter())}
    saver = RankSaver(components, rank=0, world_size=1, storage=storage, on_persisted=Recorder())
    with pytest.raises(KeyError, match="'scheduler'"):
        saver.load(done.calls[0][1])


def test_a_backup_of_non_finite_weights_is_refused_and_never_written(tmp_path):
    storage = _storage(tmp_path)
    parts = RankParts(seed=1)
    with torch.no_grad():
        parts.model.weight[0, 0] = float("nan")
    done = _save(parts.components, storage)
    (rank, folder, entries, meta), = done.calls
    assert entries is None and "non-finite" in meta["error"] and "'model'" in meta["error"]
    assert not storage.exists(f"{folder}/{SHARED_FILE}")
