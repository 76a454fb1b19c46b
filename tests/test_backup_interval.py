"""BackupAndRestore(save_freq="auto"): the Young/Daly interval from measured costs, without Ray."""

from __future__ import annotations

import math

import pytest

from orchestrator.callbacks import BackupAndRestore, Callback
from orchestrator.callbacks.backup_interval import AutoInterval, young_daly_s
from orchestrator.cluster.coordinator_core import CoordinatorCore
from orchestrator.core.events import EventType
from orchestrator.decisions import Backup, BackupInterval, Report, ReportKind, SyncEvery

DAY = 86_400.0


def policy(mtbf_s: float = DAY, low: float = 10.0, high: float = 3600.0, step_s: float = 0.02) -> AutoInterval:
    p = AutoInterval(mtbf_s=mtbf_s, min_interval_s=low, max_interval_s=high)
    p.see_steps(step_s * 100, 100)
    return p


# -- the interval --------------------------------------------------------------------------------


@pytest.mark.parametrize("stall_s, persist_s, mtbf_s, low, high, step_s, seconds, steps, bound", [
    (0.05, 0.5, DAY, 10.0, 3600.0, 0.02, math.sqrt(2 * 0.05 * DAY), 4648, None),   # the optimum
    (0.2, 0.5, DAY, 10.0, 3600.0, 0.02, math.sqrt(2 * 0.2 * DAY), 9295, None),    # 4x the cost: 2x the interval
    (0.05, 0.5, DAY, 10.0, 3600.0, 0.1, math.sqrt(2 * 0.05 * DAY), 930, None),     # slower steps: fewer of them
    (1e-6, 0.5, DAY, 10.0, 3600.0, 0.02, 10.0, 500, "min"),                        # cheap backups: the lower bound
    (1e-6, 30.0, DAY, 10.0, 3600.0, 0.02, 30.0, 1500, "persist"),                  # never shorter than a persist
    (100.0, 5.0, DAY, 10.0, 3600.0, 0.02, 3600.0, 180000, "max"),                  # costly backups: the upper bound
    (0.01, 0.1, 1.0, 0.0, 3600.0, 0.02, math.sqrt(2 * 0.01 * 1.0), 7, None),       # failures every second
    (1e-6, 0.0, 1e-6, 0.0, 3600.0, 0.02, math.sqrt(2e-12), 1, None),               # never below one step
])
def test_the_interval_is_the_young_daly_optimum_within_its_bounds_in_steps(stall_s, persist_s, mtbf_s, low, high,
                                                                          step_s, seconds, steps, bound):
    p = policy(mtbf_s, low, high, step_s)
    p.see_backup(stall_s, persist_s)
    choice = p.evaluate(trained_s=0.0, failures=0)
    assert choice.seconds == pytest.approx(seconds)
    assert choice.steps == steps
    assert choice.bound == bound
    assert choice.cost_s == stall_s and choice.persist_s == persist_s and choice.mtbf_s == mtbf_s


def test_before_any_backup_commits_the_interval_is_the_lower_bound_so_the_first_backup_measures_the_cost():
    choice = policy(low=10.0).evaluate(0.0, 0)
    assert (choice.bound, choice.seconds, choice.steps, choice.cost_s, choice.optimum_s) == ("no_cost", 10.0, 500,
                                                                                             None, None)


def test_no_interval_is_proposed_before_a_step_was_timed():
    p = AutoInterval(mtbf_s=DAY, min_interval_s=10.0, max_interval_s=3600.0)
    p.see_backup(0.1, 1.0)
    assert p.evaluate(0.0, 0) is None


@pytest.mark.parametrize("costs, expected_steps", [
    ([0.05], [4648]),
    ([0.05, 0.05, 0.05], [4648, None, None]),                   # unchanged: no new decision
    ([0.05, 0.06], [4648, None]),                               # within 25%: kept (median 0.055)
    ([0.05, 0.2, 0.2], [4648, 7348, 9295]),                     # the median follows a lasting change
    ([0.2, 0.2, 0.2, 0.05, 0.05], [9295, None, None, None, 4648]),  # and back down
    ([0.05, 0.05, 5.0], [4648, None, None]),                    # one slow backup does not move it
])
def test_the_interval_moves_as_the_measured_cost_changes(costs, expected_steps):
    p = policy()
    got = []
    for cost in costs:
        p.see_backup(cost, 0.5)
        choice = p.evaluate(0.0, 0)
        got.append(choice.steps if choice else None)
    assert got == expected_steps


@pytest.mark.parametrize("trained_s, failures, mtbf_s", [
    (1000.0, 0, DAY),                        # no failures: the configured value
    (1000.0, 1, (1000.0 + DAY) / 2),         # the configured value counts as one observed interval
    (100 * 3600.0, 99, (100 * 3600.0 + DAY) / 100),  # many failures dominate it
])
def test_the_mtbf_is_configured_until_failures_are_observed(trained_s, failures, mtbf_s):
    p = policy()
    p.see_backup(0.05, 0.5)
    choice = p.evaluate(trained_s, failures)
    assert choice.mtbf_s == pytest.approx(mtbf_s)
    assert choice.seconds == pytest.approx(min(max(young_daly_s(0.05, mtbf_s), 10.0), 3600.0))


