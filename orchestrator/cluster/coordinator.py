"""The coordinator: one Ray actor that turns every rank's reports into one set of decisions.

Each rank calls :meth:`Coordinator.sync` at the same sync point. The last rank to arrive
triggers the aggregation and the callbacks, exactly once (:class:`SyncBarrier`); every rank
gets the same decision list back. The logic lives in :class:`CoordinatorCore` (no Ray, no
torch). Progress and epoch events queue up for the driver, which polls :meth:`Coordinator.poll`.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from orchestrator.cluster.coordinator_core import CoordinatorCore, SyncBarrier
from orchestrator.cluster.specs import CoordinatorSpec
from orchestrator.decisions import Decision, Report
from orchestrator.storage.checkpoint import FileEntry


@ray.remote(num_cpus=0, max_restarts=0)
class Coordinator:
    """Ray actor around :class:`CoordinatorCore` with a per-sync-point barrier.

    Started bare (so that a spare can be started ahead of a restart), then given its run with
    :meth:`setup` before any rank talks to it.

    Example:
        >>> coordinator = Coordinator.remote()  # doctest: +SKIP
        >>> ray.get(coordinator.setup.remote(CoordinatorSpec(world_size=2)))  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.core: CoordinatorCore | None = None
        self.barrier: SyncBarrier | None = None
        self._beats: dict[int, float] = {}  # a rank is watched from its first sign of life on
        self._waiting: set[int] = set()

    def setup(self, spec: CoordinatorSpec) -> None:
        self.core = CoordinatorCore.from_spec(spec)
        self.barrier = SyncBarrier(spec.world_size, self.core.handle)

    def _core(self) -> CoordinatorCore:
        if self.core is None:
            raise RuntimeError("the coordinator was called before setup()")
        return self.core

    async def sync(self, rank: int, report: Report) -> list[Decision]:
        if self.barrier is None:
            raise RuntimeError("the coordinator was called before setup()")
        self._waiting.add(rank)  # a rank waiting here for the others is alive
        try:
            return await self.barrier.arrive(rank, report)
        finally:
            self._waiting.discard(rank)
            self._beats[rank] = time.monotonic()

    def heartbeat(self, rank: int) -> None:
        self._beats[rank] = time.monotonic()

    def node_id(self) -> str:
        """The Ray node this coordinator runs on (watched for drains like the workers' nodes)."""
        return ray.get_runtime_context().get_node_id()

    def progress(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        self._beats[0] = time.monotonic()
        self._core().progress(epoch, step, logs)

    def persisted(self, rank: int, folder: str, entries: list[FileEntry] | None, meta: dict[str, Any]) -> None:
        self._core().persisted(rank, folder, entries, meta)

    def poll(self) -> tuple[list[dict[str, Any]], dict[int, float]]:
        """New events, and each started rank's seconds since its last sign of life (0 while waiting at a sync)."""
        now = time.monotonic()
        ages = {rank: 0.0 if rank in self._waiting else now - beat for rank, beat in self._beats.items()}
        return self._core().drain(), ages

    def callback_states(self) -> list[dict[str, Any]]:
        return self._core().callbacks.state_dict()

    def error(self) -> tuple[BaseException | None, str]:
        core = self._core()
        error = core.error
        if error is not None:
            try:
                ray.cloudpickle.dumps(error)
            except Exception:
                error = None  # the traceback text still reaches the driver
        return error, core.error_traceback
