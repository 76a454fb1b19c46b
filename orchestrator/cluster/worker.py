"""The worker actor: one rank of the data-parallel group."""

from __future__ import annotations

import gc
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Mapping

import ray

from orchestrator.core.redaction import redact, redact_exception
from orchestrator.decisions import Decision, Report
from orchestrator.loop.specs import TrainSpec
from orchestrator.storage.run_files import can_read_marker


@dataclass
class WorkerFailure:
    """A rank's loop raised. Returned (not raised) so the driver gets it as a value."""

    rank: int
    node: str
    pid: int
    error_type: str
    message: str
    traceback: str
    exception: BaseException | None = None


class RayLink:
    """A rank's line to the coordinator actor (:class:`~orchestrator.loop.group_link.RankZeroLink`);
    the loop talks to it through a :class:`~orchestrator.loop.group_link.GroupLink`, which combines
    each sync point over the process group so that only rank 0 calls :meth:`decide`."""

    def __init__(self, coordinator: Any, rank: int) -> None:
        self.coordinator = coordinator
        self.rank = rank

    def decide(self, reports: dict[int, Report]) -> list[Decision]:
        return ray.get(self.coordinator.sync.remote(reports))

    def progress(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        self.coordinator.progress.remote(epoch, step, logs)  # fire and forget

    def persisted(self, rank: int, folder: str, entries: Any, meta: dict[str, Any]) -> None:
        ray.get(self.coordinator.persisted.remote(rank, folder, entries, meta))

    def heartbeat(self) -> None:
        self.coordinator.heartbeat.remote(self.rank)  # fire and forget


def _picklable(exc: BaseException) -> BaseException | None:
    try:
        ray.cloudpickle.loads(ray.cloudpickle.dumps(exc))
        return exc
    except Exception:
        return None


def failure_of(rank: int, exc: BaseException, options: Mapping[str, Any] | None) -> WorkerFailure:
    """The :class:`WorkerFailure` a rank returns for ``exc``, with nothing of ``options`` in it.

    The driver logs, raises and records what it gets, so the message, the traceback and the
    exception itself (see :func:`~orchestrator.core.redaction.redact_exception`) are redacted here.

    Args:
        rank: The failed rank.
        exc: What its loop raised.
        options: The run's ``storage_options`` (``TrainSpec.storage.options``), or None.
    """
    return WorkerFailure(rank, ray.util.get_node_ip_address(), os.getpid(), type(exc).__name__,
                         redact(str(exc), options), redact("".join(traceback.format_exception(exc)), options),
                         _picklable(redact_exception(exc, options)))


def _warm_up(low_priority: bool) -> None:
    """Import torch and the loop, and what the first optimizer imports (torch._dynamo and more:
    about a second), the costly part of a cold start; never raises (``run`` imports them again
    and meets the error there).

    A standby warms up at the lowest CPU priority, while the workers it may replace train on the
    same CPUs; on Linux the priority is per thread, so the thread that later runs the loop keeps
    the normal priority.
    """
    if low_priority:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
    try:
        _import_loop()
    except BaseException:  # noqa: BLE001 - run() raises it in the loop's thread, as a WorkerFailure
        pass


def _import_loop() -> None:
    import torch

    import orchestrator.loop.train_loop  # noqa: F401

    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)


