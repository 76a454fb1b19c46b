"""N worker actors in one placement group, and their clean removal."""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.config import ScalingConfig
from orchestrator.errors import OrchestratorError
from orchestrator.worker import TrainWorker

logger = logging.getLogger(__name__)


class WorkerGroup:
    """Creates, runs and removes the worker actors.

    Args:
        scaling: Number of workers, GPUs, resources and placement strategy.
        placement_timeout_s: How long to wait for the cluster to grant the resources.
    """

    def __init__(self, scaling: ScalingConfig, placement_timeout_s: float = 120.0) -> None:
        self.scaling = scaling
        self.placement_timeout_s = placement_timeout_s
        self.pg: PlacementGroup | None = None
        self.workers: list[Any] = []

    def start(self) -> list[dict[str, Any]]:
        """Reserve the bundles (waiting up to ``placement_timeout_s``), start the actors; return each rank's node info."""
        res = self.scaling.worker_resources()
        n = self.scaling.num_workers
        self.pg = placement_group([dict(res) for _ in range(n)], strategy=self.scaling.placement_strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=self.placement_timeout_s)
        if not ready:
            raise OrchestratorError(
                f"the cluster did not grant {n} workers x {res} with strategy "
                f"{self.scaling.placement_strategy} within {self.placement_timeout_s:.0f}s; "
                f"available now: {ray.available_resources()}"
            )
        options: dict[str, Any] = {"num_cpus": res.get("CPU", 0), "num_gpus": res.get("GPU", 0)}
        custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
        if custom:
            options["resources"] = custom
        self.workers = [
            TrainWorker.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=rank),
                **options,
            ).remote(rank, n)
            for rank in range(n)
        ]
        return ray.get([w.info.remote() for w in self.workers])

    def check_capacity(self) -> None:
        """Raise ValueError when the whole cluster could never host the group (before any worker starts)."""
        res, n = self.scaling.worker_resources(), self.scaling.num_workers
        total = ray.cluster_resources()
        for key, amount in res.items():
            if amount * n > total.get(key, 0):
                raise ValueError(
                    f"num_workers={n} needs {amount * n:g} {key} in total but the Ray cluster has "
                    f"{total.get(key, 0):g}; lower num_workers or resources_per_worker, or add nodes"
                )

    def run(self, *args: Any) -> list[ray.ObjectRef]:
        master = ray.get(self.workers[0].free_port.remote())
        return [w.run.remote(args[0], args[1], master, *args[2:]) for w in self.workers]

    def shutdown(self) -> None:
        """Kill every actor and remove the placement group; never raises."""
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception as exc:  # already dead
                logger.debug("kill worker: %s", exc)
        self.workers = []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception as exc:
                logger.warning("could not remove placement group: %s", exc)
            self.pg = None


def draining_nodes() -> dict[str, int]:
    """Node id (hex) -> drain deadline (ms since the epoch; 0: none) of every node Ray is draining.

    A node is drained by ``ray drain-node`` (e.g. ``--reason DRAIN_NODE_REASON_PREEMPTION``), by an
    autoscaler, or by Ray itself when its ``ray start`` process gets SIGTERM (a reclaimed spot node
    or an evicted pod). Ray schedules nothing new there; what runs there keeps running until the
    node is idle or killed. Returns ``{}`` when the GCS cannot be asked (logged at debug level).
    """
    try:
        from ray._private import state

        return {str(node): int(deadline) for node, deadline in state.state.get_draining_nodes().items()}
    except Exception as exc:  # noqa: BLE001 - a private API: never let it break training
        logger.debug("could not list draining nodes: %s", exc)
        return {}
