"""TrainLoop on a real one-rank gloo group, with an in-process link to a scripted stand-in coordinator (no Ray)."""

from __future__ import annotations

import dataclasses

import math
import threading
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from rank_processes import CONTEXT, start_ranks
from torch.utils.data import TensorDataset

import workloads
from loop_links import QuietLink
from orchestrator import callbacks
from orchestrator.cluster.coordinator_core import CoordinatorCore
from orchestrator.core.config import LoopConfig
from orchestrator.core.events import EventType
from orchestrator.core.metrics import metric_directions
from orchestrator.decisions import Backup, Decision, Report, ReportKind, Rollback, SetLearningRate, StopTraining
from orchestrator.loop.specs import LoopResult, TrainSpec
from orchestrator.loop.train_loop import TrainLoop
from orchestrator.storage.checkpoint import (
    COORDINATOR_FILE,
    MANIFEST,
    SHARED_FILE,
    decode_state,
    rank_file,
    read_coordinator_state,
)
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


class InProcessLink(QuietLink):
    """The :class:`~orchestrator.loop.specs.CoordinatorLink` protocol, in process."""

    def __init__(self, coordinator: StandInCoordinator) -> None:
        self.coordinator = coordinator

    def sync(self, report: Report) -> list[Decision]:
        return self.coordinator.handle(report)

    def persisted(self, rank: int, folder: str, entries: Any, meta: dict[str, Any]) -> None:
        self.coordinator.persisted.append((rank, folder, entries, meta))


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


# -- a real coordinator core behind the in-process link ----------------------------------------
class CoreLink(QuietLink):
    """The :class:`~orchestrator.loop.specs.CoordinatorLink` protocol in process, to a real
    one-rank :class:`CoordinatorCore` (wired as the coordinator actor wires it)."""

    def __init__(self, core: CoordinatorCore) -> None:
        self.core = core

    def sync(self, report: Report) -> list[Decision]:
        decisions = self.core.handle({0: report})
        if self.core.error is not None:
            raise self.core.error
        return decisions

    def persisted(self, rank: int, folder: str, entries: Any, meta: dict[str, Any]) -> None:
        self.core.persisted(rank, folder, entries, meta)

    def events(self, kind: EventType) -> list[dict[str, Any]]:
        return [e for e in self.core.events if e["type"] == kind]


def _fit(cbs: list, config: LoopConfig, epochs: int, storage: Any = None, resume_from: str | None = None,
         preemption: threading.Event | None = None) -> tuple[LoopResult, CoreLink]:
    """One rank's fit against a real coordinator core: params as the Trainer's, a resume as the controller's."""
    params = {"metrics": list(config.metrics), "metric_directions": metric_directions(config.metrics),
              "epochs": epochs, "verbose": 0, "steps": None}
    for cb in cbs:
        cb.validate(dict(params))
    restore = read_coordinator_state(storage, resume_from) if resume_from else None
    core = CoordinatorCore(cbs, params, world_size=1, storage=storage, restore=restore, resumed_from=resume_from)
    link = CoreLink(core)
    spec = TrainSpec(loop=config, epochs=epochs, batch_sync_every=core.callbacks.batch_sync_every(),
                     resume_from=resume_from, resume_layout=(restore or {}).get("layout"))
    result = TrainLoop(spec, rank=0, world_size=1, device=torch.device("cpu"), link=link, storage=storage,
                       preemption=preemption).run()
    return result, link


def _all_finite(weights: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in weights.values())


def _poisoned_step(poison_call: int, kind: str):
    """The mse step; its training call number ``poison_call`` keeps the loss finite but makes every
    gradient NaN (``0 * sqrt(0)``) or infinite (``sqrt(0)``)."""
    calls = [0]

    def step(model, batch):
        inputs, targets = batch
        outputs = model(inputs)
        loss = torch.nn.functional.mse_loss(outputs, targets)
        if model.training:
            if calls[0] == poison_call:
                zero = outputs.sum() - outputs.sum().detach()  # exactly 0, with gradient 1
                root = torch.sqrt(zero)  # 0, with an infinite gradient
                loss = loss + (0.0 * root if kind == "nan" else root)
                assert math.isfinite(float(loss.detach()))
            calls[0] += 1
        return {"loss": loss}

    return step


