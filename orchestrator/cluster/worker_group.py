"""N worker actors in one placement group, and their clean removal."""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.core.config import ScalingConfig
from orchestrator.cluster.coordinator import CoordinatorActor
from orchestrator.cluster.parking import park_group, take_parked
from orchestrator.cluster.specs import CoordinatorSpec
from orchestrator.errors import ActorTimeoutError, OrchestratorError
from orchestrator.cluster.worker import TrainWorker
from orchestrator.loop.specs import TrainSpec

logger = logging.getLogger(__name__)

#: The driver's timeout for a call an actor answers at once (a port, its node, its state).
CALL_TIMEOUT_S = 60.0

#: The least time a new actor (a worker, the coordinator) gets to start its process once its resources
#: are granted: :func:`startup_timeout_s`.
START_TIMEOUT_S = 120.0

#: How long a group parked after a fit waits for the next fit of the same shape before it is released.
PARK_IDLE_S = 60.0


def get_within(refs: Any, timeout_s: float, what: str) -> Any:
    """``ray.get(refs)``, but at most ``timeout_s``: the driver never waits on an actor forever.

    Raises:
        ActorTimeoutError: No answer in time; the message says what did not answer.
        ray.exceptions.RayActorError: The actor died (the caller knows whom to blame).

    Example:
        infos = get_within([w.info.remote() for w in workers], 60, "the new workers")
    """
    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ActorTimeoutError(f"{what} did not answer within {timeout_s:g}s") from None


def startup_timeout_s(placement_timeout_s: float) -> float:
    """How long granted actors may take to start their processes: ``placement_timeout_s``, but at least
    :data:`START_TIMEOUT_S`.

    The two waits are different: placement waits for capacity, and an elastic run sets a short
    ``placement_timeout_s`` to go on with fewer workers soon when a node is lost; a process start
    (a Ray worker, a ``runtime_env``, importing torch) takes what it takes on a busy node, and
    failing it fails the attempt (on a loaded machine a 10 s start-up wait failed whole runs).
    Kept as long as ``placement_timeout_s`` when that is longer: a ``runtime_env`` that installs
    packages may need minutes, which that timeout covered before.

    Example:
        >>> startup_timeout_s(10.0), startup_timeout_s(600.0)
        (120.0, 600.0)
    """
    return max(float(placement_timeout_s), START_TIMEOUT_S)


