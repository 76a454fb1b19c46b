"""Sync points combined over the process group: rank 0 alone hands the coordinator one combined report.

Fast tests combine recorded reports as the collectives would (elementwise MAX and SUM) and check
that the coordinator's core makes of the combined report what it makes of every rank's; a real
two-rank gloo group (processes forked from the fork server of tests/rank_processes.py, meeting
through a file store) runs :class:`GroupLink` against a real core on rank 0; the coordinator actor's class, in process, counts every rank alive while it
handles a sync point, and no longer once it is done.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from rank_processes import CONTEXT, start_ranks

from loop_links import QuietLink
from orchestrator import callbacks
from orchestrator.cluster.coordinator import Coordinator
from orchestrator.cluster.coordinator_core import CoordinatorCore
from orchestrator.cluster.specs import CoordinatorSpec
from orchestrator.core.metrics import PhaseSums
from orchestrator.decisions import Report, ReportKind, StopTraining
from orchestrator.loop.group_link import GroupLink, agreed, combined, header, lengths, sums_vector

LAYOUT = {"world_size": 2, "batch_size": 8, "seed": 0, "samples": 64, "parameters": {"w": [4, 1]}}
PARAMS = {"epochs": 2, "verbose": 0, "metrics": ["acc"], "metric_directions": {"loss": "min", "acc": "max"}}


def rank_reports(rank: int, lr: float = 0.1, empty: bool = False) -> list[Report]:
    """One rank's reports of an epoch, with sums that differ by rank (not exactly representable floats),
    a non-finite step seen on rank 1 and a preemption notice on rank 1 by the epoch's end."""
    train = PhaseSums({} if empty else {"loss": 8 * (1.1 + rank / 3), "acc": 8 * (0.7 - rank / 7)}, 0 if empty else 8)
    val = PhaseSums({"loss": 4 * (1.3 + rank / 9), "acc": 4 * 0.6}, 4 + rank)
    common = {"learning_rate": lr, "steps_per_epoch": 4}
    return [Report(ReportKind.TRAIN_BEGIN, layout=dict(LAYOUT), **common),
            Report(ReportKind.EPOCH_BEGIN, epoch=0, **common),
            Report(ReportKind.BATCH_END, epoch=0, step=1, train=train, global_step=2, nonfinite=rank == 1, **common),
            Report(ReportKind.EPOCH_END, epoch=0, train=train, val=val, global_step=4, preempted=rank == 1, **common)]


def make_core(world_size: int = 2) -> CoordinatorCore:
    return CoordinatorCore([callbacks.TerminateOnNaN(), callbacks.EarlyStopping(monitor="val_loss", patience=5)],
                           dict(PARAMS), world_size=world_size)


def outcome(core: CoordinatorCore, decisions: list) -> dict[str, Any]:
    """What a core made of a run: its history, its events (no times) and the decisions."""
    events = [{k: v for k, v in e.items() if k != "time"} for e in core.drain()]
    return {"history": core.history, "events": events, "decisions": decisions,
            "error": None if core.error is None else str(core.error)}


def nan_as_text(value: Any) -> Any:
    """``value`` with NaN floats as ``"NaN"``: the non-finite step's loss compares equal once pickled."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, dict):
        return {k: nan_as_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_as_text(v) for v in value]
    return value


def per_rank(reports: dict[int, list[Report]]) -> dict[str, Any]:
    """The coordinator's outcome when every rank reports on its own (the reference)."""
    core = make_core(len(reports))
    decisions = [core.handle({r: reps[i] for r, reps in reports.items()}) for i in range(len(reports[0]))]
    return outcome(core, decisions)


def simulated(reports: dict[int, list[Report]]) -> dict[str, Any]:
    """The coordinator's outcome on what rank 0 sends, the collectives simulated in process."""
    core = make_core(len(reports))
    decisions = []
    for i in range(len(reports[0])):
        mine = {r: reps[i] for r, reps in reports.items()}
        top = [max(column) for column in zip(*(header(rep, r) for r, rep in mine.items()))]
        if agreed(top):
            summed = [sum(column) for column in zip(*(sums_vector(rep, lengths(top)) for rep in mine.values()))]
            sent = {0: combined(mine[0], top, summed)}
        else:
            sent = mine
        decisions.append(core.handle(sent))
    return outcome(core, decisions)


# -- fast: the combining functions --------------------------------------------------------------------


