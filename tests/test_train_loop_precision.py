"""Mixed precision, gradient accumulation and LR schedules in the per-rank loop (one-rank gloo group, no Ray)."""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from orchestrator import callbacks
from orchestrator.core.config import LoopConfig
from orchestrator.core.events import EventType
from orchestrator.decisions import Backup, SetLearningRate
from orchestrator.loop.optim_step import LearningRates
from orchestrator.loop.state_io import from_bytes
from orchestrator.storage.checkpoint import SHARED_FILE
from test_train_loop import (
    BATCH, BATCH_END, EPOCH_BEGIN, EPOCH_END, TRAIN, StandInCoordinator, _all_finite, _assert_same_weights, _data,
    _fit, _linear, _poisoned_step, _run, _storage, _with_dropout)

MICRO = TRAIN // BATCH  # 5 micro-batches of 8 per epoch


def _warmup(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4) * 0.9 ** s)


def _step_lr(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def _config(model=_linear, batch_size: int = BATCH, lr: float = 0.05, **kw) -> LoopConfig:
    return LoopConfig(model=model, optimizer=lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9),
                      data=_data, loss=torch.nn.functional.mse_loss, metrics={"mae": "mae"},
                      batch_size=batch_size, seed=0, **kw)


# -- accumulation ---------------------------------------------------------------------------------
def test_four_accumulated_micro_batches_of_8_train_like_batches_of_32(group):
    # 40 samples: steps of [32, 8] samples either way; each micro-batch's loss is divided by the
    # step's number of micro-batches, so the gradient is the mean over the step's samples
    big = StandInCoordinator()
    whole = _run(big, _config(batch_size=32), epochs=3)
    small = StandInCoordinator()
    accumulated = _run(small, _config(batch_size=8, accumulate_grad_batches=4), epochs=3)
    for name, value in whole.state_dict.items():
        torch.testing.assert_close(accumulated.state_dict[name], value, rtol=1e-5, atol=1e-6)
    assert accumulated.steps_run == whole.steps_run == 6
    assert all(r.steps_per_epoch == 2 for r in small.reports)
    assert small.report(EPOCH_END, 2).train.count == TRAIN  # every micro-batch is in the epoch's sums


def test_a_step_is_an_optimizer_step_for_batch_syncs_and_ddp_syncs_only_the_last_micro_batch(group, monkeypatch):
    entered = []
    original = DistributedDataParallel.no_sync

    @contextlib.contextmanager
    def counting(self):
        entered.append(1)
        with original(self):
            yield

    monkeypatch.setattr(DistributedDataParallel, "no_sync", counting)
    coordinator = StandInCoordinator()
    result = _run(coordinator, _config(accumulate_grad_batches=2), epochs=2, batch_sync_every=1)
    batch_ends = [(r.epoch, r.step, r.global_step) for r in coordinator.reports if r.kind == BATCH_END]
    assert batch_ends == [(0, 0, 1), (0, 1, 2), (0, 2, 3), (1, 0, 4), (1, 1, 5), (1, 2, 6)]
    assert result.steps_run == 6
    assert len(entered) == 2 * 2  # per epoch: micro-batches 0 and 2 (of [0, 1], [2, 3], [4])


def test_a_nonfinite_gradient_in_one_micro_batch_never_reaches_the_weights_and_stops_at_its_step(group):
    poison = MICRO + 2  # epoch 1, micro-batch 2: optimizer step 1 with accumulate_grad_batches=2
    config = LoopConfig(model=_linear, optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
                        data=_data, train_step=_poisoned_step(poison, "nan"), batch_size=BATCH, seed=0,
                        accumulate_grad_batches=2)
    result, link = _fit([callbacks.TerminateOnNaN()], config, epochs=3)
    assert _all_finite(result.state_dict)
    assert result.stopped_at == (1, 1)
    assert [(e["epoch"], e["step"]) for e in link.events(EventType.NAN_DETECTED)] == [(1, 1)]


# -- precision ------------------------------------------------------------------------------------
def _autocast_recording_step(seen: list):
    def step(model, batch):
        inputs, targets = batch
        outputs = model(inputs)
        if model.training:
            seen.append((torch.is_autocast_enabled("cpu"), outputs.dtype))
        return {"loss": torch.nn.functional.mse_loss(outputs.float(), targets)}

    return step


@pytest.mark.parametrize("precision,expected", [("32-true", (False, torch.float32)),
                                                ("bf16-mixed", (True, torch.bfloat16)),
                                                ("16-mixed", (True, torch.float16))])
def test_the_step_runs_under_the_precision_s_autocast_and_training_stays_finite(group, precision, expected):
    seen: list = []
    config = LoopConfig(model=_linear, optimizer=lambda params: torch.optim.SGD(params, lr=0.05), data=_data,
                        train_step=_autocast_recording_step(seen), batch_size=BATCH, precision=precision)
    result = _run(StandInCoordinator(), config, epochs=2)
    assert set(seen) == {expected}
    assert _all_finite(result.state_dict) and all(v.dtype == torch.float32 for v in result.state_dict.values())


