"""One local Ray instance for the whole test session, and a check that tests leave nothing behind."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

import background

TESTS_DIR = Path(__file__).resolve().parent
_SCENARIOS: list[background.Scenario] = []
_STOPPING = threading.Event()


def pytest_collection_modifyitems(session, config, items):
    """The tests that start no Ray worker run first, the tests on the session's Ray next, and the modules
    that read a background scenario last (each group in collection order).

    The background scenarios (started at the end of collection, one after another) use about one
    core for their first five minutes; the tests without Ray use about one core too, while a fault
    test's workers, coordinator and driver keep both busy. So the scenarios run beside the tests that
    leave them a core, the fault tests mostly after them, and by the time the scenario modules' tests
    read what their scenarios left, those have had the whole suite's time to finish.
    """
    def group(item) -> int:
        if isinstance(getattr(getattr(item, "module", None), "SCENARIO", None), background.Scenario):
            return 2
        return 1 if "ray_session" in getattr(item, "fixturenames", ()) else 0

    items.sort(key=group)


def pytest_collection_finish(session):
    """Start the background scenarios of the collected modules, one after another, in test order, and the
    fork server of the rank processes if a collected module uses it (tests/rank_processes.py)."""
    if session.config.option.collectonly:
        return
    _SCENARIOS[:] = background.collected_scenarios(session.items)
    background.run_in_turn(list(_SCENARIOS), _STOPPING)
    # a collected module starts rank processes: their server starts now
    if "rank_processes" in sys.modules:
        sys.modules["rank_processes"].prestart()


def pytest_sessionfinish(session, exitstatus):
    _STOPPING.set()
    for scenario in _SCENARIOS:  # shut down if not waited for (an early stop), and cleaned up
        scenario.remove()


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        from orchestrator.control import local_ray

        # The workers' environment comes from the raylet's, set here for its start only: a job runtime_env
        # would leave the idle workers Ray starts with the node unused (they run the default environment)
        # and start others, a few seconds of CPU each. The instance runs with the settings of the one
        # ``fit`` starts for itself (local_ray.py: less background CPU, nothing a test reads switched off).
        pythonpath = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
        # both restored once ray.init has started the raylet
        with pytest.MonkeyPatch.context() as env, local_ray.lean_environment():
            env.setenv("PYTHONPATH", pythonpath)
            env.setenv("OMP_NUM_THREADS", "1")
            ray.init(
                address="local",  # always a fresh instance of our own, even if another cluster runs here
                num_cpus=4,
                include_dashboard=False,
                logging_level="WARNING",
                _system_config=dict(local_ray.SYSTEM_CONFIG),
            )
    yield ray
    ray.shutdown()


def _alive_actors(ray) -> list:
    """Alive actors but the idle workers a finished fit parked for the next one (WorkerGroup.park)."""
    from ray._private import state  # the GCS actor table; the state API would need the dashboard

    from orchestrator.cluster.parking import parked_ids

    kept = parked_ids()[1]
    return [a["ActorClassName"] for actor_id, a in state.actors().items()
            if a["State"] != "DEAD" and actor_id not in kept]


def _live_placement_groups(ray) -> list:
    """Live placement groups but the one a finished fit parked for the next one."""
    from orchestrator.cluster.parking import parked_ids

    kept = parked_ids()[0]
    table = ray.util.placement_group_table()
    return [pg for pg_id, pg in table.items() if pg["state"] not in ("REMOVED",) and pg_id not in kept]


@pytest.fixture
def ray_cluster(ray_session):
    """The shared Ray instance; after the test no actor or placement group may be left (waits up to 30 s),
    but the group a finished fit parked for the next fit (its workers, idle, and their placement group)."""
    yield ray_session
    deadline = time.monotonic() + 30
    while (_live_placement_groups(ray_session) or _alive_actors(ray_session)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _live_placement_groups(ray_session) == []
    assert _alive_actors(ray_session) == []


@pytest.fixture(scope="session")
def restarted_runs(ray_session, tmp_path_factory):
    """An uninterrupted run and the same run restarted from a backup after a worker failure, fitted
    once for every test that reads them (tests/restarted_run.py)."""
    import ray_metrics
    import restarted_run

    runs = restarted_run.fit_both(tmp_path_factory.mktemp("restarted-runs"))
    runs.export = ray_metrics.ExportWatch.start(ray_session, "faulty")  # read by test_metrics_export.py
    return runs


@pytest.fixture
def group(tmp_path):
    """A one-rank gloo process group in this process (its store a file of the test's own: no port to race for)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group-store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