def test_the_combined_report_gives_the_coordinator_the_same_logs_events_and_decisions_as_every_ranks_report():
    reports = {r: rank_reports(r) for r in range(2)}
    got, expected = simulated(reports), per_rank(reports)
    assert got == expected
    epoch_end = got["history"][0]["logs"]
    assert math.isnan(epoch_end["loss"]) is False and epoch_end["val_acc"] == pytest.approx(4.8 / 9)  # every validation sample once
    kinds = [e["type"] for e in got["events"]]
    assert "nan_detected" in kinds and "preempted" in kinds  # flags of rank 1 only: OR-ed


def test_the_summed_phase_sums_are_the_coordinators_float64_sums_of_every_ranks_sums():
    mine = {r: rank_reports(r)[3] for r in range(2)}
    top = [max(column) for column in zip(*(header(rep, r) for r, rep in mine.items()))]
    summed = [sum(column) for column in zip(*(sums_vector(rep, [2, 2]) for rep in mine.values()))]
    report = combined(mine[0], top, summed)
    assert report.train.totals == {"loss": mine[0].train.totals["loss"] + mine[1].train.totals["loss"],
                                   "acc": mine[0].train.totals["acc"] + mine[1].train.totals["acc"]}
    assert (report.train.count, report.val.count) == (16, 9)
    assert (report.preempted, report.nonfinite, report.epoch_ends) == (True, False, False)


@pytest.mark.parametrize("case,agrees", [
    ("same", True),
    ("another learning rate", False),
    ("another layout", False),
    ("another sync point", False),
    ("other metric names", False),
    ("rank 1 has no sums yet", True),
    ("rank 0 has no sums yet", False),  # rank 0 names the sums it sends: every report is sent instead
])
def test_the_ranks_agree_unless_something_that_must_be_the_same_differs(case, agrees):
    mine = rank_reports(0)[3]
    other = rank_reports(1)[3]
    if case == "another learning rate":
        other = Report(**{**other.__dict__, "learning_rate": 0.1 + 1e-12})
    elif case == "another layout":
        mine, other = rank_reports(0)[0], Report(**{**rank_reports(1)[0].__dict__, "layout": {**LAYOUT, "samples": 63}})
    elif case == "another sync point":
        other = rank_reports(1)[2]
    elif case == "other metric names":
        other = Report(**{**other.__dict__, "train": PhaseSums({"loss": 1.0, "mae": 2.0}, 8)})
    elif case == "rank 1 has no sums yet":
        other = Report(**{**other.__dict__, "train": PhaseSums({}, 0)})
    elif case == "rank 0 has no sums yet":
        mine = Report(**{**mine.__dict__, "train": PhaseSums({}, 0)})
    assert agreed([max(pair) for pair in zip(header(mine, 0), header(other, 1))]) is agrees


def test_a_learning_rate_mismatch_still_fails_naming_every_ranks_rate():
    reports = {0: rank_reports(0), 1: rank_reports(1, lr=0.2)}
    got = simulated(reports)
    assert got == per_rank(reports)
    assert "ranks disagree on the learning rate: {0: 0.1, 1: 0.2}" in got["error"]
    assert got["decisions"][0] == [StopTraining(reason="callback_error", source="coordinator")]


def test_a_rank_without_sums_yet_adds_nothing_and_the_logs_stay_those_of_every_rank():
    for empty in (0, 1):
        reports = {r: rank_reports(r, empty=r == empty) for r in range(2)}
        assert simulated(reports) == per_rank(reports)


# -- a real two-rank gloo group -----------------------------------------------------------------------


class CoreLink(QuietLink):
    """Rank 0's line to a real coordinator core in its own process (the actor's handle in production)."""

    def __init__(self, core: CoordinatorCore, fail: bool = False) -> None:
        self.core, self.fail, self.sent = core, fail, []

    def decide(self, reports: dict[int, Report]) -> list:
        if self.fail:
            raise ConnectionError("the coordinator is gone")
        self.sent.append(sorted(reports))
        return self.core.handle(reports)


def _rank(rank: int, store: str, scenario: str, out: Any) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        core = make_core()
        link = GroupLink(CoreLink(core, fail=scenario == "rank 0 fails"), rank, 2, torch.device("cpu"))
        reports = rank_reports(rank, lr=0.2 if scenario == "lr" and rank == 1 else 0.1)
        try:
            decisions = [link.sync(report) for report in reports]
        except Exception as exc:  # noqa: BLE001 - the scenario's error, reported to the test
            out.put((rank, {"raised": f"{type(exc).__name__}: {exc}"}))
            return
        finally:
            link.close()
        got = outcome(core, decisions) if rank == 0 else {"decisions": decisions}
        out.put((rank, {**got, "sent": link.link.sent}))
    finally:
        dist.destroy_process_group()


def two_ranks(tmp_path, scenario: str) -> dict[int, dict[str, Any]]:
    out = CONTEXT.SimpleQueue()
    store = tmp_path / f"store-{uuid.uuid4().hex}"
    start_ranks(_rank, (str(store), scenario, out), nprocs=2)
    return dict(out.get() for _ in range(2))


