"""compile=: the per-rank loop with a torch.compile'd model (one-rank gloo group, no Ray); its backups,
ModelCheckpoint files and final weights hold the plain module's keys. Also the resume refusals for a
switched precision or lr_scheduler, and the Trainer's checks of compile= and lr_scheduler=. The default backend,
inductor, building C++ kernels: test_inductor_build.py."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

import workloads
from orchestrator import Trainer, callbacks
from orchestrator.core.config import LoopConfig
from orchestrator.core.events import EventType
from orchestrator.decisions import Backup
from orchestrator.loop.compiled import check_compile
from orchestrator.loop.specs import TrainSpec
from orchestrator.loop.state_io import from_bytes
from orchestrator.loop.train_loop import TrainLoop
from orchestrator.storage.checkpoint import SHARED_FILE
from orchestrator.storage.layout import ResumeMismatch, check_layout
from test_train_loop import (
    BATCH, BATCH_END, InProcessLink, StandInCoordinator, _assert_same_weights, _data, _fit, _run,
    _storage, _with_dropout)

EAGER = {"backend": "eager"}  # dynamo traces the model; no C++ toolchain involved (fast)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _config(compile=False, model=_with_dropout, **kw) -> LoopConfig:
    return LoopConfig(model=model, optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
                      data=_data, loss=torch.nn.functional.mse_loss, metrics={"mae": "mae"}, batch_size=BATCH,
                      seed=0, compile=compile, **kw)


def _counting_backend(graphs: list):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def _plain_keys() -> list[str]:
    return sorted(_with_dropout().state_dict())


# -- the loop -------------------------------------------------------------------------------------
def test_a_compiled_model_runs_its_forward_through_dynamo_and_trains_like_the_plain_one(group):
    graphs: list = []
    compiled = _run(StandInCoordinator(), _config(compile={"backend": _counting_backend(graphs)}), epochs=2)
    plain = _run(StandInCoordinator(), _config(), epochs=2)
    assert graphs, "the model's forward never went through torch.compile"
    assert sorted(compiled.state_dict) == _plain_keys()  # no _orig_mod. prefix
    _assert_same_weights(compiled.state_dict, plain.state_dict)


def test_backups_and_model_checkpoints_of_a_compiled_model_hold_the_plain_keys_and_load_uncompiled(group, tmp_path):
    storage = _storage(tmp_path)
    config = _config(compile=EAGER)
    result, link = _fit([callbacks.ModelCheckpoint("m.pt"), callbacks.BackupAndRestore()], config, epochs=1,
                        storage=storage)
    (commit,) = link.events(EventType.BACKUP_COMMITTED)
    shared = from_bytes(storage.read_bytes(f"{commit['folder']}/{SHARED_FILE}"))
    assert sorted(shared["model"]) == _plain_keys()
    saved = torch.load(io.BytesIO(storage.read_bytes("checkpoints/m.pt")), weights_only=True)
    plain = _with_dropout()
    plain.load_state_dict(saved["model"])  # strict: the keys of an uncompiled model
    _assert_same_weights(plain.state_dict(), result.state_dict)


def test_a_model_factory_returning_torch_compile_trains_compiled_and_saves_the_plain_keys(group, tmp_path):
    graphs: list = []
    storage = _storage(tmp_path)
    config = _config(model=lambda: torch.compile(_with_dropout(), backend=_counting_backend(graphs)))
    result, link = _fit([callbacks.ModelCheckpoint("m.pt"), callbacks.BackupAndRestore()], config, epochs=1,
                        storage=storage)
    plain = _run(StandInCoordinator(), _config(), epochs=1)
    assert graphs, "the factory's torch.compile was dropped: the forward never went through dynamo"
    (commit,) = link.events(EventType.BACKUP_COMMITTED)
    assert sorted(from_bytes(storage.read_bytes(f"{commit['folder']}/{SHARED_FILE}"))["model"]) == _plain_keys()
    saved = torch.load(io.BytesIO(storage.read_bytes("checkpoints/m.pt")), weights_only=True)
    _with_dropout().load_state_dict(saved["model"])  # strict: no _orig_mod. prefix
    assert sorted(result.state_dict) == _plain_keys()
    _assert_same_weights(result.state_dict, plain.state_dict)


@pytest.mark.parametrize("first, then", [(EAGER, False), (False, EAGER)])
def test_a_run_resumed_mid_epoch_with_compile_switched_ends_bit_identical(group, tmp_path, first, then):
    storage = _storage(tmp_path)
    uninterrupted = StandInCoordinator({(BATCH_END, 1, 2): [Backup(backup_dir="backup")]}, draws_rng=True)
    whole = _run(uninterrupted, _config(compile=first), epochs=3, storage=storage, batch_sync_every=1)
    (_, folder, _, _), = uninterrupted.persisted
    rest = _run(StandInCoordinator(draws_rng=True), _config(compile=then), epochs=3, storage=storage,
                batch_sync_every=1, resume_from=folder)
    _assert_same_weights(rest.state_dict, whole.state_dict)


# -- resume refusals ------------------------------------------------------------------------------
def _warmup(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))


@pytest.mark.parametrize("before, after, says", [
    ({}, {"precision": "16-mixed"}, "precision was '32-true' when it was written and is '16-mixed' now"),
    ({"precision": "16-mixed"}, {"precision": "bf16-mixed"}, r"Resume with precision='16-mixed'"),
    ({}, {"lr_scheduler": _warmup}, "lr_scheduler was None when it was written and is set now"),
    ({"lr_scheduler": _warmup}, {}, r"Resume with the same lr_scheduler="),
])
@pytest.mark.parametrize("recorded", [True, False], ids=["layout", "older-backup"])
def test_a_resume_that_switches_16_mixed_or_an_lr_scheduler_is_refused_naming_the_option(
        group, tmp_path, before, after, says, recorded):
    storage = _storage(tmp_path)
    writer = StandInCoordinator({(BATCH_END, 0, 1): [Backup(backup_dir="backup")]})
    _run(writer, _config(**before), epochs=1, storage=storage, batch_sync_every=1)
    (_, folder, _, _), = writer.persisted
    layout = writer.reports[0].layout
    if not recorded:  # a backup whose layout predates these fields: the saver says it
        layout = {k: v for k, v in layout.items() if k not in ("precision", "lr_scheduler")}
        option = "precision" if "precision" in {**before, **after} else "lr_scheduler"
        says = option
    spec = TrainSpec(loop=_config(**after), epochs=1, resume_from=folder, resume_layout=layout)
    loop = TrainLoop(spec, rank=0, world_size=1, device=torch.device("cpu"),
                     link=InProcessLink(StandInCoordinator()), storage=storage)
    with pytest.raises(ResumeMismatch, match=says) as info:
        loop.run()
    assert str(info.value).startswith(f"cannot resume from {folder}:")


def test_a_resume_from_32_true_to_bf16_mixed_is_allowed(group, tmp_path):
    storage = _storage(tmp_path)
    first, link = _fit([callbacks.BackupAndRestore()], _config(), epochs=1, storage=storage)
    (commit,) = link.events(EventType.BACKUP_COMMITTED)
    rest, _ = _fit([callbacks.BackupAndRestore()], dataclasses.replace(_config(), precision="bf16-mixed"), epochs=2,
                   storage=storage, resume_from=commit["folder"])
    assert rest.epochs_run == 2


@pytest.mark.parametrize("recorded, current, ok", [
    ({"precision": "32-true"}, {"precision": "bf16-mixed"}, True),
    ({"precision": "16-mixed"}, {"precision": "16-mixed"}, True),
    ({"precision": "bf16-mixed"}, {"precision": "16-mixed"}, False),
    ({"lr_scheduler": True}, {"lr_scheduler": True}, True),
    ({"lr_scheduler": False}, {"lr_scheduler": True}, False),
])
def test_the_driver_s_layout_check_compares_scaler_use_and_schedule_presence(recorded, current, ok):
    if ok:
        check_layout(recorded, current, "backup/step-3")
    else:
        with pytest.raises(ResumeMismatch, match=next(iter(current))):
            check_layout(recorded, current, "backup/step-3")


# -- Trainer(...) checks --------------------------------------------------------------------------
def _make(**overrides) -> Trainer:
    kwargs = dict(model=workloads.tiny_model, optimizer=workloads.sgd, loss=workloads.cross_entropy,
                  data=workloads.odd_data, batch_size=16)
    return Trainer(**{**kwargs, **overrides})


@pytest.mark.parametrize("value, match", [
    ("yes", "compile must be True, False or a dict"),
    ({"bogus": 1}, r"compile: unknown torch.compile argument\(s\) \['bogus'\]"),
    ({"backend": 3}, "compile: backend must be"),
    ({"mode": 1}, "compile: mode must be"),
])
def test_a_bad_compile_value_is_rejected_naming_it(value, match):
    with pytest.raises(ValueError, match=match):
        _make(compile=value)


def test_compile_true_without_a_cpp_compiler_fails_in_the_trainer_naming_it(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-cxx-for-orchestrator-tests")
    with pytest.raises(ValueError, match=r"compile=True needs a C\+\+ compiler.*'no-such-cxx-for-orchestrator-tests'"):
        _make(compile=True)
    _make(compile=EAGER)  # other backends need no toolchain
    _make(compile=False)
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):  # what a rank raises when it builds
        check_compile(True, "cpu")


def test_compile_true_on_gpu_workers_without_triton_fails_in_the_trainer_naming_it(monkeypatch):
    monkeypatch.setattr("orchestrator.loop.compiled.importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValueError, match="triton"):
        _make(compile=True, use_gpu=True)


def test_compile_is_recorded_in_the_config_snapshot():
    assert _make()._config_snapshot(1)["compile"] is False
    assert _make(compile={"backend": "eager", "mode": None})._config_snapshot(1)["compile"] == {
        "backend": "eager", "mode": None}


def _plateau(optimizer):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)


def _second_group_only(optimizer):  # cannot run on the dummy optimizer: left to the worker's check
    assert len(optimizer.param_groups) > 1
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def _not_a_scheduler(optimizer):
    return object()


def test_torch_s_reduce_lr_on_plateau_as_lr_scheduler_is_refused_in_the_trainer():
    with pytest.raises(ValueError, match="lr_scheduler must not be torch's ReduceLROnPlateau.*callbacks.ReduceLROnPlateau"):
        _make(lr_scheduler=_plateau)
    with pytest.raises(ValueError, match="lr_scheduler must return a torch.optim.lr_scheduler.LRScheduler"):
        _make(lr_scheduler=_not_a_scheduler)
    _make(lr_scheduler=_second_group_only)  # fails on the dummy: not refused here
    _make(lr_scheduler=_warmup)
