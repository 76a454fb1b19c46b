"""Data knobs of the per-rank loop, in process (no Ray): ``loader_workers`` (parallel loading with exact
resume), Keras's ``steps_per_epoch``, ``validation_steps`` and ``validation_freq``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import Dataset

from orchestrator import callbacks
from orchestrator.core.config import validation_due
from orchestrator.core.events import EventType
from orchestrator.decisions import Backup
from orchestrator.loop.data import Window, epoch_window
from orchestrator.storage.layout import ResumeMismatch
from clean_process import in_clean_process
from test_train_loop import (
    BATCH, BATCH_END, EPOCH_END, TRAIN, VAL, StandInCoordinator, _assert_same_weights, _config, _data, _fit,
    _linear, _run, _storage, _with_dropout)

PER_PASS = TRAIN // BATCH  # batches in one pass over the (one-rank) shard


class NoisyDataset(Dataset):
    """A random augmentation per sample: noise drawn from torch's global stream inside ``__getitem__``."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index]
        return x + 0.5 * torch.randn_like(x), y


def _noisy_data():
    train, val = _data()
    return NoisyDataset(train), NoisyDataset(val)


def _noisy_config(workers: int):
    return dataclasses.replace(_config(model=_with_dropout, lr=0.01), data=_noisy_data, loader_workers=workers)


# -- loader_workers ------------------------------------------------------------------------------
@in_clean_process
def test_two_loader_workers_resumed_mid_epoch_draw_the_same_augmentations_as_an_uninterrupted_run(group, tmp_path):
    storage = _storage(tmp_path)
    uninterrupted = StandInCoordinator({(BATCH_END, 1, 2): [Backup(backup_dir="backup")]}, draws_rng=True)
    whole = _run(uninterrupted, _noisy_config(2), epochs=3, storage=storage, batch_sync_every=1)
    (_, folder, _, _), = uninterrupted.persisted

    resumed = StandInCoordinator(draws_rng=True)
    rest = _run(resumed, _noisy_config(2), epochs=3, storage=storage, batch_sync_every=1, resume_from=folder)

    _assert_same_weights(rest.state_dict, whole.state_dict)
    assert (rest.epochs_run, rest.steps_run) == (3, 3 * PER_PASS)
    assert resumed.report(EPOCH_END, 1).train == uninterrupted.report(EPOCH_END, 1).train
    assert resumed.report(EPOCH_END, 2).val == uninterrupted.report(EPOCH_END, 2).val

    # the rule: a sample's draws depend on (seed, rank, pass, position), not on the number of workers
    one = _run(StandInCoordinator(draws_rng=True), _noisy_config(1), epochs=3, batch_sync_every=1)
    _assert_same_weights(one.state_dict, whole.state_dict)
    plain = _run(StandInCoordinator(draws_rng=True), dataclasses.replace(_noisy_config(2), data=_data), epochs=3,
                 batch_sync_every=1)
    assert not torch.equal(plain.state_dict["0.weight"], whole.state_dict["0.weight"])  # the noise mattered


# -- steps_per_epoch -----------------------------------------------------------------------------
@pytest.mark.parametrize("epoch, per_epoch, window", [
    (0, None, Window(0, 0, 5)), (3, None, Window(3, 0, 5)),
    (0, 2, Window(0, 0, 2)), (1, 2, Window(0, 2, 2)), (2, 2, Window(0, 4, 1)), (3, 2, Window(1, 0, 2)),
    (0, 5, Window(0, 0, 5)), (1, 5, Window(1, 0, 5)),
    (2, 9, Window(2, 0, 5)),  # more steps than the data holds: the epoch stops when the data runs out
])
def test_epoch_windows_follow_keras_steps_per_epoch(epoch, per_epoch, window):
    assert epoch_window(epoch, batches_per_pass=5, steps_per_epoch=per_epoch) == window


