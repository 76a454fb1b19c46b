"""`ray job submit` for real: a head node on 127.0.0.1, the CLI as the entrypoint, stop and resubmit.

The head, the submissions and the stop run in a subprocess of their own (tests/entries/ray_job_scenario.py),
started with the session (tests/background.py) so that its waiting overlaps the rest of the suite; the
head runs in its own temp dir with its own ports and is stopped however the scenario ends. The test
checks what the scenario wrote (``outcome.json``) and the run folder it left. With Ray's token
authentication on, `ray start` and the `ray job` client on the same machine share the token file
under ~/.ray, so no extra setup is needed here (see docs/deployment.md for remote clients).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import background
from orchestrator.storage.run_files import read_events
from orchestrator.storage.fs import StorageSpec

ROOT = Path(__file__).resolve().parent.parent
# The scenario's worst case: its budget (600 s for every stage), two log fetches (30 s each), the
# head's shutdown (15 s) and the sweep of its temp dir (5 s); so 720 s leaves a margin.
SCENARIO_TIMEOUT_S = 720
pytestmark = pytest.mark.timeout(SCENARIO_TIMEOUT_S + 120)  # + the SIGINT, then kill, of Scenario.stop
SCENARIO = background.Scenario("rayjob", [sys.executable, str(ROOT / "tests" / "entries" / "ray_job_scenario.py"),
                                          "{folder}"])


def test_a_submitted_cli_run_is_preempted_by_ray_job_stop_and_a_new_submission_resumes_and_finishes():
    returncode = SCENARIO.wait(timeout=SCENARIO_TIMEOUT_S)
    output = f"exit code {returncode}\n{SCENARIO.output()}"
    outcome_file = SCENARIO.folder / "outcome.json"
    assert outcome_file.exists(), output
    outcome = json.loads(outcome_file.read_text())
    first, second = outcome["first"], outcome["second"]
    assert outcome["head_ready"], f"{outcome['head_ready_output']}\n{outcome['head_failed_starts']}\n{output}"

    assert first["submit_rc"] == 0, f"{first['submit_output']}\n{output}"
    assert first["backup_committed"], f"{first['logs_tail']}\n{output}"
    assert first["stop_rc"] == 0, f"{first['stop_output']}\n{output}"
    assert first["status"] in ("STOPPED", "FAILED", "SUCCEEDED"), output
    events = read_events(StorageSpec(outcome["after_stop_storage"], outcome["run_name"]).open())  # as stopped
    assert any(e["type"] == "preempted" for e in events), [e["type"] for e in events]
    stopped_at = max(e["step"] for e in events if e["type"] == "backup_committed")

    assert second["submit_rc"] == 0, f"{second['submit_output']}\n{second['logs_tail']}\n{output}"
    assert second["status"] == "SUCCEEDED", f"{second['logs_tail']}\n{output}"
    assert outcome["completed"] and returncode == 0, output
    run = json.loads((Path(outcome["storage"]) / outcome["run_name"] / "run.json").read_text())
    assert run["status"] == "finished" and run["world_size"] == 2
    events = read_events(StorageSpec(outcome["storage"], outcome["run_name"]).open())
    assert [e for e in events if e["type"] == "restored"][-1]["step"] == stopped_at
    assert sorted(e["epoch"] for e in events if e["type"] == "epoch_end") == [0, 1, 2]  # each epoch once
    assert events[-1]["type"] == "finished"
    assert outcome["leftover_processes"] == [], output  # nothing of the head outlives the scenario
