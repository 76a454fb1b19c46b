"""Bad Trainer and callback arguments fail at construction, naming the argument; no worker starts."""

from __future__ import annotations

import operator
import threading

import pytest
import torch

import workloads
from orchestrator import Trainer, callbacks


def make(**overrides):
    kwargs = dict(model=workloads.tiny_model, optimizer=workloads.sgd, loss=workloads.cross_entropy,
                  data=workloads.odd_data, metrics=["accuracy"], batch_size=16, num_workers=2)
    kwargs.update(overrides)
    return Trainer(**kwargs)


@pytest.mark.parametrize("overrides,match", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"num_workers": 0}, "num_workers"),
    ({"metrics": ["precision"]}, "metrics: unknown metric 'precision'"),
    ({"metrics": {"f1": 3}}, r"metrics\['f1'\]"),
    ({"model": None}, "model must be a callable"),
    ({"data": None}, "data is required"),
    ({"loss": None}, "loss is required"),
    ({"clip_grad_norm": -1.0}, "clip_grad_norm"),
    ({"placement_strategy": "RANDOM"}, "placement_strategy"),
    ({"run_name": "../escape"}, "run_name"),
    ({"max_failures": -1}, "max_failures"),
    ({"seed": "zero"}, "seed"),
    ({"callbacks": [object()]}, r"callbacks\[0\]"),
    ({"use_gpu": "yes"}, "use_gpu"),
    ({"hang_timeout_s": 0}, "hang_timeout_s"),
    ({"preemption_grace_s": -5}, "preemption_grace_s"),
    ({"placement_timeout_s": "soon"}, "placement_timeout_s"),
    ({"warm_standbys": "no"}, "warm_standbys must be True or False"),
    ({"live_recovery": "no"}, "live_recovery must be True or False"),
    ({"metrics": {"f1": "precision"}}, r"metrics\['f1'\]: unknown metric 'precision'"),
    ({"val_batch_size": 0}, "val_batch_size"),
    ({"threads_per_worker": 0}, "threads_per_worker"),
    ({"run_name": "a/b"}, "run_name must be 1-128 characters"),
    ({"run_name": ""}, "run_name"),
    ({"run_name": "run\n"}, "run_name"),
    ({"storage": 5}, "storage must be a path or an fsspec URL"),
    ({"storage_options": ["key"]}, "storage_options must be a dict"),
    ({"callbacks": [callbacks.BackupAndRestore(), callbacks.BackupAndRestore()]}, "at most one BackupAndRestore"),
    ({"callbacks": [callbacks.BackupAndRestore(backup_dir="s3://b/x")]}, r"BackupAndRestore\(backup_dir=\.\.\.\)"),
])
def test_a_bad_trainer_argument_raises_value_error_naming_it(overrides, match):
    with pytest.raises(ValueError, match=match):
        make(**overrides)


def test_a_factory_that_cannot_be_pickled_is_rejected_with_its_argument_name():
    lock = threading.Lock()

    def data_with_lock():
        with lock:
            return workloads.odd_data()

    with pytest.raises(ValueError, match="data cannot be sent to the workers because it is not picklable"):
        make(data=data_with_lock)


def test_a_monitor_whose_direction_cannot_be_inferred_fails_before_training():
    with pytest.raises(ValueError, match="monitor=val_f1"):
        make(metrics={"f1": lambda o, t: torch.tensor(0.0)}, callbacks=[callbacks.EarlyStopping(monitor="val_f1")])


def test_a_custom_metric_monitor_with_an_explicit_mode_is_accepted_and_uses_that_mode():
    stopper = callbacks.EarlyStopping(monitor="val_f1", mode="max")
    trainer = make(metrics={"f1": lambda o, t: torch.tensor(0.0)}, callbacks=[stopper])
    assert trainer.callbacks == [stopper]
    assert stopper.monitor_op is operator.gt


@pytest.mark.parametrize("metrics,monitor,op", [
    (["acc"], "val_acc", operator.gt),
    (["accuracy"], "val_accuracy", operator.gt),
    ({"err": "mse"}, "err", operator.lt),
    (["mae"], "val_loss", operator.lt),
])
def test_auto_mode_takes_the_direction_of_a_built_in_from_the_registry(metrics, monitor, op):
    stopper = callbacks.EarlyStopping(monitor=monitor)
    make(metrics=metrics, callbacks=[stopper])
    assert stopper.monitor_op is op


def zero_metric(outputs, targets):
    return torch.tensor(0.0)


@pytest.mark.parametrize("metrics, match", [
    ({"loss": zero_metric}, r"metrics: the name 'loss' is reserved for the training loss.*"
                            r"e\.g\. metrics=\{'my_loss': fn\}"),
    ({"val_loss": zero_metric}, r"the name 'val_loss' is reserved: names starting with 'val_'.*"
                                r"name the metric 'loss' instead"),
    ({"val_f1": zero_metric}, r"the name 'val_f1' is reserved.*logged as 'f1' on training data and as 'val_f1' "
                              r"on validation data.*name the metric 'f1' instead"),
    ({"val_acc": "accuracy"}, r"the name 'val_acc' is reserved.*name the metric 'acc' instead"),
    ({"batch_size": zero_metric}, r"the name 'batch_size' is reserved.*metrics=\{'my_batch_size': fn\}"),
    ({"learning_rate": zero_metric}, r"the name 'learning_rate' is reserved for the learning rate"),
    ({"epoch": zero_metric}, r"the name 'epoch' is reserved.*ModelCheckpoint"),
    ({"batch": "mae"}, r"the name 'batch' is reserved.*ModelCheckpoint"),
    (["loss"], r"metrics: the name 'loss' is reserved"),
])
def test_a_metric_named_like_a_key_the_logs_already_use_is_rejected_at_trainer_construction(metrics, match):
    with pytest.raises(ValueError, match=match):
        make(metrics=metrics)