def _poisoned_config(poison_call: int, kind: str = "nan") -> LoopConfig:
    return LoopConfig(model=_linear, optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
                      data=_data, train_step=_poisoned_step(poison_call, kind), batch_size=BATCH, seed=0)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_a_nonfinite_gradient_under_a_finite_loss_is_never_applied_and_terminate_on_nan_stops(group, kind):
    poison = STEPS + 2  # epoch 1, batch 2
    result, link = _fit([callbacks.TerminateOnNaN()], _poisoned_config(poison, kind), epochs=3)
    assert _all_finite(result.state_dict)
    assert result.stopped_at == (1, 2) and result.steps_run == poison + 1
    assert [(e["epoch"], e["step"]) for e in link.events(EventType.NAN_DETECTED)] == [(1, 2)]
    assert [e["reason"] for e in link.events(EventType.STOP)] == ["nan_detected"]
    # the epoch's logs stay finite: no update was applied, and the step's finite loss counts as it is
    assert [h["epoch"] for h in link.core.history] == [0, 1]
    assert all(math.isfinite(v) for h in link.core.history for v in h["logs"].values())


def test_a_nonfinite_gradient_rolls_back_with_rollback_on_nan_and_training_goes_on_finite(group, tmp_path):
    poison = STEPS + 2
    cbs = [callbacks.BackupAndRestore(save_freq=2), callbacks.RollbackOnNaN(max_rollbacks=1)]
    result, link = _fit(cbs, _poisoned_config(poison), epochs=3, storage=_storage(tmp_path))
    assert _all_finite(result.state_dict)
    rolled, = link.events(EventType.ROLLED_BACK)
    assert (rolled["epoch"], rolled["step"], rolled["skip"]) == (1, 2, [[1, 2]])
    assert result.stopped_at is None and result.epochs_run == 3
    assert [h["epoch"] for h in link.core.history] == [0, 1, 2]
    assert all(math.isfinite(v) for h in link.core.history for v in h["logs"].values())


# -- preemption at validation and at the epoch-end sync point -----------------------------------
VAL_BATCH = 4  # 3 validation batches per epoch


def _preempting_val_step(preemption: threading.Event, at_call: int | None):
    """The mse step; validation call number ``at_call`` (counted over the run) sets the preemption notice."""
    calls = [0]

    def step(model, batch):
        inputs, targets = batch
        if not model.training:
            if calls[0] == at_call:
                preemption.set()
            calls[0] += 1
        return {"loss": torch.nn.functional.mse_loss(model(inputs), targets)}

    return step


def _preemption_config(preemption: threading.Event, at_call: int | None) -> LoopConfig:
    return LoopConfig(model=_with_dropout, optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
                      data=_data, loss=torch.nn.functional.mse_loss, metrics={"mae": "mae"},
                      val_step=_preempting_val_step(preemption, at_call),
                      batch_size=BATCH, val_batch_size=VAL_BATCH, seed=0)


def _lr_callbacks() -> list:
    # epoch-end hooks with state: running them twice (or not at all) for an epoch would change the run
    return [callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=0, min_delta=10.0),
            callbacks.EarlyStopping(monitor="val_loss", patience=10)]


@pytest.mark.parametrize("at_call, phase, epoch_ends", [
    (3, "batch", 1),  # the first validation batch of epoch 1: validation abandoned at its next batch
    (5, "epoch_end", 2),  # its last batch: too late for validation, seen at the epoch-end sync point
], ids=["during_validation", "at_the_epoch_end"])
def test_a_preemption_notice_in_validation_backs_up_and_the_resumed_run_ends_like_an_uninterrupted_one(
        group, tmp_path, at_call, phase, epoch_ends):
    epochs = 3
    whole, straight = _fit(_lr_callbacks(), _preemption_config(threading.Event(), None), epochs,
                           storage=_storage(tmp_path / "straight"))

    storage = _storage(tmp_path / "preempted")
    notice = threading.Event()
    cut, preempted = _fit(_lr_callbacks(), _preemption_config(notice, at_call), epochs, storage=storage,
                          preemption=notice)
    assert cut.preempted and cut.epochs_run == epoch_ends
    assert [h["epoch"] for h in preempted.core.history] == list(range(epoch_ends))
    assert [e["epoch"] for e in preempted.events(EventType.PREEMPTED)] == [1]
    folder = f"backup/step-{2 * STEPS}"  # the end of epoch 1's training
    assert preempted.core.last_committed == folder
    manifest = storage.read_json(f"{folder}/{MANIFEST}")
    assert (manifest["epoch"], manifest["batch"], manifest["step"], manifest["phase"]) == \
        (1, STEPS - 1, 2 * STEPS, phase)

    rest, resumed = _fit(_lr_callbacks(), _preemption_config(threading.Event(), None), epochs, storage=storage,
                         resume_from=folder)
    assert not rest.preempted
    _assert_same_weights(rest.state_dict, whole.state_dict)
    assert resumed.core.history == straight.core.history  # validation and the epoch-end hooks ran once
    assert (rest.learning_rates, rest.epochs_run, rest.steps_run) == (whole.learning_rates, epochs, epochs * STEPS)
    assert len(set(whole.learning_rates)) > 1  # ReduceLROnPlateau acted: its state crossed the resume


