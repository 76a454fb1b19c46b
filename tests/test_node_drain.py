"""Ray node drains (preemptions with notice) on a multi-node cluster: emergency backup, no lost step, go on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import workloads
from orchestrator.storage.run_files import read_events
from orchestrator.storage.fs import StorageSpec

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 10


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """The same run, never disturbed, on the session's Ray."""
    return workloads.drainable_trainer(str(tmp_path_factory.mktemp("reference")), "reference").fit(
        epochs=EPOCHS, verbose=0)


def run_on_own_cluster(mode: str, tmp_path: Path) -> tuple[dict, list[dict]]:
    # A multi-node cluster of its own, in a subprocess: this session already owns a Ray instance.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "entries" / "drain_cluster.py"), mode,
                           str(tmp_path), "drained", str(EPOCHS)], env=env, capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    cluster = json.loads((tmp_path / "drained-cluster.json").read_text())
    return cluster, read_events(StorageSpec(str(tmp_path), "drained").open())


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


def assert_same_run(tmp_path: Path, reference) -> None:
    result = torch.load(tmp_path / "drained-result.pt", weights_only=True)
    assert result["history"] == reference.history
    for name, param in reference.model.state_dict().items():
        assert torch.equal(result["params"][name], param), name


def test_drained_nodes_stop_every_rank_with_a_backup_and_training_goes_on_elsewhere_bit_identical(
        reference, tmp_path):
    cluster, events = run_on_own_cluster("drain", tmp_path)
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
    run_json = json.loads((tmp_path / "drained" / "run.json").read_text())
    assert run_json["status"] == "finished" and run_json["attempts"] == 3
    assert_same_run(tmp_path, reference)


def test_sigterm_to_a_worker_nodes_ray_start_is_a_drain_and_training_goes_on_bit_identical(reference, tmp_path):
    # What a reclaimed spot VM or an evicted KubeRay worker pod does: SIGTERM to `ray start --block`.
    cluster, events = run_on_own_cluster("sigterm", tmp_path)
    spot = cluster["drained"][0]
    assert spot in cluster["workers_before"][0]
    assert [e["nodes"] for e in events if e["type"] == "node_draining"] == [[spot]]
    assert_no_step_lost_and_no_failure(events, drains=1)
    started = [e for e in events if e["type"] == "started"]
    assert len(started) == 2 and spot not in started[1]["node_ids"] and cluster["added"][0] in started[1]["node_ids"]
    assert_same_run(tmp_path, reference)
