"""What the background scenarios (tests/entries/*.py, run by tests/background.py) share: progress
lines, bounded waits and a tolerant reader of a run's events.jsonl."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

#: A test cluster's head: it hosts no work, and nothing reads its dashboard.
HEAD_ARGS: dict = {"num_cpus": 0, "object_store_memory": 80 * 2**20, "include_dashboard": False}

#: When the scenario's process imported this module: progress lines count seconds from here.
START = time.monotonic()


def log(message: str) -> None:
    """A timestamped progress line on stdout (the test shows it when a scenario fails)."""
    print(f"[{time.monotonic() - START:6.1f}s] {message}", flush=True)


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.1 s until it is true; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def events(file: Path) -> list[dict]:
    """The events of an events.jsonl being written: a missing file or a torn last line reads as what is there."""
    out = []
    if file.exists():
        for line in file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def start_cluster(**system_config: object):
    """A ``ray.cluster_utils.Cluster``, its head only (:data:`HEAD_ARGS`), with the ``_system_config`` of the
    instance ``fit`` starts for itself (orchestrator/control/local_ray.py: less background CPU) and
    ``system_config``."""
    from ray.cluster_utils import Cluster

    from orchestrator.control.local_ray import SYSTEM_CONFIG

    return Cluster(initialize_head=True,
                   head_node_args={**HEAD_ARGS, "_system_config": {**SYSTEM_CONFIG, **system_config}})


def save_result(history, path: Path, **extra: object) -> None:
    """A fit's History and final parameters in ``path`` (``torch.load(path, weights_only=True)`` reads them)."""
    import torch

    torch.save({"params": {k: v.detach() for k, v in history.model.state_dict().items()},
                "history": history.history, **extra}, path)
