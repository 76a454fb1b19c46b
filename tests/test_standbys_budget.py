"""Warm standbys only while a failure can still be restarted: the controller stops the group from
starting standbys once the failure budget is spent (the next failure ends the fit), driven one
state at a time against a fake group (no Ray)."""

from __future__ import annotations

import pytest

from test_controller import FakeGroup, ScriptedAttempts, finished, fit_spec, step_to_end, worker_failure

from orchestrator.control.controller import Controller
from orchestrator.control.failures import FailurePolicy
from orchestrator.control.states import Failed, Finished


class StandbyGroup(FakeGroup):
    """A fake group that starts with warm standbys on and records the setting at each attempt."""

    def __init__(self, log: list[str]) -> None:
        super().__init__(log)
        self.warm_standbys = True


@pytest.mark.parametrize("max_failures, failures, expected", [
    (1, 1, [True, False]),  # the one allowed restart runs without preparing standbys
    (2, 1, [True, True]),  # one more failure could still be restarted
    (2, 2, [True, True, False]),
    (3, 2, [True, True, True]),
])
def test_standbys_stay_on_while_another_failure_could_be_restarted(tmp_path, max_failures, failures, expected):
    log: list[str] = []
    group = StandbyGroup(log)
    seen: list[bool] = []

    def failing(attempt):
        seen.append(group.warm_standbys)
        raise worker_failure(attempt.number)

    def finishing(attempt):
        seen.append(group.warm_standbys)
        return finished()

    fit = fit_spec(tmp_path, max_failures)
    runner = ScriptedAttempts(log, *([failing] * failures), finishing)
    controller = Controller(fit, fit.storage.open(), group=group, run_attempt=runner)
    states = step_to_end(controller)
    assert isinstance(states[-1], Finished)
    assert seen == expected


def test_a_fit_past_its_budget_fails_as_before_with_standbys_off_for_its_last_attempt(tmp_path):
    log: list[str] = []
    group = StandbyGroup(log)
    fit = fit_spec(tmp_path, max_failures=1)
    runner = ScriptedAttempts(log, worker_failure(1), worker_failure(2))
    controller = Controller(fit, fit.storage.open(), group=group, run_attempt=runner)
    states = step_to_end(controller)
    assert isinstance(states[-1], Failed) and len(states[-1].failures) == 2
    assert group.warm_standbys is False


@pytest.mark.parametrize("max_failures, failures, left", [(1, 1, 0), (3, 1, 2), (3, 3, 0), (0, 0, 0)])
def test_a_restart_decision_says_how_many_restarts_are_left_after_it(max_failures, failures, left):
    decision = FailurePolicy(max_failures).decide([object()] * failures)
    assert decision.restarts_left == left
    assert decision.restart == (failures <= max_failures)
