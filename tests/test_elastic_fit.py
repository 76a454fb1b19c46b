"""Elastic world size with Ray: ``num_workers=(1, 2)`` loses a node with no replacement, goes on with one
worker and the same global batch from the survivor's memory (a live recovery), grows back when a node
is added; every sample once per epoch, and the result within float tolerance of the uninterrupted
two-worker run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

import background
import workloads_elastic
from orchestrator.storage.fs import StorageSpec
from orchestrator.storage.run_files import read_events

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 6

SCENARIO = background.Scenario("elastic", [sys.executable, str(ROOT / "tests" / "entries" / "elastic_cluster.py"),
                                           "{folder}", str(EPOCHS)])


class Runs(NamedTuple):
    reference: dict[str, Any]  # the uninterrupted two-worker run: "history" and "params"
    folder: Path  # the scenario's folder
    output: str  # its exit code and output's tail, for failure messages


@pytest.fixture(scope="module")
def runs() -> Runs:
    """The node-loss scenario and its references (a multi-node cluster of its own, in a subprocess
    started with the session: tests/background.py)."""
    returncode = SCENARIO.wait(timeout=540)  # started with the session unless collection did not start it
    output = f"exit code {returncode}\n" + SCENARIO.output()
    outcome_file = SCENARIO.folder / "outcome.json"
    assert outcome_file.exists(), output
    outcome = json.loads(outcome_file.read_text())
    assert outcome["ok"] and returncode == 0, outcome.get("error", "") + output
    return Runs(torch.load(SCENARIO.folder / "reference.pt", weights_only=True), SCENARIO.folder, output)


def test_a_lost_node_without_replacement_shrinks_to_one_worker_and_a_new_node_grows_it_back(runs):
    events = read_events(StorageSpec(str(runs.folder), "elastic").open())
    resized = [e for e in events if e["type"] == "resized"]
    assert [(e["from_workers"], e["to_workers"], e["reason"]) for e in resized] == \
        [(2, 1, "placement_timeout"), (1, 2, "capacity_returned")], runs.output
    assert [e["accumulate_grad_batches"] for e in resized] == [2, 1]  # the global batch stays 16
    started = [(e["attempt"], e["world_size"]) for e in events if e["type"] == "started"]
    assert started == [(1, 2), (2, 1), (3, 2)]
    assert [e["type"] for e in events].count("worker_failed") == 1  # the grow is not a failure
    assert events[-1]["type"] == "finished"


def test_the_shrink_resumes_from_the_survivors_memory_losing_at_most_one_step(runs):
    events = read_events(StorageSpec(str(runs.folder), "elastic").open())
    shrunk = [e for e in events if e["attempt"] == 2]
    started = next(e for e in shrunk if e["type"] == "started")
    assert started["resumed_from"] == "memory", runs.output  # never read from storage
    assert not any(e["type"] == "restored" for e in shrunk)
    recovered = [e for e in shrunk if e["type"] == "recovered"]  # the live recovery's timeline
    assert len(recovered) == 1 and recovered[0]["source"] == "memory", runs.output
    assert recovered[0]["lost_steps"] <= 1
    failed = next(e for e in events if e["type"] == "worker_failed")
    first = next(e for e in events if e["type"] == "started")
    removed = json.loads((runs.folder / "outcome.json").read_text())["record"]["removed"]
    # the rank lost with its node is blamed (not the survivor whose collective raised) and recovered
    assert first["node_ids"][failed["rank"]] == removed and recovered[0]["rank"] == failed["rank"]


def test_every_sample_is_trained_exactly_once_per_epoch_across_the_shrink_and_the_grow(runs):
    seen = workloads_elastic.seen_by_epoch(str(runs.folder / "seen"))
    assert sorted(seen) == list(range(EPOCHS))
    for epoch, indices in seen.items():
        assert sorted(indices) == list(range(workloads_elastic.SAMPLES)), epoch


def test_the_final_loss_is_within_float_tolerance_of_the_uninterrupted_two_worker_run(runs):
    result = torch.load(runs.folder / "result.pt", weights_only=True)
    for key in ("loss", "val_loss"):
        assert result["history"][key][-1] == pytest.approx(runs.reference["history"][key][-1], rel=1e-5), key
    assert result["params"].keys() == runs.reference["params"].keys()
    for name, param in runs.reference["params"].items():
        torch.testing.assert_close(result["params"][name], param, rtol=1e-4, atol=1e-6)


def test_an_elastic_run_that_loses_nothing_trains_exactly_like_the_fixed_size_run(runs):
    whole = torch.load(runs.folder / "whole.pt", weights_only=True)
    assert len(whole["history"]["loss"]) == 2
    for key, values in whole["history"].items():
        assert values == runs.reference["history"][key][:2], key
