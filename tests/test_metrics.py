"""The built-in metric registry (orchestrator.core.metrics): names, aliases, directions, values."""

from __future__ import annotations

import operator

import pytest
import torch

import workloads
from orchestrator import Trainer, callbacks
from orchestrator.core.metrics import (
    BUILTIN_METRICS, PhaseSums, aggregate, get_metric, metric_directions, normalise_metrics)
from orchestrator.loop.steps import make_default_step, resolve_metrics

LOGITS = torch.tensor([[2.0, 0.1, 0.3], [0.2, 0.1, 3.0], [0.5, 1.5, 0.2], [0.9, 0.8, 0.1]])
CLASSES = torch.tensor([0, 2, 0, 0])  # three of four argmaxes are right
PROBS = torch.tensor([[0.9], [0.2], [0.6], [0.4]])
LABELS = torch.tensor([1.0, 0.0, 0.0, 1.0])  # thresholded at 0.5: right, right, wrong, wrong
PREDICTIONS = torch.tensor([[1.0], [2.0], [4.0]])
TARGETS = torch.tensor([1.5, 2.0, 2.0])  # errors -0.5, 0, 2


@pytest.mark.parametrize("name,canonical,mode", [
    ("accuracy", "accuracy", "max"),
    ("acc", "accuracy", "max"),
    ("mse", "mse", "min"),
    ("mean_squared_error", "mse", "min"),
    ("mae", "mae", "min"),
    ("mean_absolute_error", "mae", "min"),
])
def test_every_built_in_name_and_alias_selects_a_metric_with_its_direction(name, canonical, mode):
    metric = get_metric(name)
    assert metric is BUILTIN_METRICS[canonical]
    assert metric.mode == mode
    assert metric_directions([name]) == {"loss": "min", name: mode}


def test_the_registry_lists_exactly_the_documented_built_ins():
    assert set(BUILTIN_METRICS) == {"accuracy", "mse", "mae"}
    assert all(m.mode in ("min", "max") and callable(m.fn) for m in BUILTIN_METRICS.values())


@pytest.mark.parametrize("name", ["precision", "Accuracy", "", "loss", None])
def test_an_unknown_metric_name_is_rejected_with_the_list_of_built_ins(name):
    with pytest.raises(ValueError, match=r"unknown metric .*built-ins are accuracy \(or acc\), mse"):
        get_metric(name)


@pytest.mark.parametrize("fn,outputs,targets,expected", [
    ("accuracy", LOGITS, CLASSES, 0.75),
    ("acc", LOGITS, CLASSES, 0.75),
    ("accuracy", PROBS, LABELS, 0.5),
    ("mse", PREDICTIONS, TARGETS, (0.25 + 0.0 + 4.0) / 3),
    ("mae", PREDICTIONS, TARGETS, (0.5 + 0.0 + 2.0) / 3),
])
def test_built_in_functions_give_the_batch_mean_on_small_tensors(fn, outputs, targets, expected):
    value = get_metric(fn).fn(outputs, targets)
    assert value.shape == ()
    assert value.item() == pytest.approx(expected)


@pytest.mark.parametrize("metrics,expected", [
    (None, {}),
    ("acc", {"acc": "accuracy"}),
    (["accuracy", "mae"], {"accuracy": "accuracy", "mae": "mae"}),
    ({"my_acc": "acc"}, {"my_acc": "accuracy"}),
])
def test_metrics_are_normalised_to_logged_name_and_canonical_built_in(metrics, expected):
    assert normalise_metrics(metrics) == expected


@pytest.mark.parametrize("metrics,match", [
    (["precision"], "metrics: unknown metric 'precision'"),
    ({"f1": "precision"}, r"metrics\['f1'\]: unknown metric 'precision'"),
    ({"f1": 3}, r"metrics\['f1'\] must be a built-in name or fn"),
    ({"": "acc"}, "metrics: every key must be a non-empty metric name"),
    (5, "metrics must be a list of built-in names or a dict"),
])
def test_a_bad_metrics_argument_names_the_entry_and_what_to_pass(metrics, match):
    with pytest.raises(ValueError, match=match):
        normalise_metrics(metrics)


@pytest.mark.parametrize("metrics, name", [
    ({"loss": "mse"}, "loss"),
    ({"val_loss": "mse"}, "val_loss"),
    ({"val_": "mse"}, "val_"),
    ({"learning_rate": "mae"}, "learning_rate"),
    ({"batch_size": "mae"}, "batch_size"),
    ({"epoch": "acc"}, "epoch"),
    ({"batch": "acc"}, "batch"),
    (["loss"], "loss"),
    ("val_accuracy", "val_accuracy"),
])
def test_a_metric_name_the_logs_already_use_is_rejected_naming_it(metrics, name):
    with pytest.raises(ValueError, match=f"metrics: the name '{name}' is reserved"):
        normalise_metrics(metrics)


def test_directions_cover_aliases_and_registry_functions_but_not_custom_functions():
    metrics = {"acc": "accuracy", "err": "mse", "mine": get_metric("mae").fn, "f1": lambda o, t: o}
    assert metric_directions(metrics) == {"loss": "min", "acc": "max", "err": "min", "mine": "min"}


def test_resolve_metrics_uses_the_registry_functions_and_keeps_custom_ones():
    custom = lambda o, t: o.sum()  # noqa: E731
    resolved = resolve_metrics({"acc": "accuracy", "mine": custom})
    assert resolved == {"acc": BUILTIN_METRICS["accuracy"].fn, "mine": custom}


def test_the_default_step_logs_a_built_in_under_the_name_the_user_gave():
    step = make_default_step(torch.nn.functional.cross_entropy, resolve_metrics(normalise_metrics(["acc"])))
    out = step(lambda x: x, (LOGITS, CLASSES))
    assert set(out) == {"loss", "acc", "batch_size"}
    assert out["acc"].item() == pytest.approx(0.75)


def test_aggregate_is_the_sample_weighted_mean_over_ranks():
    reports = [PhaseSums({"loss": 3.0, "acc": 2.0}, 4), PhaseSums({"loss": 1.0, "acc": 0.0}, 1)]
    assert aggregate(reports) == {"loss": pytest.approx(0.8), "acc": pytest.approx(0.4)}
    assert aggregate([PhaseSums(), PhaseSums()]) == {}


def test_trainer_with_acc_reports_acc_and_val_acc_and_monitors_it_as_maximised(ray_cluster, tmp_path):
    stopper = callbacks.EarlyStopping(monitor="val_acc", patience=5)
    trainer = Trainer(model=workloads.tiny_model, optimizer=workloads.sgd, loss=workloads.cross_entropy,
                      data=workloads.odd_data, metrics=["acc"], batch_size=32, num_workers=2,
                      storage=str(tmp_path), run_name="alias", callbacks=[stopper])
    assert stopper.monitor_op is operator.gt
    history = trainer.fit(epochs=1, verbose=0)
    assert {"loss", "acc", "val_loss", "val_acc"} <= set(history.history)
    assert "accuracy" not in history.history and "val_accuracy" not in history.history
    assert 0.0 <= history.history["val_acc"][0] <= 1.0
