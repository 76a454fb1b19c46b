"""One local Ray instance for the whole test session, and a check that tests leave nothing behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        pythonpath = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(
            address="local",  # always a fresh instance of our own, even if another cluster runs here
            num_cpus=4,
            include_dashboard=False,
            logging_level="WARNING",
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}},
        )
    yield ray
    ray.shutdown()


def _alive_actors(ray) -> list:
    from ray._private import state  # the GCS actor table; the state API would need the dashboard

    return [a["ActorClassName"] for a in state.actors().values() if a["State"] != "DEAD"]


def _live_placement_groups(ray) -> list:
    table = ray.util.placement_group_table()
    return [pg for pg in table.values() if pg["state"] not in ("REMOVED",)]


@pytest.fixture
def ray_cluster(ray_session):
    """The shared Ray instance; after the test no actor or placement group may be left (waits up to 30 s)."""
    yield ray_session
    deadline = time.monotonic() + 30
    while (_live_placement_groups(ray_session) or _alive_actors(ray_session)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _live_placement_groups(ray_session) == []
    assert _alive_actors(ray_session) == []
