"""A fit that starts its own local Ray (no Ray running, as README's first example) - what start-up keeps.

The local instance starts without Ray's dashboard and every worker imports torch and the loop as
its process starts; what users rely on stays: workers' output reaches the driver, training runs
to the end, Ray is stopped after and none of its worker processes outlives the fit, and its workers run at the normal CPU priority, as a torchrun
job's do, with one malloc arena. The script runs as a background scenario (tests/background.py): it mostly waits for its
own Ray to start, beside the rest of the suite.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import background

pytestmark = pytest.mark.timeout(400)
ROOT = Path(__file__).resolve().parent.parent

# RAY_ADDRESS=local: a Ray of its own even while another scenario's `ray start` cluster runs here; no
# MALLOC_ARENA_MAX of its own (the background scenarios' environment has local_ray's): the fit's Ray sets it
SCENARIO = background.Scenario("own-ray", ["env", "-u", "MALLOC_ARENA_MAX", "RAY_ADDRESS=local", sys.executable,
                                           str(ROOT / "tests" / "entries" / "own_ray_fit.py"), "{folder}"])


def test_a_fit_that_starts_its_own_ray_trains_brings_worker_output_to_the_driver_and_stops_ray():
    returncode = SCENARIO.wait(timeout=300)
    assert SCENARIO.folder is not None
    output = (SCENARIO.folder / "output.log").read_text()
    assert returncode == 0, output[-4000:]
    # one line per rank, through Ray's log monitor; the ranks run at the normal priority (Ray's default is 15)
    # and allocate from glibc's main arena (local_ray.ENVIRONMENT), though the script ran without the setting
    assert output.count("model built on a worker at niceness 0 with MALLOC_ARENA_MAX=1") >= 2, output[-4000:]
    assert "epochs run: 2; ray still initialised: False" in output, output[-4000:]
    # fit returns once its instance's processes are gone (local_ray.shutdown_ray kills one that hangs in its exit)
    assert "still running after fit: 0" in output and "worker processes noted: 0;" not in output, output[-4000:]
    assert (SCENARIO.folder / "own-ray" / "model.pt").exists()
