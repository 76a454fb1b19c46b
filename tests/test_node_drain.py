"""Ray node drains (preemptions with notice) on a multi-node cluster: emergency backup, no lost step, go on."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import background
from orchestrator.storage.run_files import read_events
from orchestrator.storage.fs import StorageSpec

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 10


class Runs(NamedTuple):
    folder: Path  # one sub-folder per scenario
    returncode: int  # of the subprocess
    output: str  # its output's tail, for failure messages


# sigterm first: it needs the workers on the spot node, so no other usable node but one; then the
# reference (the same run, never disturbed) on the same cluster, in the background too
SCENARIO = background.Scenario("drain", [sys.executable, str(ROOT / "tests" / "entries" / "drain_cluster.py"),
                                         "sigterm,drain,reference", "{folder}", "drained", str(EPOCHS)])


@pytest.fixture(scope="module")
def runs() -> Runs:
    """Both scenarios and their reference, one after the other on one multi-node cluster of their own.

    The cluster lives in a subprocess (this session already owns a Ray instance), started with the
    session (tests/background.py).
    """
    returncode = SCENARIO.wait(timeout=540)  # started with the session unless collection did not start it
    return Runs(SCENARIO.folder, returncode, f"exit code {returncode}\n" + SCENARIO.output())


def run_on_own_cluster(runs: Runs, mode: str) -> tuple[Path, dict, list[dict]]:
    """The scenario's folder, its cluster record and its run's events; fails with its error if it failed."""
    folder = runs.folder / mode
    outcome_file = folder / "drained-outcome.json"
    assert outcome_file.exists(), runs.output
    outcome = json.loads(outcome_file.read_text())
    assert outcome["ok"], outcome["error"] + json.dumps(outcome["record"]) + "\n" + runs.output
    outcomes = [json.loads(f.read_text()) for f in runs.folder.glob("*/drained-outcome.json")]
    assert runs.returncode == (0 if all(o["ok"] for o in outcomes) else 1), runs.output  # a clean shutdown too
    cluster = json.loads((folder / "drained-cluster.json").read_text())
    return folder, cluster, read_events(StorageSpec(str(folder), "drained").open())


def assert_no_step_lost_and_no_failure(events: list[dict], drains: int) -> None:
    kinds = [e["type"] for e in events]
    assert "worker_failed" not in kinds and "failed" not in kinds
    preempted = [e for e in events if e["type"] == "preempted"]
    restored = [e for e in events if e["type"] == "restored"]
    assert [e["reason"] for e in preempted] == ["node_drain"] * drains
    assert [e["step"] for e in restored] == [e["step"] for e in preempted]  # resumed where every rank stopped
    committed = {(e["attempt"], e["step"]) for e in events if e["type"] == "backup_committed"}
    assert {(e["attempt"], e["step"]) for e in preempted} <= committed
    assert kinds[-1] == "finished"


def assert_same_run(folder: Path, runs: Runs) -> None:
    """The scenario's run in ``folder`` ended bit-identical to the undisturbed reference run."""
    run_on_own_cluster(runs, "reference")  # it succeeded
    result = torch.load(folder / "drained-result.pt", weights_only=True)
    reference = torch.load(runs.folder / "reference" / "drained-result.pt", weights_only=True)
    assert result["history"] == reference["history"]
    assert result["params"].keys() == reference["params"].keys()
    for name, param in reference["params"].items():
        assert torch.equal(result["params"][name], param), name


def test_drained_nodes_stop_every_rank_with_a_backup_and_training_goes_on_elsewhere_bit_identical(runs):
    folder, cluster, events = run_on_own_cluster(runs, "drain")
    draining = [e for e in events if e["type"] == "node_draining"]
    assert [e["nodes"] for e in draining] == [[node] for node in cluster["drained"]]
    assert [e["attempt"] for e in draining] == [1, 2]
    assert_no_step_lost_and_no_failure(events, drains=2)
    # the second attempt ran on the spare node at once; the third waited for the node added later
    started = [e for e in events if e["type"] == "started"]
    assert len(started) == 3
    assert cluster["drained"][0] not in started[1]["node_ids"]
    assert not set(cluster["drained"]) & set(started[2]["node_ids"])
    assert cluster["added"][0] in started[2]["node_ids"]
    run_json = json.loads((folder / "drained" / "run.json").read_text())
    assert run_json["status"] == "finished" and run_json["attempts"] == 3
    assert_same_run(folder, runs)


def test_sigterm_to_a_worker_nodes_ray_start_is_a_drain_and_training_goes_on_bit_identical(runs):
    # What a reclaimed spot VM or an evicted KubeRay worker pod does: SIGTERM to `ray start --block`.
    folder, cluster, events = run_on_own_cluster(runs, "sigterm")
    spot = cluster["drained"][0]
    assert spot in cluster["workers_before"][0]
    assert [e["nodes"] for e in events if e["type"] == "node_draining"] == [[spot]]
    assert_no_step_lost_and_no_failure(events, drains=1)
    started = [e for e in events if e["type"] == "started"]
    assert len(started) == 2 and spot not in started[1]["node_ids"] and cluster["added"][0] in started[1]["node_ids"]
    assert_same_run(folder, runs)
