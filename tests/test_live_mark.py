"""LiveState.mark copies nothing: what a copy hands out is still the boundary's own state after the rank changed it."""

from __future__ import annotations

import torch

from orchestrator.loop.live import LiveState
from orchestrator.loop.rank_state import MetricSums, Position, Snapshots, rank_components
from orchestrator.loop.specs import LoopResult


def _rank():
    model = torch.nn.Linear(3, 1)
    position, sums, result = Position(), MetricSums(torch.device("cpu")), LoopResult(rank=0)
    components = rank_components(model, torch.optim.SGD(model.parameters(), lr=0.1), snapshots=Snapshots(),
                                 position=position, metric_sums=sums, result=result)
    return position, sums, result, components


def test_a_copy_holds_the_marked_own_state_after_the_epochs_end_and_the_next_epoch_changed_every_part_of_it():
    position, sums, result, components = _rank()
    sums.train.add(torch.tensor(2.0), {"acc": torch.tensor(0.5)}, 4)
    sums.see(8.0, 4.0)
    position.advance(0, 0)
    result.learning_rates.append(0.1)
    result.steps_run = 1
    live = LiveState(components, rank=0, seed=0)
    live.mark(position)  # the epoch's last step is done: this mark holds through its end (see train_loop)
    want = {name: components[name].stateful.state_dict() for name in ("position", "metric_sums", "result")}
    want["metric_sums"]["train"]["totals"] = want["metric_sums"]["train"]["totals"].clone()
    sums.train.add(torch.tensor(3.0), {"acc": torch.tensor(1.0)}, 4)  # everything the rank may change while marked
    sums.see(12.0, 4.0)
    position.end_epoch(0, 0)
    result.epochs_run += 1
    result.learning_rates.append(0.05)
    result.stopped_at = (0, 0)
    header, payload = live.copy(shared=False, timeout_s=1.0)
    own = payload["own"]
    assert header["ok"] and header["position"] == want["position"] == own["position"]
    assert own["result"] == want["result"] and own["result"]["learning_rates"] == [0.1]
    assert own["metric_sums"]["seen"] == [8.0, 4.0] and own["metric_sums"]["train"]["count"] == 4
    assert torch.equal(own["metric_sums"]["train"]["totals"], want["metric_sums"]["train"]["totals"])
    assert sums.train.phase_sums().totals == {"loss": 20.0, "acc": 6.0}  # the rank's own sums went on


def test_each_mark_holds_the_state_of_its_own_boundary_not_an_earlier_one():
    position, sums, _, components = _rank()
    live = LiveState(components, rank=0, seed=0)
    live.mark(position)
    live.unmark()  # the step's update
    sums.train.add(torch.tensor(1.0), {}, 2)
    position.advance(0, 0)
    live.mark(position)
    header, payload = live.copy(shared=False, timeout_s=1.0)
    assert header["step"] == 1 and payload["own"]["position"]["global_step"] == 1
    assert payload["own"]["metric_sums"]["train"]["totals"].tolist() == [2.0]
