"""A fit of another shape than the parked group's takes over that group's idle coordinators (they hold
no resources and serve any world size) when it reuses workers; the workers and the placement group are
released. Driven through ``WorkerGroup.for_fit`` with the parking slot replaced (no Ray)."""

from __future__ import annotations

import pytest

from orchestrator.cluster import worker_group
from orchestrator.cluster.worker_group import WorkerGroup
from orchestrator.core.config import ScalingConfig


class Actor:
    """Stands in for an actor handle."""

    def __init__(self, name: str) -> None:
        self.name = name


@pytest.fixture
def killed(monkeypatch):
    """The actors the groups kill, in order (instead of ``ray.kill``)."""
    names: list[str] = []
    monkeypatch.setattr(worker_group, "_kill", lambda actors: names.extend(a.name for a in actors))
    return names


@pytest.fixture
def parked(monkeypatch, killed):
    group = WorkerGroup(ScalingConfig(num_workers=2))
    group.standbys = [Actor("w0"), Actor("w1")]
    group.spare_coordinators = [Actor("coordinator"), Actor("spare")]
    monkeypatch.setattr(worker_group, "take_parked", lambda: group)
    return group


def test_a_fit_of_another_shape_takes_the_parked_groups_idle_coordinators_and_releases_the_rest(parked, killed):
    coordinators = list(parked.spare_coordinators)
    group = WorkerGroup.for_fit(ScalingConfig(num_workers=1))
    assert group is not parked and group.scaling.num_workers == 1
    assert group.spare_coordinators == coordinators  # in order: the kept one first, then the spare
    assert killed == ["w0", "w1"]  # the workers only
    assert parked.spare_coordinators == [] and parked.standbys == [] and parked.pg is None  # released
    assert group.workers == [] and group.standbys == []


def test_a_fit_that_does_not_reuse_workers_gets_no_coordinator_of_an_earlier_fit(parked, killed):
    group = WorkerGroup.for_fit(ScalingConfig(num_workers=1, reuse_workers=False))
    assert group.spare_coordinators == []
    assert killed == ["w0", "w1", "coordinator", "spare"]  # released with the group


def test_a_fit_of_the_same_shape_takes_the_whole_parked_group(parked, killed):
    coordinators = list(parked.spare_coordinators)
    group = WorkerGroup.for_fit(ScalingConfig(num_workers=2), warm_standbys=True)
    assert group is parked and group.spare_coordinators == coordinators and len(group.standbys) == 2
    assert killed == []