def test_the_step_time_is_a_moving_mean_of_the_measured_steps():
    p = AutoInterval(mtbf_s=DAY, min_interval_s=0.0, max_interval_s=3600.0)
    p.see_steps(1.0, 100)
    p.see_steps(2.0, 100)
    assert p.step_s == pytest.approx(0.3 * 0.02 + 0.7 * 0.01)
    p.see_steps(1.0, 0)  # no steps: ignored
    assert p.step_s == pytest.approx(0.013)


def test_the_policy_state_round_trips():
    p = policy()
    p.see_backup(0.05, 0.5)
    p.evaluate(0.0, 0)
    q = AutoInterval(mtbf_s=DAY, min_interval_s=10.0, max_interval_s=3600.0)
    q.load_state_dict(p.state_dict())
    assert (q.step_s, q.costs, q.current) == (p.step_s, p.costs, p.current)


# -- the callback's arguments --------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"save_freq": "often"}, r"Expected either 'epoch', 'auto' or a positive integer"),
    ({"save_freq": "auto", "mtbf_s": 0}, r"mtbf_s must be a positive finite number"),
    ({"save_freq": "auto", "mtbf_s": -5.0}, r"mtbf_s must be a positive"),
    ({"save_freq": "auto", "mtbf_s": math.inf}, r"mtbf_s must be a positive finite"),
    ({"save_freq": "auto", "mtbf_s": "1h"}, r"mtbf_s must be a positive"),
    ({"save_freq": "auto", "min_interval_s": -1}, r"min_interval_s must be a non-negative"),
    ({"save_freq": "auto", "max_interval_s": 0}, r"max_interval_s must be a positive"),
    ({"save_freq": "auto", "min_interval_s": 100, "max_interval_s": 10}, r"max_interval_s=10 is below min_interval_s"),
    ({"save_freq": 50, "mtbf_s": 3600}, r"mtbf_s applies only to save_freq='auto'"),
    ({"save_freq": "epoch", "max_interval_s": 60}, r"max_interval_s applies only to save_freq='auto'"),
])
def test_bad_auto_settings_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BackupAndRestore(**kwargs)


def test_auto_syncs_at_the_first_step_and_integer_and_epoch_modes_keep_their_intervals():
    assert BackupAndRestore(save_freq="auto").batch_sync_every == 1
    assert BackupAndRestore(save_freq=7).batch_sync_every == 7
    assert BackupAndRestore().batch_sync_every is None


# -- on the coordinator's core -------------------------------------------------------------------


def sync(core: CoordinatorCore, kind: ReportKind, step: int = -1, global_step: int = 0) -> list:
    return core.handle({r: Report(kind, epoch=0, step=step, learning_rate=0.1, steps_per_epoch=100,
                                  global_step=global_step) for r in range(2)})


def test_the_first_timed_step_sets_the_interval_records_an_event_and_tells_the_ranks_their_new_sync_interval():
    cb = BackupAndRestore(save_freq="auto", min_interval_s=0.0)  # no cost known yet: the lower bound, one step
    core = CoordinatorCore([cb], {"epochs": 1}, world_size=2)
    sync(core, ReportKind.TRAIN_BEGIN)
    sync(core, ReportKind.EPOCH_BEGIN)
    decisions = sync(core, ReportKind.BATCH_END, step=0, global_step=1)
    assert [type(d) for d in decisions] == [BackupInterval, Backup]  # the sync interval stays 1: no SyncEvery
    (event,) = [e for e in core.events if e["type"] is EventType.BACKUP_INTERVAL]
    assert (event["steps"], event["bound"], event["cost_s"], event["source"]) == (1, "no_cost", None,
                                                                                 "BackupAndRestore")
    assert event["mtbf_s"] == 86_400.0 and event["step_s"] > 0


class Every(Callback):
    """Asks for batch hooks every ``n`` steps, and for ``later`` from its first batch hook on."""

    def __init__(self, n: int, later: int) -> None:
        super().__init__()
        self.batch_sync_every, self.later = n, later

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.batch_sync_every = self.later


def test_a_changed_sync_interval_reaches_the_ranks_first_in_the_decision_list():
    core = CoordinatorCore([Every(4, 6), Every(6, 6)], {"epochs": 1}, world_size=2)
    assert core.sync_every == 2
    sync(core, ReportKind.TRAIN_BEGIN)
    assert sync(core, ReportKind.BATCH_END, step=1, global_step=2) == [SyncEvery(6)]
    assert sync(core, ReportKind.BATCH_END, step=5, global_step=6) == []


def test_a_resumed_auto_interval_reaches_the_ranks_at_train_begin():
    cb = BackupAndRestore(save_freq="auto")
    state = {"seen": 40, "auto": {"step_s": 0.02, "costs": [[0.05, 0.5]], "current": None}, "every": 40,
             "trained_s": 12.0, "cost_step": 40}
    core = CoordinatorCore([cb], {"epochs": 1}, world_size=2, restore={"callbacks": [state]})
    assert sync(core, ReportKind.TRAIN_BEGIN, global_step=40)[0] == SyncEvery(40)
    assert cb.batch_sync_every == 40 and cb.state_dict()["trained_s"] == 12.0
