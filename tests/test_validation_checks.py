"""How often a validation pass that watches for preemption checks the ranks' notices (a real one-rank gloo group)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.utils.data import TensorDataset

from orchestrator.loop.validation import Validation

SAMPLES = 40  # batch size 1: 40 rounds


def _validation(preemption: threading.Event, notice_every_s: float) -> Validation:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SAMPLES, 4, generator=g)
    return Validation(TensorDataset(x, x.sum(1, keepdim=True)), rank=0, world_size=1, batch_size=1, seed=0,
                      device=torch.device("cpu"), preemption=preemption, beat=lambda: None,
                      notice_every_s=notice_every_s)


class _Step:
    """The validation step; sets the preemption notice during its ``notice_at``-th call (1-based)."""

    def __init__(self, preemption: threading.Event, notice_at: int | None = None) -> None:
        self.preemption, self.notice_at, self.calls = preemption, notice_at, 0

    def __call__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.notice_at:
            self.preemption.set()
        torch.rand(1)  # draws from the global stream, as dropout would
        inputs, targets = batch
        return {"loss": torch.nn.functional.mse_loss(model(inputs), targets)}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)


def test_a_watching_pass_checks_its_first_two_rounds_then_at_the_pace_of_notice_every_s(group):
    preemption = threading.Event()
    validation = _validation(preemption, notice_every_s=3600.0)  # the next check would come in an hour
    sums, abandoned = validation.run(_model(), _Step(preemption), watch=True)
    assert not abandoned and sums is not None and sums.count == SAMPLES
    assert validation.checks == 2


def test_with_notice_every_s_zero_every_round_is_checked(group):
    preemption = threading.Event()
    validation = _validation(preemption, notice_every_s=0.0)
    sums, abandoned = validation.run(_model(), _Step(preemption), watch=True)
    assert not abandoned and sums.count == SAMPLES
    assert validation.checks == SAMPLES


def test_a_pass_that_does_not_watch_checks_nothing(group):
    preemption = threading.Event()
    validation = _validation(preemption, notice_every_s=0.0)
    sums, abandoned = validation.run(_model(), _Step(preemption, notice_at=3), watch=False)
    assert not abandoned and sums.count == SAMPLES and validation.checks == 0


def test_a_notice_mid_pass_abandons_it_at_the_next_check_with_the_streams_of_the_pass_start(group):
    preemption = threading.Event()
    validation = _validation(preemption, notice_every_s=0.0)
    model = _model()
    before = torch.get_rng_state()
    step = _Step(preemption, notice_at=10)  # during round 9, after its check was sent
    sums, abandoned = validation.run(model, step, watch=True)
    assert abandoned and sums is None
    assert step.calls == 11  # round 10's batch ran beside the check that saw the notice
    assert torch.equal(torch.get_rng_state(), before)  # a resume validates this epoch again from here
    assert model.training


def test_a_notice_after_the_last_check_lets_the_pass_finish_for_the_epoch_end_to_see_it(group):
    preemption = threading.Event()
    validation = _validation(preemption, notice_every_s=3600.0)
    step = _Step(preemption, notice_at=10)
    sums, abandoned = validation.run(_model(), step, watch=True)
    assert not abandoned and sums.count == SAMPLES and step.calls == SAMPLES
    assert preemption.is_set()  # still set: the loop reports it at the epoch's end


def test_a_negative_notice_every_s_is_refused_naming_it():
    with pytest.raises(ValueError, match="notice_every_s must be at least 0, got -1"):
        _validation(threading.Event(), notice_every_s=-1)
