"""Granted workers get their own start-up wait, not an elastic run's short placement timeout (no Ray)."""

from __future__ import annotations

import pytest

from orchestrator.cluster.worker_group import START_TIMEOUT_S, startup_timeout_s


@pytest.mark.parametrize("placement_timeout_s, want", [
    (10.0, START_TIMEOUT_S),  # an elastic run that gives up on a lost node soon: processes still get time to start
    (START_TIMEOUT_S, START_TIMEOUT_S),
    (600.0, 600.0),  # a long placement wait (a runtime_env that installs packages) keeps covering the start
])
def test_the_start_up_wait_is_the_placement_timeout_but_never_shorter_than_the_floor(placement_timeout_s, want):
    assert startup_timeout_s(placement_timeout_s) == want
