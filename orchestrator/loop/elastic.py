"""A rank's own state when the world size changes (an elastic run): torch only, no Ray.

With ``num_workers=(min, max)`` an attempt may run on another number of ranks than the one whose
state it resumes (a backup, or the survivors of a lost rank). The shared components (model,
optimizer, ...) are the same on every rank; of a rank's own components:

- ``position`` and ``result`` are the same on every rank (steps are global, and the global batch
  stays the same, so a step means the same samples on any world size: see
  :class:`~orchestrator.loop.data.ShardSampler`);
- ``rng`` is derived from ``(seed, rank, step)`` at every step boundary (:mod:`orchestrator.loop.live`);
- ``metric_sums`` holds each rank's exact sums of the epoch so far: the old ranks' sums are added
  up on new rank 0 and the other new ranks start empty, so the epoch's logged means are those of
  every sample trained, as if the world size had never changed.

Example:
    >>> import torch
    >>> old = [{"position": {"epoch": 0}, "metric_sums": {"train": {"names": ["loss"], "count": 2,
    ...         "totals": torch.tensor([4.0], dtype=torch.float64)}, "seen": [4.0, 2.0]}}] * 2
    >>> merged_own(old, rank=0)["metric_sums"]["train"]["count"]
    4
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch

#: The own components every rank holds alike (taken from the first old rank).
SAME_ON_EVERY_RANK = ("position", "result")


def summed_train(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The sum of several :class:`~orchestrator.loop.rank_state.Accumulator` states (empty ones skipped).

    Raises:
        ValueError: Two non-empty sums name different metrics.
    """
    names: list[str] = []
    totals: torch.Tensor | None = None
    count = 0
    for state in states:
        if state.get("totals") is None:
            continue
        if totals is None:
            names, totals = list(state["names"]), state["totals"].detach().to("cpu", torch.float64).clone()
        elif list(state["names"]) != names:
            raise ValueError(f"metric sums of different metrics cannot be added: {names} and {list(state['names'])}")
        else:
            totals += state["totals"].detach().to("cpu", torch.float64)
        count += int(state["count"])
    return {"names": names, "totals": totals, "count": count}


def merged_own(old: Sequence[Mapping[str, Any]], rank: int) -> dict[str, Any]:
    """New ``rank``'s own state from the own states of the old ranks that are known (at least one).

    Args:
        old: The old ranks' own states (a backup's rank files, or the survivors' payloads), any order.
        rank: The new rank.

    Returns:
        ``position`` and ``result`` of the first old state, ``metric_sums`` with every old rank's
        training sums on rank 0 (empty elsewhere) and the cluster-wide running loss, no ``rng``.
    """
    if not old:
        raise ValueError("no old rank's state to rebuild a rank's state from")
    first = old[0]
    own = {name: copy.deepcopy(first[name]) for name in SAME_ON_EVERY_RANK if name in first}
    sums = [o["metric_sums"] for o in old if "metric_sums" in o]
    if sums:
        train = summed_train([s["train"] for s in sums]) if rank == 0 else {"names": [], "totals": None, "count": 0}
        own["metric_sums"] = {"train": train, "seen": list(sums[0]["seen"])}
    return own