@ray.remote(max_restarts=0, max_concurrency=2)
class TrainWorker:
    """Rank ``rank`` of ``world_size``: joins the process group and runs the loop.

    Two threads: ``run`` occupies one; ``notify_preemption`` can arrive on the other. Every
    worker starts importing torch and the training loop as its process starts, in a thread of
    its own: the imports (seconds) overlap with the driver starting the other workers and the
    coordinator, and ``run`` waits for them. A *warm standby* (``warm=True``) does so at the
    lowest CPU priority and then waits, so that it can take over rank ``rank`` after a failure
    without a cold start.
    """

    def __init__(self, rank: int, world_size: int, warm: bool = False) -> None:
        self.rank = rank
        self.world_size = world_size
        self.preemption = threading.Event()
        self.loop: Any = None  # the running (or ended) TrainLoop: a survivor's state is copied from it
        self.warm = warm
        self.warming = threading.Thread(target=_warm_up, args=(warm,), name="orchestrator-warm-up", daemon=True)
        self.warming.start()

    def notify_preemption(self) -> None:
        """Ask the loop to stop at the next step boundary (every rank agrees on which, via the step signal)."""
        self.preemption.set()

    @ray.method(num_returns=2)
    def live_state(self, shared: bool, timeout_s: float) -> tuple[dict[str, Any], Any]:
        """``(header, payload)``: this rank's state as of its last step boundary, for a live recovery
        (see :meth:`orchestrator.loop.live.LiveState.copy`); freezes the rank's loop."""
        live = getattr(self.loop, "live", None)
        if live is None:
            return {"ok": False, "rank": self.rank, "reason": "the loop has not started"}, None
        return live.copy(shared, timeout_s)

    def info(self) -> dict[str, Any]:
        return {"rank": self.rank, "node": ray.util.get_node_ip_address(), "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}

    def can_read(self, storage_spec: Any, marker: str) -> bool:
        """Whether this worker sees the marker file the driver wrote into the run directory."""
        return can_read_marker(storage_spec, marker)

    def free_port(self) -> tuple[str, int]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def run(self, boxed_spec: list[Any], master: tuple[str, int], coordinator: Any) -> Any:
        """Join the process group at ``master`` and run this rank's loop; a failure is returned as a value.

        Args:
            boxed_spec: ``[ray.put(spec)]``, the :class:`TrainSpec` in the object store: a reference
                inside a list is not resolved by Ray before the call, so the spec (the user's model,
                loss and data functions: torch) is loaded here, after the warm-up thread has
                imported torch (two threads importing torch at once break its import).
            master: The host and port of rank 0's process-group store.
            coordinator: The coordinator actor.
        """
        self.warming.join()
        # the loop of this worker's previous fit (a parked worker) is freed here, where its process
        # group's threads run, not in a loader worker forked from this process, where they do not
        self.loop = None
        gc.collect()
        spec: TrainSpec = ray.get(boxed_spec[0])
        import torch

        from orchestrator.cluster.ray_data import RayDataInput
        from orchestrator.loop.group_link import GroupLink
        from orchestrator.loop.signalled import init_process_group
        from orchestrator.loop.train_loop import TrainLoop

        try:
            if spec.threads:
                torch.set_num_threads(spec.threads)
            if spec.use_gpu:
                device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
                torch.cuda.set_device(device)
                backend = "nccl"
            else:
                device, backend = torch.device("cpu"), "gloo"
            init_process_group(backend, master[0], master[1], self.rank, self.world_size)
            live_restore = _receive(spec.live, self.rank, self.world_size, coordinator) if spec.live is not None \
                else None
            data_input = RayDataInput()  # ray.data.Datasets from data() become rank shards (see ray_data.py)
            # sync points combined over the group: rank 0 alone calls the coordinator (see group_link.py)
            link = GroupLink(RayLink(coordinator, self.rank), self.rank, self.world_size, device,
                             beat_every_s=spec.loop.progress_interval_s)
            try:
                storage = spec.storage.open() if spec.storage is not None else None
                self.loop = TrainLoop(spec, self.rank, self.world_size, device, link, storage=storage,
                                      preemption=self.preemption, data_input=data_input, live_restore=live_restore)
                return self.loop.run()
            finally:
                link.close()
                data_input.close()
                torch.distributed.destroy_process_group()
        except Exception as exc:
            return failure_of(self.rank, exc, spec.storage.options if spec.storage is not None else None)


def _receive(live: Any, rank: int, world_size: int, coordinator: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(shared states, own states)`` of a live recovery (:class:`~orchestrator.loop.specs.LiveResume`),
    from the object store: the donor's shared part, this rank's own part if it survived, else rebuilt.
    On another world size (an elastic run) every rank's own part is rebuilt from the survivors'
    (:func:`~orchestrator.loop.elastic.merged_own`: their metric sums on rank 0).
    Rank 0 tells the coordinator when the group was re-formed and the state transferred."""
    from orchestrator.loop.elastic import merged_own
    from orchestrator.loop.live import rebuilt_own

    joined = time.time()
    donor = ray.get(live.payloads[live.donor])
    if live.world_size is not None and live.world_size != world_size:
        survivors = [live.donor] + sorted(r for r in live.payloads if r != live.donor) if rank == 0 else [live.donor]
        own = merged_own([ray.get(live.payloads[r])["own"] for r in survivors], rank)
    else:
        own = ray.get(live.payloads[rank])["own"] if rank in live.payloads else rebuilt_own(donor["own"])
    if rank == 0:
        coordinator.recovery_times.remote(joined, time.time())  # fire and forget, before any progress
    return donor["shared"], own

