"""fit() on a real local Ray cluster with a real 2-rank gloo group."""

from __future__ import annotations

import io
import itertools
import json
import math
import time

import pytest
import torch

import workloads
from orchestrator import Trainer, callbacks
from orchestrator.errors import WorkerError
from orchestrator.storage.run_files import read_events

pytestmark = pytest.mark.timeout(180)

STORAGE = ""  # the module's run storage, set by _storage
_RUNS = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def _storage(tmp_path_factory):
    """The runs of this module under one folder of pytest's, which removes it as it removes the others."""
    global STORAGE
    STORAGE = str(tmp_path_factory.mktemp("runs"))


def make(num_workers=2, **overrides):
    """A Trainer of its own run (a finished run is never trained again)."""
    kwargs = dict(model=workloads.tiny_model, optimizer=workloads.sgd, loss=workloads.cross_entropy,
                  data=workloads.odd_data, metrics=["accuracy"], batch_size=16, num_workers=num_workers,
                  seed=0, storage=STORAGE, run_name=f"run-{next(_RUNS)}")
    kwargs.update(overrides)
    return Trainer(**kwargs)


@pytest.fixture(scope="module")
def pack_trainer(ray_session):
    return make(2)


@pytest.fixture(scope="module")
def pack_history(pack_trainer):
    """The default 2-rank fit (PACK placement, 3 epochs), run once for the tests that only read it."""
    return pack_trainer.fit(epochs=3, verbose=0)


