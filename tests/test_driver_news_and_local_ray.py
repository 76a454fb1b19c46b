"""What keeps the processes beside the training ranks cheap: the driver asks the coordinator for news
at most every ``news_every_s`` (a hang still seen within 5% of its timeout), and only the Ray
instance a fit starts for itself gets the settings of ``orchestrator.control.local_ray``.
"""

from __future__ import annotations

import os
import time

import pytest

from orchestrator.control.local_ray import ENVIRONMENT, SYSTEM_CONFIG, lean_environment, starts_local
from orchestrator.control.specs import FaultPolicy
from orchestrator.control.states import FitOutcome
from orchestrator.control.watch import Relay


def test_the_driver_asks_once_a_second_and_at_least_every_twentieth_of_the_hang_timeout():
    assert FaultPolicy().news_every_s == 1.0
    assert FaultPolicy(hang_timeout_s=5.0).news_every_s == 0.25
    assert FaultPolicy(news_interval_s=0.1).news_every_s == 0.1


def test_a_relay_sends_no_question_before_every_s_has_passed_since_the_last_one():
    relay = Relay(coordinator=None, driver=None, outcome=FitOutcome(), events=None, every_s=60.0)
    relay._sent = time.monotonic()  # a question went out just now and was answered
    assert relay.poll(0.0) is False  # nothing sent: a coordinator of None would have raised
    assert relay.unanswered_s == 0.0
    relay._sent = time.monotonic() - 61.0
    with pytest.raises(AttributeError):  # due: it asks the coordinator (None here) again
        relay.poll(0.0)


def test_collect_asks_at_once_whatever_every_s_says():
    relay = Relay(coordinator=None, driver=None, outcome=FitOutcome(), events=None, every_s=60.0)
    relay._sent = time.monotonic()
    with pytest.raises(AttributeError):  # it asks the coordinator (None here) without waiting
        relay.collect(timeout_s=0.1)


@pytest.mark.parametrize("address,local", [("local", True), ("127.0.0.1:6379", False), ("ray://head:10001", False)])
def test_only_a_fit_that_starts_its_own_ray_tunes_it(monkeypatch, address, local):
    monkeypatch.setenv("RAY_ADDRESS", address)
    assert starts_local() is local


def test_every_local_setting_is_a_ray_name_with_a_value_of_the_kind_ray_reads():
    assert all(isinstance(v, (int, bool)) for v in SYSTEM_CONFIG.values())
    assert all(k.startswith("RAY_") and isinstance(v, str) for k, v in ENVIRONMENT.items() if k != "MALLOC_ARENA_MAX")
    assert ENVIRONMENT["MALLOC_ARENA_MAX"] == "1"  # glibc's: every thread of a rank allocates from the main arena


def test_the_local_environment_keeps_a_value_the_user_set_and_removes_only_what_it_added(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.delenv("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", raising=False)
    with lean_environment():
        assert os.environ["MALLOC_ARENA_MAX"] == "4"
        assert os.environ["RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"] == ENVIRONMENT["RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"]
    assert os.environ["MALLOC_ARENA_MAX"] == "4"
    assert "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD" not in os.environ
