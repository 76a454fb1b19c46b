"""WorkerGroup.retire_workers after an attempt that ended normally: what becomes the standbys, what stays
in reserve and what is killed (no Ray: the actors are stand-in values and the kills are recorded)."""

from __future__ import annotations

import pytest

from orchestrator.cluster import worker_group
from orchestrator.cluster.worker_group import WorkerGroup
from orchestrator.core.config import ScalingConfig


@pytest.fixture
def killed(monkeypatch):
    """The actors the group asks to kill, in order (instead of ray.kill: these are not actors)."""
    record: list = []
    monkeypatch.setattr(worker_group, "_kill", lambda actors: record.extend(actors))
    return record


def _group(workers, standbys, reserve) -> WorkerGroup:
    group = WorkerGroup(ScalingConfig(num_workers=2), warm_standbys=True)
    group.workers, group.standbys, group.reserve = list(workers), list(standbys), list(reserve)
    return group


def test_an_attempt_that_started_standbys_keeps_them_in_reserve_and_its_workers_become_the_standbys(killed):
    group = _group(["w0", "w1"], ["s0", "s1"], ["old0", "old1"])
    group.retire_workers()
    assert (group.workers, group.standbys, group.reserve) == ([], ["w0", "w1"], ["s0", "s1"])
    assert killed == ["old0", "old1"]


def test_an_attempt_that_ended_before_starting_standbys_leaves_the_reserve_as_it_was(killed):
    group = _group(["w0", "w1"], [], ["r0", "r1"])
    group.retire_workers()
    assert (group.workers, group.standbys, group.reserve) == ([], ["w0", "w1"], ["r0", "r1"])
    assert killed == []
