"""The model side's end (DDP's reducer freed when the loop ends, whatever ends it), its gradients (views of
DDP's buckets, checked for non-finite values as few spans) and the loop's time-gated signs of life (Pulse). One-rank gloo group in this process, no Ray."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from orchestrator.loop.group_link import Pulse
from orchestrator.loop.model_side import build_model_side
from orchestrator.loop.steps import contiguous_spans
from orchestrator.loop.specs import TrainSpec
from orchestrator.loop.train_loop import TrainLoop
from test_train_loop import InProcessLink, StandInCoordinator, _config


def _loop(config) -> TrainLoop:
    return TrainLoop(TrainSpec(loop=config, epochs=1), rank=0, world_size=1, device=torch.device("cpu"),
                     link=InProcessLink(StandInCoordinator()))


def _empty_training_set():
    return torch.utils.data.TensorDataset(torch.zeros(0, 4), torch.zeros(0, 1)), None


@pytest.mark.parametrize("ends", ["finished", "raised after DDP was built"])
def test_a_loop_frees_ddps_reducer_when_it_ends_so_no_collector_frees_a_process_group_holding_the_gil(group, ends):
    # Left to the garbage collector after destroy_process_group, the reducer can hold the gloo group's last
    # reference and destroy it holding the GIL, while the group's worker thread waits for the GIL: a deadlock
    # (orchestrator/loop/model_side.py). The loop frees it while the group is still registered.
    config = _config() if ends == "finished" else dataclasses.replace(_config(), data=_empty_training_set)
    loop = _loop(config)
    if ends == "finished":
        result = loop.run()
        assert result.state_dict is not None and result.steps_run > 0
    else:
        with pytest.raises(ValueError, match="empty training dataset"):
            loop.run()
    assert isinstance(loop.ddp, DistributedDataParallel)
    assert not hasattr(loop.ddp, "reducer") and not hasattr(loop.ddp, "logger")


class RecordingLink:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def progress(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        self.calls.append(("progress", epoch, step, logs["loss"]))

    def heartbeat(self) -> None:
        self.calls.append(("heartbeat",))


@pytest.mark.parametrize("rank, loss, expected", [
    (0, 0.5, ("progress", 1, 7, 0.5)),
    (0, math.inf, ("progress", 1, 7, "nan")),  # a non-finite running loss is sent as NaN
    (1, 0.5, ("heartbeat",)),  # the other ranks' signs of life are heartbeats
])
def test_a_pulse_sends_rank_0s_running_loss_and_the_other_ranks_heartbeats(rank, loss, expected):
    link = RecordingLink()
    Pulse(link, rank, every_s=0.0).progress(1, 7, loss)
    (call,) = link.calls
    assert call[:3] == expected[:3]
    if expected[0] == "progress":
        assert math.isnan(call[3]) if expected[3] == "nan" else call[3] == expected[3]


def test_a_pulse_sends_at_most_one_sign_per_interval_shared_by_progress_and_heartbeats():
    link = RecordingLink()
    pulse = Pulse(link, 0, every_s=3600.0)
    pulse.progress(0, 1, 0.5)
    pulse.progress(0, 2, 0.4)
    pulse.beat()
    assert link.calls == [("progress", 0, 1, 0.5)]
    eager = Pulse(link := RecordingLink(), 1, every_s=0.0)
    eager.beat()
    eager.beat()
    assert link.calls == [("heartbeat",), ("heartbeat",)]


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def _backward(side, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = torch.nn.functional.mse_loss(side.ddp(x), y)
    term = side.signals.term(torch.tensor([0.0, loss.item() * len(x), float(len(x)), 0.0, 0.0]))
    torch.autograd.backward([loss, term])


@pytest.mark.parametrize("poisoned", [None, 0, 1, 2, 3])
def test_ddps_gradients_are_views_of_its_buckets_and_a_nan_in_any_of_them_is_flagged(group, poisoned):
    side = build_model_side(_config(model=_mlp), torch.device("cpu"), world_size=1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for _ in range(2):  # DDP's buckets are rebuilt after its first step
        _backward(side, x, y)
        side.signals.collect(list(side.model.parameters()))
        side.optimizer.zero_grad(set_to_none=True)
    _backward(side, x, y)
    params = list(side.model.parameters())
    storages = {p.grad.untyped_storage().data_ptr() for p in params}
    assert len(storages) < len(params)  # they share the buckets' storage (no copy back after the all-reduce)
    assert len(contiguous_spans([p.grad for p in params])) == len(storages)
    if poisoned is not None:
        params[poisoned].grad.view(-1)[-1] = float("nan")
    values = side.signals.collect(params)
    assert values[2] == 8.0  # the batch size rode the all-reduce as the signal's gradient
    assert values[-1] == (0.0 if poisoned is None else 1.0)