class WorkerGroup:
    """Creates, runs and removes the worker actors, across the attempts of one ``fit``.

    With ``warm_standbys`` (CPU groups), once an attempt's workers are under way (so as not to slow
    their start) :meth:`prepare_standbys` starts a spare coordinator and one idle actor per rank inside the same placement-group bundle, with no resources of
    its own (the bundle's resources are the group's already), which imports torch and the loop.
    After a failure, :meth:`stop_workers` kills the workers but keeps the placement group, and the
    next :meth:`start` promotes the standbys instead of cold-starting processes. Anything that
    makes that unsafe (a lost standby, a bundle being rescheduled) falls back to a fresh start.

    One owner (the controller) creates it once per ``fit`` (:meth:`for_fit`) and alone calls
    :meth:`shutdown` or :meth:`park`; each attempt starts and stops its workers, and
    :meth:`release` gives the placement back when it must be placed anew (nodes being drained).

    **Across fits** (CPU groups, ``reuse_workers``): a fit that finished :meth:`park` s its group —
    the placement group and the idle workers, torch and the loop already imported — and the next
    fit of the same shape in this driver takes it over (:meth:`for_fit`) instead of starting
    processes and importing torch again (about 4 s a fit on 2 cores). A fit that failed on a worker
    parks the ranks that survived it (:attr:`parks`: orchestrator/cluster/survivors.py); the next fit
    starts a new process for the failed rank only. A parked group holds its
    placement group's resources for at most :data:`PARK_IDLE_S` seconds, and is released at once
    when a fit of another shape needs the cluster. The workers run user code of the earlier fit:
    a module edited between two fits in one driver needs ``reuse_workers=False`` (or a new driver).

    **Elastic** (``num_workers=(min, max)``): :attr:`world_size` is the number of workers the next
    :meth:`start` asks for (``max`` at first). When the cluster does not grant them within
    ``placement_timeout_s`` (a lost node that is not replaced), :meth:`start` goes on with the largest
    of :meth:`~orchestrator.core.config.ScalingConfig.world_sizes` that it can place (at least
    ``min``); :meth:`can_grow` says, cheaply, when more would fit again.

    Args:
        scaling: Number of workers, GPUs, resources and placement strategy.
        placement_timeout_s: How long to wait for the cluster to grant the resources.
        warm_standbys: Keep warm standbys (ignored for GPU groups). Defaults to ``False``.

    Example:
        group = WorkerGroup(ScalingConfig(num_workers=2), placement_timeout_s=60)
        group.check_capacity()
        try:
            infos = group.start()
            coordinator, ready = group.coordinator(coordinator_spec)
            results = ray.get(group.run(train_spec, coordinator))
            group.stop_workers()
        finally:
            group.shutdown()
    """

    def __init__(self, scaling: ScalingConfig, placement_timeout_s: float = 120.0,
                 warm_standbys: bool = False) -> None:
        self.scaling = scaling
        self.placement_timeout_s = placement_timeout_s
        self.warm_standbys = warm_standbys and not scaling.use_gpu
        self.pg: PlacementGroup | None = None
        self.workers: list[Any] = []
        self.standbys: list[Any] = []
        self.reserve: list[Any] = []  # warm standbys never used, kept for the next attempt's (see retire_workers)
        self.spare_coordinators: list[Any] = []  # idle coordinators: the next attempt's first, then its spare
        self.promoted = False  # whether the running workers are promoted standbys (every rank)
        self.warm_ranks: list[int] = []  # the ranks running on a process of an earlier attempt or fit
        self.closed = False
        self.storage_checked = False  # whether this fit checked its storage is visible from the workers' nodes
        self.world_size = scaling.num_workers  # the workers the next start asks for (elastic: may be fewer)
        self.parks = False  # whether the fit's end parks this group for the next fit (set by its controller)

    @classmethod
    def for_fit(cls, scaling: ScalingConfig, placement_timeout_s: float = 120.0,
                warm_standbys: bool = False) -> "WorkerGroup":
        """The group the previous fit of this driver parked, when it has this shape (and
        ``scaling.reuse_workers``); else a new group, after the parked one gave its resources back
        (its idle coordinators, which hold no resources and fit any shape, go to the new group)."""
        parked = take_parked()
        if parked is not None:
            if parked.scaling == scaling and scaling.reuse_workers:
                parked.placement_timeout_s = placement_timeout_s
                parked.warm_standbys = warm_standbys and not scaling.use_gpu
                parked.closed, parked.storage_checked = False, False
                parked.world_size = scaling.num_workers
                return parked
            coordinators: list[Any] = []
            if scaling.reuse_workers:
                coordinators, parked.spare_coordinators = parked.spare_coordinators, []
            parked.release()  # another shape: give its resources back before placing this one
            group = cls(scaling, placement_timeout_s, warm_standbys)
            group.spare_coordinators = coordinators
            return group
        return cls(scaling, placement_timeout_s, warm_standbys)

    def start(self) -> list[dict[str, Any]]:
        """Start the workers (standbys promoted when ready, else fresh); return each rank's node info.

        Raises:
            OrchestratorError: The group was shut down, or the cluster did not grant the resources in time.
        """
        if self.closed:
            raise OrchestratorError("this worker group was shut down; a new fit creates a new one")
        infos = self._promote_standbys()
        if infos is not None:
            return infos
        self.release()
        n = self._place()
        self.warm_ranks = []
        self.workers = [self._actor(rank, self._worker_options(), warm=False) for rank in range(n)]
        return get_within([w.info.remote() for w in self.workers], startup_timeout_s(self.placement_timeout_s),
                          f"the {n} new workers (starting their processes)")

    def _worker_options(self) -> dict[str, Any]:
        """A worker's actor options: its share of its bundle's resources."""
        res = self.scaling.worker_resources()
        options: dict[str, Any] = {"num_cpus": res.get("CPU", 0), "num_gpus": res.get("GPU", 0)}
        custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
        if custom:
            options["resources"] = custom
        return options

    def _place(self) -> int:
        """Create the placement group of :attr:`world_size` workers (elastic: of fewer when those are not
        granted in time) and return its number of workers.

        Raises:
            OrchestratorError: Not even the fewest allowed workers were granted in time.
        """
        res, strategy = self.scaling.worker_resources(), self.scaling.placement_strategy
        sizes = [w for w in self.scaling.world_sizes() if w <= self.world_size] if self.scaling.elastic \
            else [self.world_size]
        tried: list[int] = []
        for n in sizes:
            if tried and self._free_workers() < n:  # a cheap look first: skip what cannot fit now
                continue
            tried.append(n)
            self.pg = placement_group([dict(res) for _ in range(n)], strategy=strategy)
            ready, _ = ray.wait([self.pg.ready()], timeout=self.placement_timeout_s)
            if ready:
                if n != self.world_size:
                    logger.warning("elastic run: %d workers could not be placed within %gs; going on with %d",
                                   self.world_size, self.placement_timeout_s, n)
                self.world_size = n
                return n
            remove_placement_group(self.pg)
            self.pg = None
        wanted = f"{sizes[0]} workers" if len(sizes) == 1 else \
            f"any of {sizes} workers (num_workers=({self.scaling.min_workers}, {self.scaling.num_workers}))"
        raise OrchestratorError(
            f"the cluster did not grant {wanted} x {res} with strategy {strategy} within "
            f"{self.placement_timeout_s:.0f}s; available now: {ray.available_resources()}")

    def _free_workers(self) -> int:
        """How many more workers the cluster's free resources could host now (summed over nodes: an upper bound)."""
        free = ray.available_resources()
        res = {k: v for k, v in self.scaling.worker_resources().items() if v > 0}
        return min((int(free.get(k, 0) // v) for k, v in res.items()), default=self.scaling.num_workers)

    def can_grow(self) -> int | None:
        """Elastic: the larger world size the cluster's free resources could host now beside the running
        workers (a cheap look, no placement), or None."""
        if not self.scaling.elastic or self.world_size >= self.scaling.num_workers:
            return None
        free = self._free_workers()
        bigger = [w for w in self.scaling.world_sizes() if self.world_size < w <= self.world_size + free]
        return bigger[0] if bigger else None

    def _actor(self, rank: int, options: dict[str, Any], warm: bool) -> Any:
        strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=rank)
        return TrainWorker.options(scheduling_strategy=strategy, **options).remote(rank, self.world_size, warm)

    def prepare_standbys(self) -> None:
        """Start warm standbys for the running workers and a spare coordinator (no-op when disabled);
        the standbys kept in reserve by the previous attempt are taken instead of new processes."""
        if not self.warm_standbys:
            return
        if self.pg is not None and not self.standbys:
            reserve, self.reserve = self.reserve, []
            if len(reserve) == self.world_size:
                self.standbys = reserve
            else:
                _kill(reserve)
                self.standbys = [self._actor(rank, {"num_cpus": 0}, warm=True)
                                 for rank in range(self.world_size)]
        if not self.spare_coordinators:
            self.spare_coordinators.append(CoordinatorActor.remote())

    def keep_coordinator(self, coordinator: Any) -> None:
        """Keep the coordinator of an attempt that ended normally (idle: its callbacks returned) for the
        group's next attempt or the next fit it is parked for, beside the spare (at most two); else kill it."""
        if len(self.spare_coordinators) < 2 and not self.closed:
            self.spare_coordinators.insert(0, coordinator)  # taken first: the spare stays the spare
        else:
            _kill([coordinator])

    def coordinator(self, spec: CoordinatorSpec) -> tuple[Any, Any]:
        """A spare coordinator (or a new one) and the ref of its ``setup(spec)`` call; don't wait."""
        coordinator = self.spare_coordinators.pop(0) if self.spare_coordinators else CoordinatorActor.remote()
        return coordinator, coordinator.setup.remote(spec)

    def _promote_standbys(self) -> list[dict[str, Any]] | None:
        """The standbys as the workers, with their node infos, or None (then :meth:`start` starts fresh).

        A rank without a standby (None: the failed rank, when the others were kept after a failure:
        orchestrator/cluster/survivors.py) gets a new process in its bundle."""
        standbys, self.standbys = self.standbys, []
        self.promoted = False
        warm = [s for s in standbys if s is not None]
        if self.pg is None or self.workers or len(standbys) != self.world_size or not warm:
            _kill(warm)
            return None
        fresh = {rank: self._actor(rank, self._worker_options(), warm=False)
                 for rank, s in enumerate(standbys) if s is None}
        workers = [fresh.get(rank, s) for rank, s in enumerate(standbys)]
        try:
            if ray.util.placement_group_table(self.pg).get("state") != "CREATED":
                raise OrchestratorError("the placement group is being rescheduled")
            infos = get_within([w.info.remote() for w in workers],
                               startup_timeout_s(self.placement_timeout_s) if fresh else 30, "the warm standbys")
        except Exception as exc:  # noqa: BLE001 - a lost standby or node: start fresh instead
            logger.info("warm standbys unusable (%s); starting fresh workers", exc)
            _kill(workers)
            return None
        self.workers, self.promoted = workers, not fresh
        self.warm_ranks = [rank for rank in range(len(workers)) if rank not in fresh]
        return infos

    def check_capacity(self) -> None:
        """Raise ValueError when the whole cluster could never host the group (before any worker starts);
        an elastic group needs room for its ``min`` workers."""
        res, n = self.scaling.worker_resources(), self.scaling.world_sizes()[-1]
        total = ray.cluster_resources()
        for key, amount in res.items():
            if amount * n > total.get(key, 0):
                raise ValueError(
                    f"num_workers={n} needs {amount * n:g} {key} in total but the Ray cluster has "
                    f"{total.get(key, 0):g}; lower num_workers or resources_per_worker, or add nodes"
                )

    def run(self, spec: TrainSpec, coordinator: Any) -> list[ray.ObjectRef]:
        """Start every rank's loop on ``spec`` (rank 0's node hosts the process group's store)."""
        master = get_within(self.workers[0].free_port.remote(), CALL_TIMEOUT_S, "rank 0 (asked for a free port)")
        boxed = [ray.put(spec)]  # loaded by each worker once its imports are done (TrainWorker.run)
        return [w.run.remote(boxed, master, coordinator) for w in self.workers]

    def stop_workers(self) -> None:
        """Kill the workers (ranks stuck in a collective included); keep the placement group and standbys."""
        _kill(self.workers)
        self.workers = []

    def retire_workers(self) -> None:
        """After an attempt that ended normally: its idle, warm workers become the standbys (in
        their own bundles), for a later :meth:`start` of this group; the previous standbys (warm,
        never used) stay in reserve as the next attempt's standbys, so that a run of fits with
        ``warm_standbys`` starts no process after its first (each start costs a process and a torch import).
        An attempt that ended before it started standbys (a short one) leaves the reserve as it was."""
        if self.standbys:
            _kill(self.reserve)
            self.reserve = self.standbys
        self.standbys, self.workers = self.workers, []

    def park(self, idle_s: float = PARK_IDLE_S) -> None:
        """Keep the placement group, the idle warm workers and the spare coordinator for the next fit
        of this driver (at most ``idle_s`` seconds), or shut down when there is nothing to keep; never raises."""
        _kill(self.workers)
        self.workers = []
        if self.scaling.use_gpu or self.pg is None or len(self.standbys) != self.world_size \
                or self.world_size != self.scaling.num_workers:
            self.shutdown()
            return
        self.closed = True  # until a fit takes it over
        park_group(self, idle_s)

    def shutdown(self) -> None:
        """End the group: release everything, and refuse any later :meth:`start`; never raises."""
        self.closed = True
        self.release()

    def release(self) -> None:
        """Kill every actor (standbys included) and remove the placement group; the next start places anew.

        Never raises.
        """
        _kill(self.workers + self.standbys + self.reserve + self.spare_coordinators)
        self.workers, self.standbys, self.reserve, self.spare_coordinators = [], [], [], []
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception as exc:
                logger.warning("could not remove placement group: %s", exc)
            self.pg = None


def _kill(actors: list[Any]) -> None:
    for actor in actors:
        if actor is None:  # a rank without a standby (see WorkerGroup._promote_standbys)
            continue
        try:
            ray.kill(actor, no_restart=True)
        except Exception as exc:  # already dead
            logger.debug("kill actor: %s", exc)


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
