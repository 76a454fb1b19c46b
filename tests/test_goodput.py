"""Goodput from events: a table of hand-built runs and where their wall seconds went (no Ray, no torch)."""

from __future__ import annotations

import pytest

from orchestrator.core.goodput import LOST_CAUSES, GoodputLedger, goodput


def ev(time, attempt, type, **fields):
    return {"time": float(time), "attempt": attempt, "type": type, **fields}


UNINTERRUPTED = [
    ev(0, 1, "started"),
    ev(12, 1, "epoch_end", epoch=0, global_step=10),  # 10 steps at 1 s a step: the first step at 2
    ev(22, 1, "epoch_end", epoch=1, global_step=20),
    ev(23, 1, "finished"),
]

RESTART_REPLAYS = [
    ev(0, 1, "started"),
    ev(12, 1, "backup_committed", epoch=0, step=10, folder="backup/step-10"),
    ev(22, 1, "epoch_end", epoch=1, global_step=20),
    ev(25, 1, "worker_failed", rank=1, cause="died"),  # 3 s after the last progress: interrupted
    ev(26, 2, "restored", epoch=0, step=10, folder="backup/step-10"),  # 1 s between attempts
    ev(30, 2, "started"),  # 4 s of workers starting, then 4 s of restoring (first step at 34)
    ev(44, 2, "epoch_end", epoch=1, global_step=20),  # steps 10..20 again: replayed
    ev(54, 2, "epoch_end", epoch=2, global_step=30),
    ev(55, 2, "finished"),
]

ROLLBACK = [
    ev(0, 1, "started"),
    ev(12, 1, "backup_committed", epoch=0, step=10, folder="backup/step-10"),
    ev(17, 1, "nan_detected", epoch=1, step=4, global_step=15),
    ev(17.5, 1, "rolled_back", epoch=1, step=4, folder="backup/step-10", bad_step=15, target_step=10),
    ev(27.5, 1, "epoch_end", epoch=1, global_step=20),  # steps 10..15 again, then 15..20 new
    ev(28, 1, "finished"),
]

# a rolled_back of an older run names only its folder: the target step is read from it
ROLLBACK_FOLDER_ONLY = [{**e, **({"bad_step": None, "target_step": None} if e["type"] == "rolled_back" else {})}
                        for e in ROLLBACK]

PREEMPTED_RESUMED_NEXT_DAY = [
    ev(0, 1, "started"),
    ev(7, 1, "backup_committed", epoch=0, step=5, folder="backup/step-5"),
    ev(12, 1, "backup_committed", epoch=0, step=10, folder="backup/step-10"),
    ev(13, 1, "preempted", step=10),
    ev(1013, 2, "restored", epoch=0, step=10, folder="backup/step-10"),
    ev(1015, 2, "started"),
    ev(1027, 2, "epoch_end", epoch=1, global_step=20),
    ev(1027, 2, "finished"),
]

# two backups that stood training still for 0.5 s and 1.5 s: lost, out of the productive time
STALLED_BY_BACKUPS = [
    ev(0, 1, "started"),
    ev(12, 1, "backup_committed", epoch=0, step=10, folder="backup/step-10", stall_s=0.5),
    ev(22, 1, "backup_committed", epoch=1, step=20, folder="backup/step-20", stall_s=1.5),
    ev(23, 1, "finished"),
]

FAILS_BEFORE_TRAINING = [
    ev(0, 1, "started"),
    ev(5, 1, "worker_failed", rank=0, cause="ImportError"),
    ev(5, 1, "failed", error="ImportError"),
]

# an events.jsonl of an older version: epoch_end without a global step, no restore step known
OLD_FORMAT = [
    ev(0, 1, "started"),
    ev(10, 1, "epoch_end", epoch=0, step=None),
    ev(20, 1, "epoch_end", epoch=1, step=None),
    ev(21, 1, "finished"),
]


@pytest.mark.parametrize("events,wall,productive,lost,replayed_steps,attempts,rollbacks", [
    (UNINTERRUPTED, 23, 21, {"startup": 2}, 0, 1, 0),
    (RESTART_REPLAYS, 55, 31, {"startup": 6, "restore": 4, "replayed": 10, "interrupted": 3, "between_attempts": 1},
     10, 2, 0),
    (ROLLBACK, 28, 21, {"startup": 2, "replayed": 5}, 5, 1, 1),
    (ROLLBACK_FOLDER_ONLY, 28, 21, {"startup": 2, "replayed": 5}, 5, 1, 1),
    (PREEMPTED_RESUMED_NEXT_DAY, 1027, 20, {"startup": 2 + 2, "restore": 2, "interrupted": 1, "between_attempts": 1000},
     0, 2, 0),
    (STALLED_BY_BACKUPS, 23, 19, {"startup": 2, "backup_stalls": 2}, 0, 1, 0),
    (FAILS_BEFORE_TRAINING, 5, 0, {"startup": 5}, 0, 1, 0),
    (OLD_FORMAT, 21, 21, {}, 0, 1, 0),
], ids=["uninterrupted", "restart-replays-steps", "rollback", "rollback-folder-only", "preempted-resumed-next-day",
        "stalled-by-backups", "fails-before-training", "old-format-no-steps"])
