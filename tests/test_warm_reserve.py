"""Warm standbys across fits: a driver's second fit with ``max_failures > 0`` starts no new process."""

from __future__ import annotations

import pytest

import workloads
from orchestrator import Trainer
from orchestrator.cluster.parking import parked_ids

pytestmark = pytest.mark.timeout(300)


def _fit(tmp_path, run_name: str) -> None:
    # the first step waits until the attempt, seeing every rank under way, has started its two standbys
    # (a standby is a TrainWorker): the fit cannot end before it, however long the driver takes to see it
    Trainer(model=workloads.tiny_model, optimizer=workloads.sgd, loss=workloads.cross_entropy,
            data=workloads.odd_data, train_step=workloads.step_waiting_for_workers(4), batch_size=32, num_workers=2, seed=0,
            storage=str(tmp_path), run_name=run_name, max_failures=1).fit(epochs=2, verbose=0)


def test_a_second_fit_with_warm_standbys_reuses_the_first_fits_workers_and_standbys_and_starts_no_process(
        ray_cluster, tmp_path):
    _fit(tmp_path, "first")
    first = parked_ids()[1]
    # kept: the two finished workers (the next fit's workers), the two standbys that were never used
    # (in reserve: the next fit's standbys), the coordinator and the spare coordinator that was never used
    assert len(first) == 2 * 2 + 2
    _fit(tmp_path, "second")
    assert parked_ids()[1] == first  # the same actors: the second fit created none
