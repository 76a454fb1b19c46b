"""A Ray node drain (a preemption with notice) on a multi-node cluster: emergency backup, no lost step, go on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import workloads
from orchestrator.run_files import read_events
from orchestrator.storage import StorageSpec

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 10


def test_drained_nodes_stop_every_rank_with_a_backup_and_training_goes_on_elsewhere_bit_identical(
        ray_cluster, tmp_path):
    # The drained run needs its own multi-node cluster, and this session already owns a Ray instance.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "entries" / "drain_cluster.py"), str(tmp_path),
                           "drained", str(EPOCHS)], env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    cluster = json.loads((tmp_path / "drained-cluster.json").read_text())
    events = read_events(StorageSpec(str(tmp_path), "drained").open())
    kinds = [e["type"] for e in events]
    assert "worker_failed" not in kinds and "failed" not in kinds

    draining = [e for e in events if e["type"] == "node_draining"]
    assert [e["nodes"] for e in draining] == [[node] for node in cluster["drained"]]
    assert [e["attempt"] for e in draining] == [1, 2]

    # every rank stopped at one step, committed a backup there, and the next attempt resumed at it
    preempted = [e for e in events if e["type"] == "preempted"]
    restored = [e for e in events if e["type"] == "restored"]
    assert [e["reason"] for e in preempted] == ["node_drain", "node_drain"]
    assert [e["step"] for e in restored] == [e["step"] for e in preempted]
    committed = {(e["attempt"], e["step"]) for e in events if e["type"] == "backup_committed"}
    assert {(e["attempt"], e["step"]) for e in preempted} <= committed

    # the next attempts ran on the remaining nodes; the last one waited for the node added later
    started = [e for e in events if e["type"] == "started"]
    assert len(started) == 3
    assert cluster["drained"][0] not in started[1]["node_ids"]
    assert not set(cluster["drained"]) & set(started[2]["node_ids"])
    assert cluster["added"][0] in started[2]["node_ids"]
    run_json = json.loads((tmp_path / "drained" / "run.json").read_text())
    assert run_json["status"] == "finished" and run_json["attempts"] == 3

    reference = workloads.drainable_trainer(str(tmp_path), "reference").fit(epochs=EPOCHS, verbose=0)
    result = torch.load(tmp_path / "drained-result.pt", weights_only=True)
    assert result["history"] == reference.history
    for name, param in reference.model.state_dict().items():
        assert torch.equal(result["params"][name], param), name
