"""TrainLoop on a real one-rank gloo group, with an in-process link to a scripted stand-in coordinator (no Ray)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

import workloads
from orchestrator.core.config import LoopConfig
from orchestrator.decisions import Backup, Decision, Report, ReportKind, Rollback, SetLearningRate, StopTraining
from orchestrator.loop.specs import LoopResult, TrainSpec
from orchestrator.loop.train_loop import TrainLoop
from orchestrator.storage.checkpoint import COORDINATOR_FILE, SHARED_FILE, decode_state, rank_file
from orchestrator.storage.fs import StorageSpec

TRAIN, VAL = 40, 12
BATCH = 8
STEPS = TRAIN // BATCH
BEGIN, EPOCH_BEGIN, BATCH_END, EPOCH_END, END = (ReportKind.TRAIN_BEGIN, ReportKind.EPOCH_BEGIN, ReportKind.BATCH_END,
                                                 ReportKind.EPOCH_END, ReportKind.TRAIN_END)
Key = tuple[ReportKind, int, int]


class StandInCoordinator:
    """Records what the rank reports and answers with scripted decisions, each given once.

    Args:
        script: Decisions by ``(kind, epoch, step)``; ``step`` is ``-1`` for train and epoch reports.
        draws_rng: Draw from the global torch stream at every sync, as code around a real sync might.
    """

    def __init__(self, script: dict[Key, list[Decision]] | None = None, draws_rng: bool = False) -> None:
        self.script = dict(script or {})
        self.draws_rng = draws_rng
        self.reports: list[Report] = []
        self.persisted: list[tuple[int, str, Any, dict[str, Any]]] = []

    def handle(self, report: Report) -> list[Decision]:
        self.reports.append(report)
        if self.draws_rng:
            torch.rand(1)
        return self.script.pop((report.kind, report.epoch, report.step), [])

    def kinds(self) -> list[tuple[str, int]]:
        return [(str(r.kind), r.epoch) for r in self.reports]

    def report(self, kind: ReportKind, epoch: int) -> Report:
        return next(r for r in self.reports if r.kind == kind and r.epoch == epoch)


class InProcessLink:
    """The :class:`~orchestrator.loop.train_loop.CoordinatorLink` protocol, in process."""

    def __init__(self, coordinator: StandInCoordinator) -> None:
        self.coordinator = coordinator

    def sync(self, report: Report) -> list[Decision]:
        return self.coordinator.handle(report)

    def progress(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        pass

    def persisted(self, rank: int, folder: str, entries: Any, meta: dict[str, Any]) -> None:
        self.coordinator.persisted.append((rank, folder, entries, meta))

    def heartbeat(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _data() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(42)
    x, xv = torch.randn(TRAIN, 4, generator=g), torch.randn(VAL, 4, generator=g)
    w = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    return TensorDataset(x, x @ w), TensorDataset(xv, xv @ w)


def _linear() -> torch.nn.Module:
    return torch.nn.Linear(4, 1)


def _with_dropout() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))


def _config(model=_linear, lr: float = 0.05) -> LoopConfig:
    return LoopConfig(model=model, optimizer=lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9),
                      data=_data, loss=torch.nn.functional.mse_loss, metrics={"mae": "mae"}, batch_size=BATCH,
                      seed=0)


def _run(coordinator: StandInCoordinator, config: LoopConfig, epochs: int, storage: Any = None,
         batch_sync_every: int | None = None, resume_from: str | None = None) -> LoopResult:
    spec = TrainSpec(loop=config, epochs=epochs, batch_sync_every=batch_sync_every, resume_from=resume_from)
    return TrainLoop(spec, rank=0, world_size=1, device=torch.device("cpu"), link=InProcessLink(coordinator),
                     storage=storage).run()


def _storage(tmp_path):
    return StorageSpec(url=str(tmp_path), run_name="r").open()


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_loop_reports_train_and_epoch_sync_points_in_order(group):
    coordinator = StandInCoordinator()
    result = _run(coordinator, _config(), epochs=2)
    assert coordinator.kinds() == [("train_begin", 0), ("epoch_begin", 0), ("epoch_end", 0),
                                   ("epoch_begin", 1), ("epoch_end", 1), ("train_end", 1)]
    assert (result.epochs_run, result.steps_run, result.stopped_at) == (2, 2 * STEPS, None)
    assert all(r.steps_per_epoch == STEPS for r in coordinator.reports)
    assert coordinator.report(EPOCH_END, 1).global_step == 2 * STEPS


def test_batch_sync_points_come_every_n_global_steps(group):
    coordinator = StandInCoordinator()
    _run(coordinator, _config(), epochs=2, batch_sync_every=2)
    batch_ends = [(r.epoch, r.step, r.global_step) for r in coordinator.reports if r.kind == BATCH_END]
    assert batch_ends == [(0, 1, 2), (0, 3, 4), (1, 0, 6), (1, 2, 8), (1, 4, 10)]


def test_epoch_sums_are_exact_sums_over_every_sample_of_the_epoch(group):
    coordinator = StandInCoordinator()
    _run(coordinator, _config(lr=0.0), epochs=1)  # the weights stay the initial ones
    torch.manual_seed(0)
    model = _linear()
    (x, y), (xv, yv) = (ds.tensors for ds in _data())
    with torch.no_grad():
        train_err, val_err = model(x) - y, model(xv) - yv
    end = coordinator.report(EPOCH_END, 0)
    assert end.train.count == TRAIN and end.val.count == VAL
    assert end.train.totals["loss"] == pytest.approx(float(train_err.square().sum()), rel=1e-5)
    assert end.train.totals["mae"] == pytest.approx(float(train_err.abs().sum()), rel=1e-5)
    assert end.val.totals["loss"] == pytest.approx(float(val_err.square().sum()), rel=1e-5)


def test_a_stop_training_decision_at_an_epoch_end_stops_after_that_epoch(group):
    coordinator = StandInCoordinator({(EPOCH_END, 1, -1): [StopTraining("early_stopping")]})
    result = _run(coordinator, _config(), epochs=5)
    assert coordinator.kinds()[-3:] == [("epoch_begin", 1), ("epoch_end", 1), ("train_end", 1)]
    assert result.epochs_run == 2 and result.steps_run == 2 * STEPS


def test_a_set_learning_rate_decision_changes_the_optimizer_learning_rate(group):
    coordinator = StandInCoordinator({(EPOCH_BEGIN, 1, -1): [SetLearningRate(0.01)]})
    result = _run(coordinator, _config(lr=0.05), epochs=3)
    assert result.learning_rates == [0.05, 0.01, 0.01]
    assert coordinator.report(EPOCH_END, 0).learning_rate == 0.05
    assert coordinator.report(EPOCH_END, 2).learning_rate == 0.01


def test_a_backup_decision_persists_the_shared_coordinator_and_rank_files_with_their_sizes(group, tmp_path):
    storage = _storage(tmp_path)
    state = {"best": 0.5, "wait": (1, 2)}
    coordinator = StandInCoordinator({(BATCH_END, 1, 2): [Backup(backup_dir="backup", coordinator_state=state)]})
    _run(coordinator, _config(), epochs=2, storage=storage, batch_sync_every=1)

    (rank, folder, entries, meta), = coordinator.persisted
    assert (rank, folder) == (0, f"backup/step-{STEPS + 3}")
    assert (meta["epoch"], meta["batch"], meta["step"], meta["phase"]) == (1, 2, STEPS + 3, "batch")
    assert sorted(e.name for e in entries) == sorted([SHARED_FILE, COORDINATOR_FILE, rank_file(0)])
    for entry in entries:
        path = tmp_path / "r" / folder / entry.name
        assert path.stat().st_size == entry.size > 0
        assert entry.matches(path.read_bytes())
    assert decode_state(storage.read_bytes(f"{folder}/{COORDINATOR_FILE}")) == state


def test_a_run_resumed_mid_epoch_from_a_backup_ends_bit_identical_to_an_uninterrupted_one(group, tmp_path):
    storage = _storage(tmp_path)
    config = _config(model=_with_dropout)  # dropout: the resumed run also needs the RNG streams back
    uninterrupted = StandInCoordinator({(BATCH_END, 1, 2): [Backup(backup_dir="backup")]}, draws_rng=True)
    whole = _run(uninterrupted, config, epochs=3, storage=storage, batch_sync_every=1)
    (_, folder, _, _), = uninterrupted.persisted

    resumed = StandInCoordinator(draws_rng=True)
    rest = _run(resumed, config, epochs=3, storage=storage, batch_sync_every=1, resume_from=folder)

    _assert_same_weights(rest.state_dict, whole.state_dict)
    assert (rest.learning_rates, rest.epochs_run, rest.steps_run) == (whole.learning_rates, 3, 3 * STEPS)
    assert [(str(r.kind), r.epoch, r.step) for r in resumed.reports[:2]] == [("train_begin", 0, -1),
                                                                             ("batch_end", 1, 3)]
    assert resumed.report(EPOCH_END, 1).train == uninterrupted.report(EPOCH_END, 1).train


def test_a_rollback_decision_reloads_the_backup_in_place_and_replays_identically(group, tmp_path):
    storage = _storage(tmp_path)
    config = _config(model=_with_dropout)
    backup = {(BATCH_END, 1, 2): [Backup(backup_dir="backup")]}
    straight = StandInCoordinator(dict(backup), draws_rng=True)
    whole = _run(straight, config, epochs=2, storage=storage, batch_sync_every=1)

    folder = f"backup/step-{STEPS + 3}"
    rolled = StandInCoordinator({**backup, (BATCH_END, 1, 4): [Rollback(folder=folder)]}, draws_rng=True)
    again = _run(rolled, config, epochs=2, storage=_storage(tmp_path / "other"), batch_sync_every=1)

    steps_seen = [(r.epoch, r.step) for r in rolled.reports if r.kind == BATCH_END and r.epoch == 1]
    assert steps_seen == [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (1, 3), (1, 4)]
    _assert_same_weights(again.state_dict, whole.state_dict)
    assert again.steps_run == whole.steps_run
    assert rolled.report(EPOCH_END, 1).train == straight.report(EPOCH_END, 1).train


def _recording_step(updates: list[torch.Tensor]):
    """The mse step, recording the flattened parameters at every training call (``updates[k]`` holds them after k
    optimizer steps)."""

    def step(model, batch):
        if model.training:
            updates.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
        inputs, targets = batch
        return {"loss": torch.nn.functional.mse_loss(model(inputs), targets)}

    return step


@pytest.mark.parametrize("clip", [1e-3, None])
def test_clip_grad_norm_bounds_the_norm_of_every_update_and_training_stays_finite(group, clip):
    seen: list[torch.Tensor] = []
    # plain SGD with lr=1: an update is exactly minus the (clipped) gradient
    config = LoopConfig(model=_linear, optimizer=lambda params: torch.optim.SGD(params, lr=1.0), data=_data,
                        train_step=_recording_step(seen), batch_size=BATCH, seed=0, clip_grad_norm=clip)
    coordinator = StandInCoordinator()
    _run(coordinator, config, epochs=1)
    norms = [float((after - before).norm()) for before, after in zip(seen, seen[1:])]
    assert len(norms) == STEPS - 1
    if clip is None:  # the same run unclipped takes far larger steps
        assert min(norms) > 100 * 1e-3, norms
    else:  # every step was clipped to the bound, none beyond it (up to float32 rounding of the parameters)
        assert all(0.99 * clip <= n <= clip + 1e-6 for n in norms), norms
    end = coordinator.report(EPOCH_END, 0)
    assert end.train.count == TRAIN and torch.isfinite(torch.tensor(end.train.totals["loss"]))


def _dict_step_weighting_every_batch_equally(model, batch):
    return {**workloads.dict_step(model, batch), "batch_size": 1}


@pytest.mark.parametrize("step, weight", [(workloads.dict_step, 1.0),
                                          (_dict_step_weighting_every_batch_equally, 1 / BATCH)],
                         ids=["batch_size_inferred", "batch_size_returned"])
def test_a_custom_step_on_dict_batches_reports_its_custom_metrics_weighted_by_its_batch_size(group, step, weight):
    # lr = 0: the weights stay the initial ones, so the exact sums can be computed here
    config = LoopConfig(model=workloads.tiny_model, optimizer=workloads.frozen_sgd, data=workloads.dict_batches_data,
                        train_step=step, batch_size=BATCH, seed=0)
    coordinator = StandInCoordinator()
    _run(coordinator, config, epochs=1)
    torch.manual_seed(0)
    model = workloads.tiny_model()
    train, _ = workloads.dict_batches_data()
    x, y = train.base.tensors
    with torch.no_grad():
        outputs = model(x)
    end = coordinator.report(EPOCH_END, 0)
    # dict_step returns no batch_size (inferred from the batch: one per sample); the other one says 1 per batch
    assert end.train.count == len(y) * weight
    assert set(end.train.totals) == {"loss", "acc"}
    expected_loss = torch.nn.functional.cross_entropy(outputs, y, reduction="sum").item() * weight
    assert end.train.totals["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert end.train.totals["acc"] == pytest.approx(float((outputs.argmax(1) == y).sum()) * weight, rel=1e-6)
    assert end.val is None