def test_goodput_splits_the_wall_time_of_a_run_into_productive_and_lost_seconds_by_cause(
        events, wall, productive, lost, replayed_steps, attempts, rollbacks):
    b = goodput(events)
    assert b.wall_s == pytest.approx(wall)
    assert b.productive_s == pytest.approx(productive)
    assert dict(b.lost_s) == pytest.approx({cause: lost.get(cause, 0.0) for cause in LOST_CAUSES})
    assert b.productive_s + sum(b.lost_s.values()) == pytest.approx(events[-1]["time"] - events[0]["time"])
    assert b.goodput == pytest.approx(productive / wall)
    assert (b.replayed_steps, b.attempts, b.restarts, b.rollbacks) == (replayed_steps, attempts, attempts - 1, rollbacks)
    assert b.ended


def test_a_restored_event_that_knows_more_lost_steps_than_the_events_show_counts_those():
    events = [dict(e, lost_steps=13) if e["type"] == "restored" else e for e in RESTART_REPLAYS]
    assert goodput(events).replayed_steps == 13
    assert goodput(events).lost_s == goodput(RESTART_REPLAYS).lost_s  # the seconds come from what was measured


def test_the_step_time_is_measured_from_progress_points_and_places_the_first_step():
    b = goodput(RESTART_REPLAYS)
    assert b.step_s == pytest.approx(1.0)
    assert goodput(UNINTERRUPTED[:2] + UNINTERRUPTED[3:]).step_s is None  # one point: no step time
    assert goodput(UNINTERRUPTED[:2] + UNINTERRUPTED[3:]).lost_s["startup"] == 0  # so no start-up to estimate


def test_a_live_ledger_counts_up_to_now_and_the_time_since_a_failure_as_between_attempts():
    ledger = GoodputLedger()
    ledger.begin_attempt(1, 100.0)
    ledger.add({"time": 101.0, "type": "started"})
    ledger.add({"time": 103.0, "type": "train_begin", "global_step": 0})  # the first step's time, exactly
    ledger.add({"time": 108.0, "type": "progress", "epoch": 0, "step": 49, "global_step": 50})
    b = ledger.breakdown(now=110.0)
    assert (b.wall_s, b.productive_s, b.lost_s["startup"], b.ended) == (10.0, 7.0, 3.0, False)
    ledger.add({"time": 111.0, "type": "worker_failed", "rank": 0})
    b = ledger.breakdown(now=115.0)
    assert (b.wall_s, b.productive_s, b.lost_s["interrupted"], b.lost_s["between_attempts"]) == (15.0, 5.0, 3.0, 4.0)
    assert not b.ended  # a restart follows
    ledger.begin_attempt(2, 116.0)
    ledger.add({"time": 117.0, "type": "train_begin", "global_step": 30})  # back to a backup at step 30
    ledger.add({"time": 127.0, "type": "progress", "global_step": 70})  # 30..50 again, 50..70 new
    b = ledger.breakdown(now=127.0)
    assert b.lost_s["replayed"] == pytest.approx(5.0) and b.replayed_steps == 20
    assert b.lost_s["between_attempts"] == pytest.approx(5.0) and b.lost_s["startup"] == pytest.approx(4.0)


@pytest.mark.parametrize("junk", [
    {"type": "epoch_end"},  # no time
    {"time": "soon", "type": "started"},
    {"time": 1.0, "type": "from_a_newer_version"},
    {"time": 1.0, "type": ["started"]},
    {"time": True, "type": "started"},
])
def test_events_without_a_numeric_time_or_a_known_type_are_skipped(junk):
    assert goodput([junk]).attempts == 0 and goodput([junk]).goodput is None
    assert goodput(UNINTERRUPTED[:1] + [junk] + UNINTERRUPTED[1:]) == goodput(UNINTERRUPTED)


def test_times_that_go_backwards_count_as_the_newest_time_seen():
    events = UNINTERRUPTED[:2] + [ev(5, 1, "backup_committed", step=10)] + UNINTERRUPTED[2:]
    b = goodput(events)
    assert b.wall_s == pytest.approx(23) and b.productive_s + sum(b.lost_s.values()) == pytest.approx(23)


def test_the_breakdown_prints_a_summary_and_one_line_per_cause():
    lines = goodput(RESTART_REPLAYS).lines()
    assert lines[0] == ("goodput 56.4%: 31.0 s productive of 55.0 s wall (2 attempts, 1 restart, 0 rollbacks, "
                        "1 s a step)")
    assert [line.split()[2:] for line in lines[1:7]] == [
        ["start-up", "6.0", "s", "10.9%"], ["restore", "4.0", "s", "7.3%"],
        ["replayed", "steps", "10.0", "s", "18.2%", "(10", "steps)"], ["interrupted", "work", "3.0", "s", "5.5%"],
        ["between", "attempts", "1.0", "s", "1.8%"], ["backup", "stalls", "0.0", "s", "0.0%"]]
    assert len(lines) == 7
    assert goodput([]).lines()[0].startswith("goodput n/a: 0.0 s productive of 0.0 s wall (0 attempts")


def test_a_live_recovery_counts_only_the_step_in_flight_as_replayed():
    events = [
        ev(0, 1, "started"),
        ev(12, 1, "epoch_end", epoch=0, global_step=10),
        ev(22, 1, "epoch_end", epoch=1, global_step=20),
        ev(23, 1, "worker_failed", rank=1, cause="died"),
        ev(24, 2, "started"),
        ev(25, 2, "recovered", step=20, source="memory", rank=1, lost_steps=1),  # at its first step
        ev(35, 2, "epoch_end", epoch=2, global_step=30),
        ev(36, 2, "finished"),
    ]
    b = goodput(events)
    assert b.replayed_steps == 1 and b.restarts == 1