class _ParamsSpy(callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.steps = self.params["steps"]


def _recording_config(seen: list, **changes):
    def step(model, batch):
        inputs, targets = batch
        if model.training:
            seen.append(inputs.clone())
        return {"loss": torch.nn.functional.mse_loss(model(inputs), targets)}

    return dataclasses.replace(_config(), train_step=step, loss=None, metrics={}, **changes)


def _order(data_pass: int) -> list[int]:
    return torch.randperm(TRAIN, generator=torch.Generator().manual_seed(data_pass)).tolist()


@pytest.mark.parametrize("per_epoch, steps", [(2, [2, 2, 1, 2]), (9, [5, 5, 5, 5])])
def test_steps_per_epoch_continues_the_data_across_epochs_and_callbacks_see_it_as_steps(group, per_epoch, steps):
    seen: list[torch.Tensor] = []
    spy = _ParamsSpy()
    result, link = _fit([spy], _recording_config(seen, steps_per_epoch=per_epoch), epochs=4)
    assert spy.steps == per_epoch  # Keras: params["steps"] is steps_per_epoch when given
    assert (result.epochs_run, result.steps_run) == (4, sum(steps))
    x = _data()[0].tensors[0]
    rows = [int((x == row).all(1).nonzero()) for batch in seen for row in batch]
    expected = _order(0) + _order(1) + _order(2) + _order(3)
    assert rows == expected[:len(rows)]  # one pass after the other, never restarted mid-pass
    ends = link.events(EventType.EPOCH_END)
    assert [e["epoch"] for e in ends] == [0, 1, 2, 3]


def test_a_resume_inside_a_steps_per_epoch_window_ends_like_an_uninterrupted_run(group, tmp_path):
    storage = _storage(tmp_path)
    config = dataclasses.replace(_config(), steps_per_epoch=2)
    straight = StandInCoordinator({(BATCH_END, 1, 0): [Backup(backup_dir="backup")]})
    whole = _run(straight, config, epochs=4, storage=storage, batch_sync_every=1)
    (_, folder, _, _), = straight.persisted
    resumed = StandInCoordinator()
    rest = _run(resumed, config, epochs=4, storage=storage, batch_sync_every=1, resume_from=folder)
    _assert_same_weights(rest.state_dict, whole.state_dict)
    assert rest.steps_run == whole.steps_run == 7
    assert [(r.epoch, r.step) for r in resumed.reports if r.kind == BATCH_END][:2] == [(1, 1), (2, 0)]


def test_a_resume_with_another_steps_per_epoch_is_refused_naming_it(group, tmp_path):
    storage = _storage(tmp_path)
    _, link = _fit([callbacks.BackupAndRestore()], _config(), epochs=1, storage=storage)
    (commit,) = link.events(EventType.BACKUP_COMMITTED)
    with pytest.raises(ResumeMismatch, match="steps_per_epoch was None when it was written and is 3 now"):
        _fit([callbacks.BackupAndRestore()], dataclasses.replace(_config(), steps_per_epoch=3), epochs=2,
             storage=storage, resume_from=commit["folder"])


# -- validation_steps, validation_freq ------------------------------------------------------------
def test_validation_steps_validates_the_same_first_batches_of_the_shard_each_time(group):
    coordinator = StandInCoordinator()
    _run(coordinator, dataclasses.replace(_config(lr=0.0), validation_steps=1), epochs=2)
    first, second = coordinator.report(EPOCH_END, 0).val, coordinator.report(EPOCH_END, 1).val
    assert first.count == BATCH < VAL and first == second
    torch.manual_seed(0)
    model = _linear()
    xv, yv = _data()[1].tensors
    with torch.no_grad():
        err = model(xv[:BATCH]) - yv[:BATCH]
    assert first.totals["loss"] == pytest.approx(float(err.square().sum()), rel=1e-5)


@pytest.mark.parametrize("freq, due", [(1, [True] * 4), (2, [False, True, False, True]),
                                       ([1, 3], [True, False, True, False]), ([4], [False, False, False, True])])
def test_validation_freq_counts_one_based_epochs_as_keras(freq, due):
    assert [validation_due(e, freq) for e in range(4)] == due


def test_epochs_off_the_validation_freq_log_no_val_keys(group):
    _, link = _fit([], dataclasses.replace(_config(), validation_freq=[1, 3]), epochs=4)
    logs = [e["logs"] for e in link.events(EventType.EPOCH_END)]
    assert ["val_loss" in entry for entry in logs] == [True, False, True, False]
    assert all("loss" in entry for entry in logs)
