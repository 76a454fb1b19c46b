"""The coordinator: one Ray actor that turns every rank's reports into one set of decisions.

At each sync point the ranks combine their reports over their process group and rank 0 alone
calls :meth:`Coordinator.sync` with the result (:class:`~orchestrator.loop.group_link.GroupLink`):
one arrival per sync point, whatever the number of ranks. The coordinator runs the aggregation and
the callbacks once on it and returns the decision list, which rank 0 broadcasts to every rank. The
logic lives in :class:`CoordinatorCore` (no Ray, no torch). Progress and epoch events queue up for the driver, which polls :meth:`Coordinator.poll`.

The actor is async: its event loop answers the ranks and the driver, and everything that runs
the core (the callbacks above all) runs on one worker thread, one call at a time and in the
order the calls came. A callback that blocks therefore blocks neither :meth:`Coordinator.poll`
nor the heartbeats, and the poll says which callback and hook have been running for how long
(:class:`CoordinatorBusy`): the driver's hang watchdog watches the coordinator as it watches
the ranks.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import ray

from orchestrator.cluster.coordinator_core import CoordinatorCore, Reports
from orchestrator.cluster.recovery_timeline import RecoveryTimeline
from orchestrator.cluster.specs import CoordinatorSpec
from orchestrator.core.events import EventType
from orchestrator.decisions import Decision
from orchestrator.storage.checkpoint import FileEntry

__all__ = ["Coordinator", "CoordinatorActor", "CoordinatorBusy", "CoordinatorPoll"]


@dataclass(frozen=True)
class CoordinatorBusy:
    """What the coordinator's worker thread has been doing since it last finished something.

    Args:
        task: The core's call, e.g. ``"the epoch_end sync point (epoch 0, step -1)"``.
        callback: The callback whose hook runs now (``CallbackList.running``), or None between hooks.
        hook: That hook's name, or None.
        seconds: How long that hook has been running (the task, when no hook runs).
        where: The worker thread's innermost frames, ``file:line in function``, outer first.

    Example:
        >>> CoordinatorBusy("the epoch_end sync point", "LambdaCallback", "on_epoch_end", 12.0, "x.py:3 in f").label
        'LambdaCallback.on_epoch_end'
    """

    task: str
    callback: str | None
    hook: str | None
    seconds: float
    where: str = ""

    @property
    def label(self) -> str:
        """``Callback.hook``, or the task when no hook runs."""
        return f"{self.callback}.{self.hook}" if self.callback else self.task


@dataclass(frozen=True)
class CoordinatorPoll:
    """One answer of :meth:`Coordinator.poll`.

    Args:
        events: The events recorded since the previous poll, oldest first.
        ages: Each started rank's seconds since its last sign of life (0 for every rank while the
            coordinator handles a sync point: every rank has reached it and waits for the decisions).
        busy: What the coordinator's worker thread is doing, or None when idle.
    """

    events: list[dict[str, Any]]
    ages: dict[int, float]
    busy: CoordinatorBusy | None = None


class Coordinator:
    """The coordinator actor's class (plain Python; :data:`CoordinatorActor` is the Ray actor).

    Started bare (so that a spare can be started ahead of a restart), then given its run with
    :meth:`setup` before any rank talks to it. The coordinator of a fit that finished is kept with
    the group its driver parks (:meth:`WorkerGroup.keep_coordinator`) and set up again by the next
    fit: starting an actor's process costs more than the whole of a short fit.

    Example:
        >>> coordinator = CoordinatorActor.remote()  # doctest: +SKIP
        >>> ray.get(coordinator.setup.remote(CoordinatorSpec(world_size=2)))  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._fresh_state()

    def _fresh_state(self) -> None:
        self.core: CoordinatorCore | None = None
        self.timeline: RecoveryTimeline | None = None  # a live recovery's, completed at its first step
        self._beats: dict[int, float] = {}  # a rank is watched from its first sign of life on
        self._syncing = 0  # sync points being handled: every rank waits for their decisions
        # one thread: the core's calls (callbacks, commits) run one at a time, in order, off the event loop
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coordinator-core")
        self._calls = itertools.count(1)
        self._task: tuple[int, str, float] | None = None  # (call number, what, started) while one runs
        self._thread: int | None = None
        self._seen: tuple[Any, float] = (None, 0.0)  # (call number, running hook) first seen at

    def setup(self, spec: CoordinatorSpec) -> None:
        """Take the run of ``spec``; a coordinator kept from a finished fit forgets everything of that fit."""
        if self.core is not None:
            self._executor.shutdown(wait=True)  # idle: it was kept only after its attempt ended normally
            self._fresh_state()
        self.core = CoordinatorCore.from_spec(spec)
        self.timeline = RecoveryTimeline(spec.recovery) if spec.recovery is not None else None

    def _core(self) -> CoordinatorCore:
        if self.core is None:
            raise RuntimeError("the coordinator was called before setup()")
        return self.core

    # -- the worker thread ----------------------------------------------------------------
    def _submit(self, what: str, fn: Callable[..., Any], *args: Any) -> Future:
        return self._executor.submit(self._run, what, fn, *args)

    def _run(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        self._thread = threading.get_ident()
        self._task = (next(self._calls), what, time.monotonic())
        try:
            return fn(*args)
        finally:
            self._task = None

    # -- ranks --------------------------------------------------------------------------
    async def sync(self, reports: Reports) -> list[Decision]:
        """One sync point, from rank 0: the ranks' reports combined over their process group
        (``{0: combined}``), or every rank's report when they disagree; returns the decisions for all.

        Every rank has reached this sync point (the combining collective needed them all) and waits
        for its decisions, so every rank counts as alive until they are out (:meth:`poll`).

        Raises:
            ValueError: No report.
        """
        core = self._core()
        if not reports:
            raise ValueError("Coordinator.sync needs the sync point's reports ({rank: Report}), got none")
        first = reports[min(reports)]
        what = f"the {first.kind} sync point (epoch {first.epoch}, step {first.step})"
        self._syncing += 1
        self._all_alive(core.world_size)
        try:
            return await asyncio.wrap_future(self._submit(what, core.handle, reports))
        finally:
            self._syncing -= 1
            self._all_alive(core.world_size)

    def _all_alive(self, world_size: int) -> None:
        now = time.monotonic()
        for rank in range(world_size):
            self._beats[rank] = now

    def heartbeat(self, rank: int) -> None:
        self._beats[rank] = time.monotonic()

    def progress(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        self._beats[0] = time.monotonic()
        fields = self.timeline.first_step(time.time()) if self.timeline is not None else None
        if fields is not None:  # the first step after a live recovery (before its progress: where it resumed)
            self._submit("recovered", lambda: self._core()._emit(EventType.RECOVERED, **fields))
        self._submit("progress", self._core().progress, epoch, step, logs)  # fire and forget, in order

    def recovery_times(self, joined_at: float, transferred_at: float) -> None:
        """Rank 0 after a live recovery: when it joined the new group and when it had the survivors' state."""
        if self.timeline is not None:
            self.timeline.joined(joined_at, transferred_at)

    async def live_state(self) -> dict[str, Any]:
        """The coordinator's state now and the newest committed backup, for a live recovery."""
        core = self._core()
        return await asyncio.wrap_future(self._submit(
            "live_state", lambda: {"state": core.state_dict(), "last_committed": core.last_committed}))

    async def persisted(self, rank: int, folder: str, entries: list[FileEntry] | None, meta: dict[str, Any]) -> None:
        """One rank's files of a backup are durable (or failed): one call per rank per backup, from each
        rank's persist thread (once a backup, not at every sync point, so not combined over the group)."""
        what = f"rank {rank}'s backup files of {folder} (commit)"
        await asyncio.wrap_future(self._submit(what, self._core().persisted, rank, folder, entries, meta))

    # -- the driver ---------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Where this coordinator runs: node address, Ray node id (watched for drains) and pid."""
        return {"node": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid()}

    def poll(self) -> CoordinatorPoll:
        """New events, each started rank's seconds since its last sign of life (0 for all while a sync
        point is handled), and what the worker thread is busy with. Answers while a callback blocks."""
        now = time.monotonic()
        syncing = self._syncing > 0
        ages = {rank: 0.0 if syncing else now - beat for rank, beat in dict(self._beats).items()}
        return CoordinatorPoll(_take_events(self._core()), ages, self._busy(now))

    async def seal(self) -> None:
        """Commit nothing more (the attempt is ending): once this returns, every commit has its event."""
        await asyncio.wrap_future(self._submit("seal", self._core().seal))

    async def callback_states(self) -> list[dict[str, Any]]:
        return await asyncio.wrap_future(self._submit("callback_states", self._core().callbacks.state_dict))

    def error(self) -> tuple[BaseException | None, str]:
        core = self._core()
        error = core.error
        if error is not None:
            try:
                ray.cloudpickle.dumps(error)
            except Exception:
                error = None  # the traceback text still reaches the driver
        return error, core.error_traceback

    def _busy(self, now: float) -> CoordinatorBusy | None:
        task = self._task
        if task is None or self.core is None:
            return None
        call, what, started = task
        frame = sys._current_frames().get(self._thread) if self._thread is not None else None
        running = self.core.callbacks.running
        key = (call, running)
        if self._seen[0] != key:  # a new hook (or the task itself): time it from now (the task: from its start)
            self._seen = (key, now if running else started)
        callback, hook = running if running else (None, None)
        return CoordinatorBusy(what, callback, hook, now - self._seen[1], _where(frame))


def _take_events(core: CoordinatorCore) -> list[dict[str, Any]]:
    """The core's new events, taken in place (the worker thread may be appending at the same time)."""
    n = len(core.events)
    taken = core.events[:n]
    del core.events[:n]
    return taken


def _where(frame: Any, depth: int = 3) -> str:
    """The worker thread's innermost frames (at most ``depth``, outer first, none above the hook call)."""
    frames = []
    while frame is not None and len(frames) < depth and not _is_hook_call(frame.f_code):
        frames.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        frame = frame.f_back
    return " > ".join(reversed(frames))


def _is_hook_call(code: Any) -> bool:
    return code.co_name == "call" and code.co_filename.endswith("callback_list.py")


#: Calls the coordinator serves at once. A sync point is one call (rank 0's), but every rank's commit
#: call (``persisted``) of a backup waits in one until the backup commits, so it must be above any
#: world size: with Ray's default for async actors (1,000) the 1,001st rank never gets in and the
#: commit hangs (benchmarks/coordinator_fanin.py shows it for per-rank calls). A waiting call costs
#: one coroutine.
MAX_CONCURRENCY = 100_000

#: The Ray actor (an async actor: one event loop, plus the one worker thread of :class:`Coordinator`).
CoordinatorActor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=MAX_CONCURRENCY)(Coordinator)