def test_two_workers_report_the_validation_metrics_of_the_whole_set_on_odd_sample_counts(ray_cluster):
    # lr = 0 keeps the weights at their seeded initial values, so the metrics one process computes over all
    # 101 samples are exact; the 51 + 50 split over two ranks may only add rounding
    two = make(2, optimizer=workloads.frozen_sgd).fit(epochs=1, verbose=0)
    torch.manual_seed(0)
    model = workloads.tiny_model()
    _, val = workloads.odd_data()
    x, y = val.tensors
    with torch.no_grad():
        outputs = model(x)
    assert two.history["val_loss"][0] == pytest.approx(torch.nn.functional.cross_entropy(outputs, y).item(), abs=1e-6)
    assert two.history["val_accuracy"][0] == pytest.approx((outputs.argmax(1) == y).float().mean().item(), abs=1e-6)
    # training loss counts padded duplicates on 2 ranks, so only validation is exact
    assert set(two.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"}


def test_fit_returns_keras_style_history_and_the_trained_model_on_cpu(ray_cluster, pack_history):
    history = pack_history
    assert history.epoch == [0, 1, 2]
    assert len(history.history["loss"]) == 3
    assert history.history["learning_rate"] == [0.1, 0.1, 0.1]
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert isinstance(history.model, torch.nn.Module)
    assert all(p.device.type == "cpu" for p in history.model.parameters())
    # the returned model is the trained one: its validation accuracy matches the last epoch's
    _, val = workloads.odd_data()
    x, y = val.tensors
    acc = (history.model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(history.history["val_accuracy"][-1], abs=1e-6)


def test_a_second_fit_of_a_finished_run_returns_its_result_without_training_again(ray_cluster, pack_trainer,
                                                                                  pack_history):
    storage = pack_trainer.storage.open()
    attempts = json.loads(storage.read_bytes("run.json"))["attempts"]
    events_before = len(read_events(storage))
    with pytest.warns(UserWarning, match="does not train it again"):
        again = pack_trainer.fit(epochs=5, verbose=0)
    assert again.history == pack_history.history and again.epoch == pack_history.epoch
    final = torch.load(io.BytesIO(storage.read_bytes("model.pt")), weights_only=True)
    for name, value in again.model.state_dict().items():
        assert torch.equal(value, pack_history.model.state_dict()[name]) and torch.equal(value, final[name])
    assert json.loads(storage.read_bytes("run.json"))["attempts"] == attempts  # no attempt 2, no new events
    assert len(read_events(storage)) == events_before


def test_a_nan_loss_on_rank_one_only_stops_every_rank_at_that_step(ray_cluster):
    step = 5
    history = make(2, train_step=workloads.nan_on_rank1_at_step(step), data=workloads.train_only_data,
                   metrics=None, callbacks=[callbacks.TerminateOnNaN()]).fit(epochs=5, verbose=0)
    # 64 samples / 2 ranks / batch 16 = 2 steps per epoch: call 5 is epoch 2, step 1
    assert [r.stopped_at for r in history.results] == [(2, 1), (2, 1)]
    assert [r.steps_run for r in history.results] == [step + 1, step + 1]
    assert history.epoch == [0, 1, 2]  # as in Keras, the stopped epoch still ends and is logged
    assert math.isnan(history.history["loss"][-1])
    assert any(e["type"] == "nan_detected" for e in history.events)
    # the non-finite update was never applied
    assert all(torch.isfinite(p).all() for p in history.model.parameters())


def test_a_scheduled_rate_is_set_before_its_epoch_and_plateau_reductions_compound_on_it_on_every_rank(ray_cluster):
    # the schedule sets 0.04 before epoch 1 and otherwise keeps the current rate, which it is given
    sched = callbacks.LearningRateScheduler(lambda epoch, lr: 0.04 if epoch == 1 else lr)
    reduce = callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=1, min_delta=10.0)
    history = make(2, callbacks=[sched, reduce]).fit(epochs=4, verbose=0)
    per_rank = [r.learning_rates for r in history.results]
    assert per_rank[0] == per_rank[1]
    assert per_rank[0] == history.history["learning_rate"]
    # epoch 0 improves on +inf; from then on min_delta=10 makes every epoch a plateau, so each epoch end from
    # epoch 1 on halves the rate that epoch ran with: first the scheduled 0.04 (0.05 would be 0.1 halved)
    assert history.history["learning_rate"] == pytest.approx([0.1, 0.04, 0.02, 0.01])
    changes = [(e["source"], e["epoch"], e["value"]) for e in history.events if e["type"] == "lr_changed"]
    # the scheduler decides before every epoch, from the rate it is given; a reduction after every epoch from 1 on
    assert [c for c in changes if c[0] == "LearningRateScheduler"] == [("LearningRateScheduler", 0, 0.1),
                                                                      ("LearningRateScheduler", 1, 0.04),
                                                                      ("LearningRateScheduler", 2, 0.02),
                                                                      ("LearningRateScheduler", 3, 0.01)]
    assert [c for c in changes if c[0] == "ReduceLROnPlateau"] == [("ReduceLROnPlateau", 1, 0.02),
                                                                  ("ReduceLROnPlateau", 2, 0.01),
                                                                  ("ReduceLROnPlateau", 3, 0.005)]


def test_early_stopping_stops_the_cluster_restores_the_best_weights_and_a_missing_key_warns_the_driver(ray_cluster):
    stopper = callbacks.EarlyStopping(monitor="val_loss", patience=1, min_delta=100.0, restore_best_weights=True)
    # with its key this one would reduce the rate at the end of epoch 1; without it, it only warns
    blind = callbacks.ReduceLROnPlateau(monitor="val_missing", mode="min", patience=0, min_delta=100.0)
    with pytest.warns(UserWarning, match="Available metrics are: loss,accuracy"):
        history = make(2, callbacks=[stopper, blind]).fit(epochs=10, verbose=0)
    assert not any(e["type"] == "lr_changed" for e in history.events)
    # with min_delta=100 nothing after the first epoch improves: stop at epoch 1, keep epoch 0
    assert history.epoch == [0, 1]
    assert stopper.stopped_epoch == 1  # the driver's instance receives the coordinator's state
    _, val = workloads.odd_data()
    x, y = val.tensors
    restored_loss = torch.nn.functional.cross_entropy(history.model(x), y).item()
    assert restored_loss == pytest.approx(history.history["val_loss"][0], abs=1e-5)


def test_progress_reaches_the_driver_at_most_about_once_a_second(ray_cluster):
    history = make(2, data=workloads.many_batches_data, batch_size=8).fit(epochs=1, verbose=0)
    progress = [e for e in history.events if e["type"] == "progress"]
    begin = next(e["time"] for e in history.events if e["type"] == "epoch_begin")
    end = next(e["time"] for e in history.events if e["type"] == "epoch_end")
    assert len(progress) >= 1
    assert len(progress) <= (end - begin) / 1.0 + 2  # 250 steps: one event a step would break this
    assert all(math.isfinite(e["logs"]["loss"]) for e in progress)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nccl path)")