@pytest.mark.parametrize("name", ["f1", "losses", "my_loss", "val", "validation_f1", "lr", "epochs"])
def test_a_metric_name_that_only_resembles_a_reserved_one_is_accepted(name):
    assert list(make(metrics={name: zero_metric}).loop.metrics) == [name]


def test_the_acc_alias_is_accepted_and_kept_under_the_name_the_user_gave():
    trainer = make(metrics=["acc"])
    assert trainer.loop.metrics == {"acc": "accuracy"}
    assert trainer._config_snapshot(epochs=1)["metrics"] == ["acc"]


def test_the_run_name_is_checked_by_one_rule_shared_with_storage():
    from orchestrator.storage.fs import StorageSpec

    for name in ("digits", "run.2", "a_b-c"):
        assert make(run_name=name).run_name == name == StorageSpec("/tmp/x", name).run_name
    for name in ("../escape", ".hidden", "a b"):
        with pytest.raises(ValueError, match="run_name must be 1-128 characters") as from_trainer:
            make(run_name=name)
        with pytest.raises(ValueError) as from_storage:
            StorageSpec("/tmp/x", name)
        assert str(from_trainer.value) == str(from_storage.value)


@pytest.mark.parametrize("epochs", [0, -1, 1.5, "3"])
def test_fit_rejects_a_bad_epoch_count_before_starting_anything(epochs):
    with pytest.raises(ValueError, match="epochs"):
        make().fit(epochs=epochs)


def test_fit_rejects_an_unknown_verbose_value():
    with pytest.raises(ValueError, match="verbose"):
        make().fit(epochs=1, verbose="loud")


def _cosine(optimizer):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)


@pytest.mark.parametrize("overrides,match", [
    ({"precision": "bf16"}, "precision must be one of"),
    ({"precision": 16}, "precision must be one of"),
    ({"accumulate_grad_batches": 0}, "accumulate_grad_batches"),
    ({"accumulate_grad_batches": 2.0}, "accumulate_grad_batches"),
    ({"lr_scheduler": "cosine"}, "lr_scheduler must be None or a callable"),
    ({"lr_scheduler_interval": "batch"}, "lr_scheduler_interval must be one of"),
])
def test_a_bad_precision_accumulation_or_schedule_argument_is_rejected_naming_it(overrides, match):
    with pytest.raises(ValueError, match=match):
        make(**overrides)


def test_an_unpicklable_lr_scheduler_factory_is_rejected_with_its_argument_name():
    lock = threading.Lock()
    with pytest.raises(ValueError, match="lr_scheduler cannot be sent to the workers"):
        make(lr_scheduler=lambda optimizer, lock=lock: None)


def test_precision_accumulation_and_schedule_are_recorded_in_the_config_snapshot():
    trainer = make(precision="bf16-mixed", accumulate_grad_batches=4, lr_scheduler=_cosine,
                   lr_scheduler_interval="step")
    snapshot = trainer._config_snapshot(epochs=1)
    assert {k: snapshot[k] for k in ("precision", "accumulate_grad_batches", "lr_scheduler",
                                     "lr_scheduler_interval")} == {
        "precision": "bf16-mixed", "accumulate_grad_batches": 4, "lr_scheduler": "_cosine",
        "lr_scheduler_interval": "step"}
    defaults = make()._config_snapshot(epochs=1)
    assert (defaults["precision"], defaults["accumulate_grad_batches"], defaults["lr_scheduler"],
            defaults["lr_scheduler_interval"]) == ("32-true", 1, None, "epoch")


@pytest.mark.parametrize("overrides,match", [
    ({"loader_workers": -1}, "loader_workers must be an integer >= 0"),
    ({"loader_workers": 1.5}, "loader_workers"),
    ({"loader_workers": True}, "loader_workers"),
    ({"steps_per_epoch": 0}, "steps_per_epoch must be an integer >= 1"),
    ({"steps_per_epoch": "10"}, "steps_per_epoch"),
    ({"validation_steps": 0}, "validation_steps must be an integer >= 1"),
    ({"validation_freq": 0}, "validation_freq must be an integer >= 1"),
    ({"validation_freq": []}, "validation_freq must be an integer >= 1 or a non-empty list"),
    ({"validation_freq": [0, 2]}, "validation_freq"),
    ({"validation_freq": 1.0}, "validation_freq"),
    ({"validation_freq": "2"}, "validation_freq"),
])
def test_a_bad_loader_or_keras_fit_knob_is_rejected_naming_it(overrides, match):
    with pytest.raises(ValueError, match=match):
        make(**overrides)


def test_loader_and_keras_fit_knobs_are_recorded_in_the_config_snapshot():
    trainer = make(loader_workers=2, steps_per_epoch=100, validation_steps=5, validation_freq=(5, 1))
    snapshot = trainer._config_snapshot(epochs=1)
    assert {k: snapshot[k] for k in ("loader_workers", "steps_per_epoch", "validation_steps", "validation_freq")} \
        == {"loader_workers": 2, "steps_per_epoch": 100, "validation_steps": 5, "validation_freq": [1, 5]}
    defaults = make()._config_snapshot(epochs=1)
    assert (defaults["loader_workers"], defaults["steps_per_epoch"], defaults["validation_freq"]) == (0, None, 1)
