"""The rank side of a live recovery, without Ray: consistent copies between steps, freezing, rebuilding."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from orchestrator.cluster.recovery_timeline import RecoveryTimeline
from orchestrator.loop.live import LiveState, rebuilt_own, reseed, step_seed, unsupported
from orchestrator.loop.rank_state import Component, MetricSums, Position, Snapshots, rank_components
from orchestrator.loop.specs import LoopResult


class _Data:
    def state_dict(self):
        return {"offset": 3}

    def load_state_dict(self, state):
        pass


def rank(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    position, sums = Position(), MetricSums(torch.device("cpu"))
    components = rank_components(model, optimizer, snapshots=Snapshots(), position=position, metric_sums=sums,
                                 result=LoopResult(rank=1))
    return model, optimizer, position, sums, components


def train_step(model, optimizer, sums, position, epoch, batch):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    sums.train.add(loss.detach(), {}, 8)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    position.advance(epoch, batch)


def test_a_copy_taken_while_a_step_is_in_flight_holds_the_state_of_the_boundary_before_it():
    model, optimizer, position, sums, components = rank()
    live = LiveState(components, rank=1, seed=0)
    for batch in range(3):
        live.mark(position)
        live.unmark()
        train_step(model, optimizer, sums, position, 0, batch)
    live.mark(position)  # the boundary after 3 steps
    want_model = {k: v.clone() for k, v in model.state_dict().items()}
    want_count = sums.train.count
    live.started()
    model(torch.randn(8, 4))  # the next step's forward: batch-norm statistics move
    sums.train.add(torch.tensor(1.0), {}, 8)  # and so do this rank's sums, before the all-reduce
    header, payload = live.copy(shared=True, timeout_s=1.0)
    assert header["ok"] and header["step"] == 3 and header["in_flight"] and header["rank"] == 1
    assert header["position"] == {"epoch": 0, "batch": 2, "global_step": 3, "phase": "batch"}
    for key, value in want_model.items():
        assert torch.equal(payload["shared"]["model"][key], value), key
    assert payload["shared"]["optimizer"]["state"]  # momentum buffers, on CPU
    assert payload["own"]["metric_sums"]["train"]["count"] == want_count
    assert set(payload["own"]) == {"position", "metric_sums", "result"}  # the random streams follow from the step


def test_a_rank_whose_state_was_copied_never_changes_it_again():
    *_, position, _, components = rank()
    live = LiveState(components, rank=0, seed=0)
    live.mark(position)
    assert live.copy(shared=False, timeout_s=1.0)[0]["ok"]
    blocked = threading.Thread(target=live.unmark, daemon=True)  # the update after the all-reduce would begin
    blocked.start()
    blocked.join(timeout=0.5)
    assert blocked.is_alive()  # frozen for good: the rank is being replaced


def test_no_copy_is_handed_out_while_the_state_changes_or_when_a_rank_holds_data_state_of_its_own():
    *_, position, _, components = rank()
    live = LiveState(components, rank=0, seed=0)
    header, payload = live.copy(shared=True, timeout_s=0.05)  # never marked: busy outside a step
    assert not header["ok"] and payload is None and "no step boundary" in header["reason"]
    with_data = dict(components, train_stream=Component(_Data()))
    assert "train_stream" in unsupported(with_data)
    header, _ = LiveState(with_data, rank=0, seed=0).copy(shared=True, timeout_s=0.05)
    assert not header["ok"] and "train_stream" in header["reason"]


def test_a_copy_waits_for_the_next_boundary_when_the_rank_is_between_two():
    *_, position, _, components = rank()
    live = LiveState(components, rank=0, seed=0)
    timer = threading.Timer(0.1, live.mark, args=(position,))
    timer.start()
    header, _ = live.copy(shared=False, timeout_s=30.0)
    timer.join()
    assert header["ok"] and header["step"] == 0


def test_a_dead_ranks_own_state_is_the_donors_with_the_epochs_sums_gone():
    *_, position, sums, components = rank()
    position.advance(1, 4)
    sums.train.add(torch.tensor(2.0), {"mae": torch.tensor(1.0)}, 8)
    sums.see(16.0, 8.0)
    donor = {name: components[name].stateful.state_dict() for name in ("position", "metric_sums", "result")}
    own = rebuilt_own(donor)
    assert own["position"] == donor["position"] and own["result"] == donor["result"]
    assert own["metric_sums"] == {"train": {"names": [], "totals": None, "count": 0}, "seen": [16.0, 8.0]}
    restored = MetricSums(torch.device("cpu"))
    restored.load_state_dict(own["metric_sums"])
    assert restored.running_loss() == 2.0 and restored.train.count == 0


@pytest.mark.parametrize("rank_, step", [(0, 0), (1, 0), (0, 7), (3, 7)])
def test_every_ranks_random_streams_at_a_step_follow_from_the_seed_the_rank_and_the_step(rank_, step):
    reseed(5, rank_, step)
    drawn = (random.random(), torch.rand(3))
    torch.rand(10)  # whatever ran since
    reseed(5, rank_, step)
    assert random.random() == drawn[0] and torch.equal(torch.rand(3), drawn[1])
    assert len({step_seed(5, r, s) for r in range(4) for s in range(8)}) == 32


def test_the_recovery_timeline_is_emitted_once_with_every_part():
    timeline = RecoveryTimeline({"step": 7, "rank": 1, "detection_s": 0.2, "secured_s": 0.1, "secured_at": 100.0,
                                 "lost_steps": 1})
    timeline.joined(101.0, 101.25)
    fields = timeline.first_step(102.0)
    assert fields == {"source": "memory", "rank": 1, "step": 7, "detection_s": 0.2, "secured_s": 0.1,
                      "reformed_s": 1.0, "transferred_s": 0.25, "first_step_s": 0.75, "lost_steps": 1}
    assert timeline.first_step(103.0) is None


def test_a_buffer_replaced_between_two_steps_is_copied_as_the_boundary_holds_it():
    model, optimizer, position, sums, components = rank()
    live = LiveState(components, rank=1, seed=0)
    live.mark(position)  # the first boundary lists the modules
    live.unmark()
    train_step(model, optimizer, sums, position, 0, 0)
    model[1].running_mean = torch.full((4,), 7.0)  # a new tensor under a registered buffer's name
    model[1].register_buffer("scratch", torch.ones(2), persistent=False)  # not in the state: not copied
    live.mark(position)  # a step's boundary: the listed modules' buffers are read again
    live.started()
    model(torch.randn(8, 4))  # the in-flight forward moves the statistics
    header, payload = live.copy(shared=True, timeout_s=1.0)
    assert header["ok"] and header["step"] == 1
    assert torch.equal(payload["shared"]["model"]["1.running_mean"], torch.full((4,), 7.0))
    assert "1.scratch" not in live._buffers and "1.running_var" in live._buffers