def test_use_gpu_trains_with_nccl_on_the_assigned_devices(ray_cluster):
    history = make(1, use_gpu=True).fit(epochs=1, verbose=0)
    assert math.isfinite(history.history["loss"][0])


def _pid_recorder(path):
    """A callback that appends the pid of the process running it (the coordinator) to ``path`` at train begin."""
    import os

    def record(logs):
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")

    return callbacks.LambdaCallback(on_train_begin=record)


def test_a_second_fit_of_the_same_shape_reuses_the_warm_workers_and_the_coordinator_with_none_of_its_state(
        ray_cluster, tmp_path):
    pids = tmp_path / "coordinator-pids"
    # the first fit stops early at epoch 1 (patience 0 on a frozen model); the second's EarlyStopping is new
    first = make(2, optimizer=workloads.frozen_sgd,
                 callbacks=[_pid_recorder(str(pids)), callbacks.EarlyStopping(monitor="val_loss", patience=0)]
                 ).fit(epochs=5, verbose=0)
    trainer = make(2, callbacks=[_pid_recorder(str(pids))])
    second = trainer.fit(epochs=3, verbose=0)
    assert first.epoch == [0, 1] and second.epoch == [0, 1, 2]  # nothing of the first fit's stop carried over
    first_pid, second_pid = pids.read_text().split()
    assert first_pid == second_pid  # the same coordinator process, set up again
    started = [e for e in read_events(trainer.storage.open()) if e["type"] == "started"]
    assert [e["warm"] for e in started] == [True]  # the parked workers started the second fit


# Order: a finished fit parks its group for the next fit of the same shape, a failed one ends its group.
# So the fits above start no process after the first; the failing fits come last, the first on the
# group parked above, the second on the group the spread fit (another shape: a new group) parks.


def test_terminate_on_nan_with_raise_error_makes_fit_raise_the_keras_error(ray_cluster):
    trainer = make(2, train_step=workloads.nan_on_rank1_at_step(1), data=workloads.train_only_data,
                   metrics=None, callbacks=[callbacks.TerminateOnNaN(raise_error=True)])
    with pytest.raises(RuntimeError, match="NaN or Inf loss encountered at batch 1"):
        trainer.fit(epochs=2, verbose=0)


def test_spread_placement_trains_like_pack(ray_cluster, pack_history):
    spread = make(2, placement_strategy="SPREAD").fit(epochs=3, verbose=0)
    assert spread.history == pack_history.history  # every metric of every epoch, bit for bit


def test_user_code_raising_on_one_rank_surfaces_with_its_rank_and_traceback_within_seconds(ray_cluster):
    # SPREAD: it takes over the group the spread test parked, just before (no process started)
    trainer = make(2, train_step=workloads.raise_on_rank1, placement_strategy="SPREAD")
    start = time.monotonic()
    with pytest.raises(WorkerError) as info:
        trainer.fit(epochs=2, verbose=0)
    assert time.monotonic() - start < 60
    assert info.value.rank == 1
    assert "boom from rank 1's train step" in str(info.value)
    assert "raise_on_rank1" in info.value.remote_traceback
    assert isinstance(info.value.__cause__, ArithmeticError)