def test_a_notice_at_the_last_epochs_end_lets_the_run_finish(group):
    notice = threading.Event()
    result, link = _fit([], _preemption_config(notice, at_call=5), epochs=2, preemption=notice)
    assert not result.preempted and result.epochs_run == 2
    assert link.events(EventType.PREEMPTED) == []


# -- two ranks: uneven validation shards, a notice on one rank only ------------------------------
def _two_rank_data() -> tuple[TensorDataset, TensorDataset]:
    train, _ = _data()
    g = torch.Generator().manual_seed(7)
    xv = torch.randn(9, 4, generator=g)  # shards of 5 and 4 samples: 2 and 1 batches of 4
    return train, TensorDataset(xv, xv.sum(1, keepdim=True))


class _RecordingLink(QuietLink):
    """A rank's link in its own process: records reports; a preempted report is answered with a stop."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, int, int, bool]] = []

    def sync(self, report: Report) -> list[Decision]:
        self.reports.append((str(report.kind), report.epoch, report.step, report.preempted))
        return [StopTraining(reason="preempted", source="preemption")] if report.preempted else []


def _two_rank_worker(rank: int, store: str, out: Any) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        torch.set_num_threads(1)
        notice = threading.Event()
        val_calls = [0]

        def step(model, batch):
            inputs, targets = batch
            if not model.training:
                val_calls[0] += 1
                if rank == 1 and val_calls[0] == 2:  # rank 1's only batch of epoch 1: the node gets a notice
                    notice.set()
            return {"loss": torch.nn.functional.mse_loss(model(inputs), targets)}

        config = LoopConfig(model=_linear, optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
                            data=_two_rank_data, train_step=step, batch_size=BATCH, val_batch_size=VAL_BATCH, seed=0)
        link = _RecordingLink()
        result = TrainLoop(TrainSpec(loop=config, epochs=3), rank=rank, world_size=2, device=torch.device("cpu"),
                           link=link, preemption=notice).run()
        out.put((rank, link.reports, result.preempted, val_calls[0]))
    finally:
        dist.destroy_process_group()


def test_ranks_with_uneven_validation_shards_abandon_validation_together_at_a_notice_on_one_rank(tmp_path):
    out = CONTEXT.SimpleQueue()
    start_ranks(_two_rank_worker, (str(tmp_path / "group-store"), out), nprocs=2)
    got = {rank: (reports, preempted, val_calls) for rank, reports, preempted, val_calls in
           (out.get() for _ in range(2))}
    steps = math.ceil(math.ceil(TRAIN / 2) / BATCH)
    for rank in (0, 1):
        reports, preempted, _ = got[rank]
        assert preempted
        # epoch 0 ends normally; epoch 1's validation is abandoned: a preempted report at its last training step
        assert reports[-1] == ("batch_end", 1, steps - 1, True)
        assert [r[:2] for r in reports[:-1]] == [("train_begin", 0), ("epoch_begin", 0), ("epoch_end", 0),
                                                 ("epoch_begin", 1)]
    # rank 0 ran both its batches of epoch 0, and epoch 1's second before abandoning; rank 1 has one per epoch
    assert (got[0][2], got[1][2]) == (4, 2)


def _wider() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))


@pytest.mark.parametrize("change, says", [
    ({"batch_size": BATCH * 2}, f"batch_size was {BATCH} when it was written and is {BATCH * 2} now"),
    ({"seed": 5}, "seed was 0 when it was written and is 5 now"),
    ({"model": _wider}, "parameters was "),
])
def test_a_resume_with_a_changed_configuration_is_refused_naming_the_field_before_any_state_is_loaded(
        group, tmp_path, change, says):
    from orchestrator.callbacks import BackupAndRestore
    from orchestrator.storage.layout import ResumeMismatch
    storage = _storage(tmp_path)
    first, link = _fit([BackupAndRestore()], _config(), epochs=1, storage=storage)
    (commit,) = link.events(EventType.BACKUP_COMMITTED)
    changed = dataclasses.replace(_config(), **change)
    with pytest.raises(ResumeMismatch, match=says) as info:
        _fit([BackupAndRestore()], changed, epochs=2, storage=storage, resume_from=commit["folder"])
    assert str(info.value).startswith(f"cannot resume from {commit['folder']}:")