def _scaled_config(step) -> LoopConfig:
    return LoopConfig(model=_linear, optimizer=lambda params: torch.optim.SGD(params, lr=0.05), data=_data,
                      train_step=step, batch_size=BATCH, precision="16-mixed")


def test_a_step_the_scaler_skips_is_counted_and_logged_as_grad_scale_not_a_nan_stop(group):
    # the first steps overflow fp16 at the initial scale 2**16 (the scaler skips them and halves the scale
    # until it fits); the poisoned step, an infinite gradient under a finite loss, is one skip more
    poison = 2 * MICRO + 2  # epoch 2, step 2
    clean, clean_link = _fit([callbacks.TerminateOnNaN()], _scaled_config(_poisoned_step(-1, "inf")), epochs=3)
    result, link = _fit([callbacks.TerminateOnNaN()], _scaled_config(_poisoned_step(poison, "inf")), epochs=3)
    assert _all_finite(result.state_dict)
    assert result.stopped_at is None and result.epochs_run == 3
    assert result.scaler_skips == clean.scaler_skips + 1 and clean.scaler_skips >= 1
    assert link.events(EventType.NAN_DETECTED) == [] and link.events(EventType.STOP) == []
    scales = [h["logs"]["grad_scale"] for h in link.core.history]
    clean_scales = [h["logs"]["grad_scale"] for h in clean_link.core.history]
    assert scales[:2] == clean_scales[:2] and clean_scales[2] == clean_scales[1]  # settled after epoch 0
    assert scales[2] == pytest.approx(clean_scales[2] * (3 + 2 * 0.5) / 5)  # halved from step 3 of epoch 2 on


# -- learning-rate schedules ----------------------------------------------------------------------
def test_a_step_schedule_steps_at_every_optimizer_step_and_an_epoch_schedule_at_every_epoch(group):
    per_step = _run(StandInCoordinator(), _config(lr=0.1, lr_scheduler=_warmup, lr_scheduler_interval="step",
                                                  accumulate_grad_batches=2), epochs=3)
    steps = 3  # optimizer steps per epoch
    assert per_step.learning_rates == pytest.approx([0.1 * min(1.0, (s + 1) / 4) * 0.9 ** s
                                                     for s in (0, steps, 2 * steps)])
    per_epoch = _run(StandInCoordinator(), _config(lr=0.1, lr_scheduler=_step_lr), epochs=3)
    assert per_epoch.learning_rates == pytest.approx([0.1, 0.05, 0.025])


def test_a_set_learning_rate_decision_rescales_a_running_schedule_which_continues_from_the_reduced_level(group):
    plain = _run(StandInCoordinator(), _config(lr=0.1, lr_scheduler=_warmup, lr_scheduler_interval="step"), epochs=3)
    halved_at = plain.learning_rates[1] / 2
    coordinator = StandInCoordinator({(EPOCH_BEGIN, 1, -1): [SetLearningRate(halved_at)]})
    reduced = _run(coordinator, _config(lr=0.1, lr_scheduler=_warmup, lr_scheduler_interval="step"), epochs=3)
    assert reduced.learning_rates == pytest.approx([plain.learning_rates[0], halved_at, plain.learning_rates[2] / 2])
    # the coordinator sees the rate the epoch ended with (what a decision is relative to)
    assert coordinator.report(EPOCH_END, 2).learning_rate == pytest.approx(0.1 * 0.9 ** 15 / 2)


@pytest.mark.parametrize("applied_first", [False, True])
def test_a_schedule_stepped_after_a_skipped_first_update_warns_nothing_and_keeps_counting(applied_first):
    param = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([param], lr=1.0)
    lrs = LearningRates(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1)), "step")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "lr_scheduler.step() before optimizer.step()" would raise here
        for step in range(4):
            if applied_first or step > 0:  # a first update the scaler or the NaN guard skipped: no optimizer.step()
                param.grad = torch.ones(1)
                opt.step()
            lrs.end_step()
    assert lrs.current() == pytest.approx(1 / 5) and lrs.scheduler.last_epoch == 4


def test_learning_rates_scale_the_schedule_and_set_base_rates_when_the_rate_is_zero():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    lrs = LearningRates(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / 4), "step")
    assert lrs.current() == 0.0
    lrs.set(0.4)  # nothing to scale: the schedule's base rate becomes 0.4
    lrs.end_step()
    assert lrs.current() == pytest.approx(0.1)
    lrs.set(0.05)  # half the rate now: half the schedule from here on
    lrs.end_step()
    assert lrs.current() == pytest.approx(0.2 * 2 / 4) and lrs.scheduler.base_lrs == pytest.approx([0.2])


def test_history_logs_the_rate_each_epoch_started_with_under_a_step_schedule(group):
    config = _config(lr=0.1, lr_scheduler=_warmup, lr_scheduler_interval="step")
    result, link = _fit([], config, epochs=3)
    assert [h["logs"]["learning_rate"] for h in link.core.history] == pytest.approx(result.learning_rates)


