"""A fit that starts its own local Ray (no Ray running, as README's first example) - what start-up keeps.

The local instance starts without Ray's dashboard and every worker imports torch and the loop as
its process starts; what users rely on stays: workers' output reaches the driver, training runs
to the end, Ray is stopped after.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_fit_that_starts_its_own_ray_trains_brings_worker_output_to_the_driver_and_stops_ray(tmp_path):
    env = dict(os.environ, RAY_ADDRESS="local", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "entries" / "own_ray_fit.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert output.count("model built on a worker") >= 2, output[-4000:]  # one line per rank, through Ray's log monitor
    assert "epochs run: 2; ray still initialised: False" in done.stdout, output[-4000:]
    assert (tmp_path / "own-ray" / "model.pt").exists()
