"""Checks that every rank's report of one sync point agrees (no Ray, no torch).

Example:
    >>> from orchestrator.decisions import Report, ReportKind
    >>> same_lr({0: Report(ReportKind.EPOCH_BEGIN, learning_rate=0.1), 1: Report(ReportKind.EPOCH_BEGIN, learning_rate=0.1)})
    0.1
"""

from __future__ import annotations

from typing import Mapping

from orchestrator.decisions import Report
from orchestrator.errors import OrchestratorError

__all__ = ["same_data", "same_lr"]


def same_lr(reports: Mapping[int, Report]) -> float:
    """The learning rate every rank reports.

    Raises:
        RuntimeError: The ranks disagree (naming each rank's rate).
    """
    rates = {r.learning_rate for r in reports.values()}
    if len(rates) > 1:
        by_rank = {rank: reports[rank].learning_rate for rank in sorted(reports)}
        raise RuntimeError(f"ranks disagree on the learning rate: {by_rank}; every rank must apply the "
                           "same SetLearningRate decisions (does an LR scheduler run on some ranks only?)")
    return rates.pop()


def same_data(reports: Mapping[int, Report]) -> None:
    """Every rank must shard the same training set: same length, same steps per epoch.

    Raises:
        OrchestratorError: The ranks disagree (naming each rank's samples and steps).
    """
    samples = {rank: (r.layout or {}).get("samples") for rank, r in sorted(reports.items())}
    steps = {rank: r.steps_per_epoch for rank, r in sorted(reports.items())}
    if len(set(steps.values())) > 1 or len(set(samples.values())) > 1:
        per_rank = ", ".join(f"rank {rank}: {samples[rank]} samples, {steps[rank]} steps per epoch"
                             for rank in steps)
        raise OrchestratorError(
            f"ranks disagree on the training data ({per_rank}); data() must return the same training set "
            "on every rank (each rank trains on its own shard of it), e.g. load it from the same files")
