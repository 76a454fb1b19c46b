"""A survivor waiting at a sync point for a peer that died is at a step boundary: the per-rank loop on a
real one-rank gloo group (no Ray), its state copied there and resumed by a new loop, which ends
bit-identical to an uninterrupted run."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from loop_links import QuietLink
from orchestrator.control.live_recovery import _at_position
from orchestrator.core.config import LoopConfig
from orchestrator.decisions import Decision, Report, ReportKind
from orchestrator.loop.specs import LoopResult, TrainSpec
from orchestrator.loop.train_loop import TrainLoop
from test_train_loop import BATCH, STEPS, TRAIN, _data, _with_dropout

EPOCHS, SYNC_EVERY = 2, 2
Key = tuple[ReportKind, int, int]


class PeerLost(RuntimeError):
    """What the rank's sync raises in these tests once its state was copied (the attempt is over)."""


class LosesPeerAt(QuietLink):
    """Records every report; at ``at`` it copies the rank's state (as the driver does while the rank
    waits there for a dead peer) and ends the rank's loop. Without ``at`` it never interrupts."""

    def __init__(self, at: Key | None = None) -> None:
        self.at = at
        self.reports: list[Report] = []
        self.loop: TrainLoop | None = None
        self.copy: tuple[dict[str, Any], dict[str, Any] | None] | None = None

    def sync(self, report: Report) -> list[Decision]:
        self.reports.append(report)
        if (report.kind, report.epoch, report.step) == self.at:
            self.copy = self.loop.live.copy(shared=True, timeout_s=0.0)  # marked now, or never
            raise PeerLost("the peer's node is gone")
        return []


def _config() -> LoopConfig:
    return LoopConfig(model=_with_dropout, optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
                      data=_data, loss=torch.nn.functional.mse_loss, batch_size=BATCH, seed=0)


def _loop(link: LosesPeerAt, live_restore: Any = None) -> TrainLoop:
    spec = TrainSpec(loop=_config(), epochs=EPOCHS, batch_sync_every=SYNC_EVERY)
    loop = TrainLoop(spec, rank=0, world_size=1, device=torch.device("cpu"), link=link, live_restore=live_restore)
    link.loop = loop
    return loop


def _uninterrupted() -> tuple[LoopResult, LosesPeerAt]:
    link = LosesPeerAt()
    return _loop(link).run(), link


# (sync point, global step of the copied state, the phase of its position): the periodic batch-end
# sync after epoch 1's first step (global step 6) is the first one after the epoch's begin
CASES = [((ReportKind.EPOCH_BEGIN, 1, -1), STEPS, "epoch_end"),
         ((ReportKind.BATCH_END, 1, 0), STEPS + 1, "batch"),
         ((ReportKind.EPOCH_END, 0, -1), STEPS, "batch")]


@pytest.mark.parametrize("at, step, phase", CASES, ids=["epoch_begin", "periodic_batch_end", "epoch_end"])
def test_a_rank_waiting_at_a_sync_point_hands_out_its_state_and_a_loop_resumed_from_it_ends_like_an_uninterrupted_one(
        group, at, step, phase):
    reference, reference_link = _uninterrupted()
    link = LosesPeerAt(at)
    with pytest.raises(PeerLost):
        _loop(link).run()
    header, payload = link.copy
    assert header["ok"], header
    assert header["step"] == step and header["position"]["phase"] == phase
    assert not header["in_flight"]  # no step is lost

    resumed_link = LosesPeerAt()
    resumed = _loop(resumed_link, live_restore=(payload["shared"], payload["own"])).run()
    for name, value in reference.state_dict.items():
        assert torch.equal(resumed.state_dict[name], value), name
    assert resumed.epochs_run == reference.epochs_run == EPOCHS
    assert resumed.learning_rates == reference.learning_rates
    ends = [r for r in resumed_link.reports if r.kind == ReportKind.EPOCH_END]
    assert [r.epoch for r in ends] == list(range(at[1], EPOCHS))  # an interrupted epoch end is reported again
    want = {r.epoch: r.train for r in reference_link.reports if r.kind == ReportKind.EPOCH_END}
    for report in ends:  # with every sample's loss: the copied sums of the epoch so far carried over
        assert report.train.count == TRAIN
        assert report.train.totals == pytest.approx(want[report.epoch].totals, rel=1e-12)


def _nan_linear() -> torch.nn.Module:
    model = torch.nn.Linear(4, 1)
    torch.nn.init.constant_(model.bias, float("nan"))
    return model


def test_a_rank_at_a_non_finite_losss_sync_point_hands_out_nothing(group):
    link = LosesPeerAt((ReportKind.BATCH_END, 0, 0))  # every loss is NaN: a sync point after the first step
    spec = TrainSpec(loop=dataclasses.replace(_config(), model=_nan_linear), epochs=1)
    link.loop = TrainLoop(spec, rank=0, world_size=1, device=torch.device("cpu"), link=link)
    with pytest.raises(PeerLost):
        link.loop.run()
    assert link.reports[-1].nonfinite
    header, payload = link.copy
    assert not header["ok"] and payload is None  # its decision (stop, roll back) is never skipped


@pytest.mark.parametrize("position, view", [
    ({"phase": "start", "epoch": 0, "batch": -1}, (0, 0)),
    ({"phase": "epoch_end", "epoch": 2, "batch": 4}, (3, 0)),
    ({"phase": "begin", "epoch": 2, "batch": -1}, (2, 0)),
    ({"phase": "batch", "epoch": 2, "batch": 4}, (2, 5)),
])
def test_the_coordinators_position_is_moved_to_where_the_survivors_resume(position, view):
    state = _at_position({"view": {"next_epoch": 0, "epoch_steps_done": 0}}, position, step=13)
    assert (state["view"]["next_epoch"], state["view"]["epoch_steps_done"]) == view
    assert state["view"]["global_step"] == 13