# -- exact resume ---------------------------------------------------------------------------------
@pytest.mark.parametrize("precision,interval", [("bf16-mixed", "step"), ("16-mixed", "epoch"), ("32-true", "step")])
def test_a_mid_epoch_resume_with_precision_accumulation_and_a_schedule_is_bit_identical(group, tmp_path, precision,
                                                                                          interval):
    storage = _storage(tmp_path)
    config = _config(model=_with_dropout, precision=precision, accumulate_grad_batches=2,
                     lr_scheduler=_warmup if interval == "step" else _step_lr, lr_scheduler_interval=interval)
    uninterrupted = StandInCoordinator({(BATCH_END, 1, 1): [Backup(backup_dir="backup")]}, draws_rng=True)
    whole = _run(uninterrupted, config, epochs=3, storage=storage, batch_sync_every=1)
    (_, folder, _, meta), = uninterrupted.persisted
    assert (meta["epoch"], meta["batch"], meta["step"]) == (1, 1, 5)  # optimizer steps: 3 per epoch
    shared = from_bytes(storage.read_bytes(f"{folder}/{SHARED_FILE}"))
    assert "lr_scheduler" in shared and ("scaler" in shared) == (precision == "16-mixed")

    resumed = StandInCoordinator(draws_rng=True)
    rest = _run(resumed, config, epochs=3, storage=storage, batch_sync_every=1, resume_from=folder)
    _assert_same_weights(rest.state_dict, whole.state_dict)
    assert (rest.learning_rates, rest.steps_run) == (whole.learning_rates, whole.steps_run)
    assert resumed.report(EPOCH_END, 2).learning_rate == uninterrupted.report(EPOCH_END, 2).learning_rate
    assert resumed.report(EPOCH_END, 1).train == uninterrupted.report(EPOCH_END, 1).train
    assert math.isfinite(resumed.report(EPOCH_END, 2).train.totals["loss"])


def test_a_resume_with_another_accumulate_grad_batches_is_refused_naming_it(group, tmp_path):
    from orchestrator.loop.specs import TrainSpec
    from orchestrator.loop.train_loop import TrainLoop
    from orchestrator.storage.layout import ResumeMismatch
    from test_train_loop import InProcessLink

    storage = _storage(tmp_path)
    writer = StandInCoordinator({(BATCH_END, 0, 1): [Backup(backup_dir="backup")]})
    _run(writer, _config(accumulate_grad_batches=2), epochs=1, storage=storage, batch_sync_every=1)
    (_, folder, _, _), = writer.persisted
    layout = writer.reports[0].layout
    assert layout["accumulate_grad_batches"] == 2
    spec = TrainSpec(loop=_config(accumulate_grad_batches=1), epochs=1, resume_from=folder, resume_layout=layout)
    loop = TrainLoop(spec, rank=0, world_size=1, device=torch.device("cpu"), link=InProcessLink(StandInCoordinator()),
                     storage=storage)
    with pytest.raises(ResumeMismatch, match="accumulate_grad_batches was 2 .* is 1 now"):
        loop.run()


def _halve_at_epoch_1(epoch, lr):
    return lr * 0.5 if epoch == 1 else lr


def test_a_learning_rate_scheduler_callback_composes_with_a_step_schedule_through_the_coordinator(group):
    config = _config(lr=0.1, lr_scheduler=_warmup, lr_scheduler_interval="step")
    plain, _ = _fit([], config, epochs=3)
    result, link = _fit([callbacks.LearningRateScheduler(_halve_at_epoch_1)], config, epochs=3)
    expected = [plain.learning_rates[0], plain.learning_rates[1] / 2, plain.learning_rates[2] / 2]
    assert result.learning_rates == pytest.approx(expected)
    assert [h["logs"]["learning_rate"] for h in link.core.history] == pytest.approx(expected)


# -- what callbacks and validation see under a per-step schedule and a precision ---------------------
class _RatesSeen(callbacks.Callback):
    batch_sync_every = 1

    def __init__(self) -> None:
        super().__init__()
        self.at_batches: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.at_batches.append(self.trainer.learning_rate)


def test_batch_hooks_see_the_rate_a_step_schedule_set_and_history_the_rate_each_epoch_started_with(group):
    seen = _RatesSeen()
    result, link = _fit([seen], _config(lr_scheduler=_step_lr, lr_scheduler_interval="step"), epochs=2)
    steps = result.steps_run
    assert seen.at_batches == pytest.approx([0.05 * 0.5 ** (s + 1) for s in range(steps)])
    per_epoch = steps // 2
    assert [h["logs"]["learning_rate"] for h in link.core.history] == pytest.approx(
        [0.05, 0.05 * 0.5 ** per_epoch])


def _bf16_recording_step(seen: list):
    def step(model, batch):
        if not model.training:
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        inputs, targets = batch
        return {"loss": torch.nn.functional.mse_loss(model(inputs).float(), targets)}
    return step


def test_validation_runs_in_the_trainings_precision(group):
    seen: list[bool] = []
    _fit([], _config(precision="bf16-mixed", train_step=_bf16_recording_step(seen)), epochs=1)
    assert seen and all(seen)