@pytest.mark.timeout(180)
def test_two_ranks_get_the_same_decisions_as_every_rank_reporting_alone_through_one_call_per_sync_point(tmp_path):
    got = two_ranks(tmp_path, "plain")
    expected = per_rank({r: rank_reports(r) for r in range(2)})
    zero = got[0]
    assert nan_as_text({k: zero[k] for k in expected}) == nan_as_text(expected)  # bit for bit: two ranks' float64 sums in any order
    assert zero["sent"] == [[0], [0], [0], [0]]  # one combined report per sync point, from rank 0
    assert got[1]["sent"] == [] and got[1]["decisions"] == zero["decisions"]


@pytest.mark.timeout(180)
def test_two_ranks_disagreeing_on_the_learning_rate_send_every_report_and_every_rank_stops(tmp_path):
    got = two_ranks(tmp_path, "lr")
    assert "ranks disagree on the learning rate: {0: 0.1, 1: 0.2}" in got[0]["error"]
    assert got[0]["sent"][0] == [0, 1]  # train_begin already disagrees: every rank's report
    stop = [StopTraining(reason="callback_error", source="coordinator")]
    assert got[0]["decisions"][0] == got[1]["decisions"][0] == stop


@pytest.mark.timeout(180)
def test_when_rank_0_cannot_reach_the_coordinator_every_rank_raises_instead_of_waiting(tmp_path):
    got = two_ranks(tmp_path, "rank 0 fails")
    assert got[0]["raised"] == "ConnectionError: the coordinator is gone"
    assert got[1]["raised"].startswith("RuntimeError: rank 0 could not hand the train_begin sync point")
    assert "ConnectionError: the coordinator is gone" in got[1]["raised"]


# -- heartbeats while waiting -------------------------------------------------------------------------


class SlowLink(QuietLink):
    """A coordinator whose callbacks take until this rank has sent ``beats`` heartbeats (10 s at most)."""

    def __init__(self, beats: int) -> None:
        self.beats, self.sent, self.enough = beats, 0, threading.Event()

    def heartbeat(self) -> None:
        self.sent += 1
        if self.sent >= self.beats:
            self.enough.set()

    def decide(self, reports: dict[int, Report]) -> list:
        self.enough.wait(10)
        return []


def test_a_rank_waiting_at_a_sync_point_sends_heartbeats_and_stops_once_it_has_the_decisions():
    slow = SlowLink(beats=3)
    link = GroupLink(slow, 0, 1, torch.device("cpu"), beat_every_s=0.02)
    try:
        assert link.sync(Report(ReportKind.TRAIN_BEGIN)) == []
        assert slow.enough.is_set()  # it beat while the coordinator took its time
        after = slow.sent
        time.sleep(0.2)  # ten intervals, not waiting
        assert slow.sent == after
    finally:
        link.close()


def test_a_group_link_refuses_a_rank_outside_its_group():
    with pytest.raises(ValueError, match="rank must be in"):
        GroupLink(SlowLink(1), 2, 2, torch.device("cpu"))


# -- the coordinator: one arrival per sync point ------------------------------------------------------


async def _ages_around_a_sync_point() -> tuple[dict[int, float], dict[int, float], list]:
    coordinator = Coordinator()
    release, entered = threading.Event(), threading.Event()

    def on_epoch_begin(epoch, logs):
        entered.set()
        release.wait(10)

    coordinator.setup(CoordinatorSpec(world_size=3, params={"epochs": 1},
                                      callbacks=[callbacks.LambdaCallback(on_epoch_begin=on_epoch_begin)]))
    report = Report(ReportKind.TRAIN_BEGIN, learning_rate=0.1, steps_per_epoch=4)
    await coordinator.sync({0: report})
    pending = asyncio.ensure_future(coordinator.sync({0: Report(ReportKind.EPOCH_BEGIN, learning_rate=0.1)}))
    while not entered.is_set():
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    during = coordinator.poll().ages
    release.set()
    decided = await pending
    coordinator.heartbeat(2)
    await asyncio.sleep(0.1)
    return during, coordinator.poll().ages, decided


def test_every_rank_counts_as_alive_while_its_sync_point_is_handled_and_ages_once_it_is_done():
    during, after, decided = asyncio.run(_ages_around_a_sync_point())
    assert decided == [] and during == {0: 0.0, 1: 0.0, 2: 0.0}  # all three reached it: one call from rank 0
    assert after[0] > 0 and after[1] > 0 and after[2] < after[0]  # silent ranks age again; rank 2 beat since
