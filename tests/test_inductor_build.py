"""``compile=True`` with torch's default backend: inductor builds C++ kernels on CPU, the loop trains
through them, and the weights keep the plain module's keys.

Building the kernels takes a core for 15-35 s (gcc), so it runs as a background scenario
(tests/background.py) beside the rest of the suite, at the lowest CPU priority (it takes the CPU
the other tests leave idle); this test reads what it left. The loop with a compiled model, its
backups and resumes are tested in process with dynamo's eager backend (test_train_loop_compile.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import background
from test_train_loop_compile import _plain_keys

pytestmark = pytest.mark.timeout(660)
ROOT = Path(__file__).resolve().parent.parent

SCENARIO = background.Scenario("inductor", ["nice", "-n", "19", sys.executable,
                                            str(ROOT / "tests" / "entries" / "inductor_build.py"), "{folder}"],
                               beside_chain=True)


def test_compile_true_builds_inductor_kernels_on_cpu_and_keeps_the_plain_keys():
    returncode = SCENARIO.wait(timeout=600)
    assert SCENARIO.folder is not None
    outcome_file = SCENARIO.folder / "outcome.json"
    assert outcome_file.exists(), f"exit code {returncode}\n{SCENARIO.output()}"
    outcome = json.loads(outcome_file.read_text())
    if "skipped" in outcome:
        pytest.skip(outcome["skipped"])
    assert outcome["ok"], outcome.get("error")
    assert returncode == 0
    assert outcome["keys"] == _plain_keys() and outcome["finite"]
    assert outcome["kernels"] > 0, "inductor built no C++ kernel"
