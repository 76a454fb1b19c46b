"""Sync points at scale, by simulation: the per-rank fan-in against the aggregated path, side by side.

    python benchmarks/coordinator_fanin.py [--ranks 1024 8192] [--repeats 3] [--clients 4]

Two ways for N ranks to hand one sync point to the coordinator, both into one real coordinator
actor set up with ``CoordinatorSpec(world_size=N)`` and EarlyStopping, ReduceLROnPlateau and
TerminateOnNaN:

- **per-rank fan-in** (the protocol before the ranks combined their reports): every rank calls the
  coordinator with its own report and waits at a barrier there; the last to arrive runs
  ``CoordinatorCore.handle`` on the N reports. A handful of client actors (``--clients``, not one
  actor per rank) issue the N calls of each sync point concurrently; the actor here is
  :class:`PerRankCoordinator`, the coordinator with that barrier. Timed from the first call
  issued to the last answer received (wall clocks of one machine).
- **aggregated** (what the ranks do now, ``orchestrator/loop/group_link.py``): the ranks combine
  their reports over their process group and rank 0 alone calls ``Coordinator.sync`` with one
  combined report; timed here is the coordinator's side, rank 0's one call, from one client actor.
  The ranks' all-reduce and broadcast over N ranks are not measurable on one machine: on the
  training collective they grow with log N (a few small-message latencies per doubling), not with
  N Ray calls into one actor.

Each times a batch sync (``batch_end``) and an epoch end (``epoch_end`` with validation sums),
median and spread of ``--repeats``, and the coordinator's logic alone on the same reports, in
process (``CoordinatorCore.handle`` on N reports, and on the one combined report).

An async Ray actor runs at most ``max_concurrency`` calls at once (1,000 by default); in the
per-rank fan-in a rank waiting at the barrier holds one. ``--max-concurrency 1000`` shows what the
default does at 1,024 ranks: the 1,001st rank never gets in and the sync point hangs (reported
after ``--timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from typing import Any

import ray

from orchestrator.callbacks import EarlyStopping, ReduceLROnPlateau, TerminateOnNaN
from orchestrator.cluster.coordinator import MAX_CONCURRENCY, Coordinator, CoordinatorActor
from orchestrator.cluster.coordinator_core import CoordinatorCore
from orchestrator.cluster.specs import CoordinatorSpec
from orchestrator.core.metrics import PhaseSums
from orchestrator.decisions import Decision, Report, ReportKind

STEPS = 100
PARAMS = {"epochs": 10_000, "steps": STEPS, "verbose": 0, "metrics": ["accuracy"],
          "metric_directions": {"loss": "min", "accuracy": "max"}}


def callbacks() -> list:
    return [EarlyStopping(monitor="val_loss", patience=10_000), ReduceLROnPlateau(monitor="val_loss", patience=10_000),
            TerminateOnNaN()]


def report(kind: ReportKind, rank: int, epoch: int, step: int = -1) -> Report:
    """Rank ``rank``'s report at a sync point, with sums that differ by rank (as real ones do)."""
    train = PhaseSums({"loss": 64 * (1.0 + rank % 7 / 10), "accuracy": 64 * 0.5}, 64)
    val = PhaseSums({"loss": 32 * 1.1, "accuracy": 32 * 0.4}, 32) if kind is ReportKind.EPOCH_END else None
    done = epoch * STEPS + (step + 1 if step >= 0 else (STEPS if kind is ReportKind.EPOCH_END else 0))
    return Report(kind, epoch=epoch, step=step, train=train, val=val, learning_rate=0.1, steps_per_epoch=STEPS,
                  global_step=done)


def combined(kind: ReportKind, world: int, epoch: int, step: int = -1) -> Report:
    """What rank 0 sends for ``world`` ranks: every rank's sums added up (as the group's all-reduce does)."""
    reports = [report(kind, r, epoch, step) for r in range(world)]
    first = reports[0]

    def summed(phase: str) -> PhaseSums | None:
        if getattr(first, phase) is None:
            return None
        names = list(getattr(first, phase).totals)
        return PhaseSums({n: sum(getattr(r, phase).totals[n] for r in reports) for n in names},
                         sum(getattr(r, phase).count for r in reports))

    return Report(kind, epoch=first.epoch, step=first.step, train=summed("train"), val=summed("val"),
                  learning_rate=first.learning_rate, steps_per_epoch=first.steps_per_epoch,
                  global_step=first.global_step)


class PerRankCoordinator(Coordinator):
    """The coordinator with the per-rank protocol it had before the ranks combined their reports: each
    rank calls :meth:`sync_rank` and waits at a barrier; the last to arrive runs the core once, on
    every rank's report, and every waiting rank gets the same decisions."""

    def __init__(self) -> None:
        super().__init__()
        self._points: dict[tuple[str, int, int], dict[str, Any]] = {}

    async def sync_rank(self, rank: int, rep: Report) -> list[Decision]:
        key = (str(rep.kind), rep.epoch, rep.step)
        point = self._points.setdefault(key, {"reports": {}, "done": asyncio.Event(), "task": None})
        point["reports"][rank] = rep
        if len(point["reports"]) == self._core().world_size:
            del self._points[key]
            point["task"] = asyncio.ensure_future(self.sync(point["reports"]))  # the one handle() call
            point["done"].set()
        await point["done"].wait()
        return await point["task"]


PerRankActor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=MAX_CONCURRENCY)(PerRankCoordinator)


@ray.remote(num_cpus=0)
class Caller:
    """Issues the calls of many ranks at once and waits for all of their answers."""

    async def sync(self, coordinator: Any, ranks: list[int], kind: str, epoch: int, step: int) -> tuple[float, float]:
        reports = [report(ReportKind(kind), r, epoch, step) for r in ranks]  # built before the clock starts
        start = time.time()
        await asyncio.gather(*[coordinator.sync_rank.remote(r, rep) for r, rep in zip(ranks, reports)])
        return start, time.time()

    async def sync_combined(self, coordinator: Any, rep: Report) -> tuple[float, float]:
        """Rank 0's one call with the combined report."""
        start = time.time()
        await coordinator.sync.remote({0: rep})
        return start, time.time()


def timed_sync(coordinator: Any, clients: list, world: int, kind: ReportKind, epoch: int, step: int = -1,
               timeout: float = 120.0, aggregated: bool = False) -> float:
    """Seconds from the first call of the sync point to its last answer, over every client."""
    if aggregated:
        done, pending = ray.wait([clients[0].sync_combined.remote(coordinator, combined(kind, world, epoch, step))],
                                 timeout=timeout)
        if pending:
            raise TimeoutError(f"{kind} sync point of {world} ranks (aggregated) not done after {timeout:g} s")
        start, end = ray.get(done[0])
        return end - start
    shares = [list(range(i, world, len(clients))) for i in range(len(clients))]
    refs = [c.sync.remote(coordinator, share, str(kind), epoch, step) for c, share in zip(clients, shares)]
    done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if pending:
        raise TimeoutError(f"{kind} sync point of {world} ranks not done after {timeout:g} s")
    spans = ray.get(done)
    return max(e for _, e in spans) - min(s for s, _ in spans)


def logic_alone(world: int, kind: ReportKind, repeats: int, aggregated: bool = False) -> list[float]:
    """The core's handle in process (no Ray): the logic's share of a sync point, on every rank's
    reports (per-rank) or on the one combined report (aggregated)."""
    def reports(k: ReportKind, epoch: int, step: int = -1) -> dict[int, Report]:
        if aggregated:
            return {0: combined(k, world, epoch, step)}
        return {r: report(k, r, epoch, step) for r in range(world)}

    core = CoordinatorCore(callbacks(), dict(PARAMS), world)
    core.handle(reports(ReportKind.TRAIN_BEGIN, 0))
    times = []
    for epoch in range(repeats):
        core.handle(reports(ReportKind.EPOCH_BEGIN, epoch))
        timed = reports(kind, epoch, 0 if kind is ReportKind.BATCH_END else -1)
        if kind is ReportKind.EPOCH_END:
            core.handle(reports(ReportKind.BATCH_END, epoch, 0))
        start = time.perf_counter()
        core.handle(timed)
        times.append(time.perf_counter() - start)
        if kind is ReportKind.BATCH_END:
            core.handle(reports(ReportKind.EPOCH_END, epoch))
    return times


def measure(world: int, clients: list, repeats: int, max_concurrency: int | None, timeout: float,
            aggregated: bool = False) -> dict:
    actor = CoordinatorActor if aggregated else PerRankActor
    actor = actor.options(max_concurrency=max_concurrency) if max_concurrency else actor
    coordinator = actor.remote()
    ray.get(coordinator.setup.remote(CoordinatorSpec(callbacks=callbacks(), params=dict(PARAMS), world_size=world)))
    out: dict[str, list[float]] = {"batch_end": [], "epoch_end": []}
    kw = {"timeout": timeout, "aggregated": aggregated}
    try:
        timed_sync(coordinator, clients, world, ReportKind.TRAIN_BEGIN, 0, **kw)
        for epoch in range(repeats + 1):  # the first epoch warms up (connections, imports): not counted
            timed_sync(coordinator, clients, world, ReportKind.EPOCH_BEGIN, epoch, **kw)
            batch = timed_sync(coordinator, clients, world, ReportKind.BATCH_END, epoch, 0, **kw)
            end = timed_sync(coordinator, clients, world, ReportKind.EPOCH_END, epoch, **kw)
            if epoch:
                out["batch_end"].append(batch)
                out["epoch_end"].append(end)
    finally:
        ray.kill(coordinator)
    return out


def fmt(times: list[float]) -> str:
    ms = [t * 1000 for t in times]
    return f"{statistics.median(ms):7.1f} ms ({min(ms):.1f}-{max(ms):.1f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1024, 8192], help="world sizes (default 1024 8192)")
    parser.add_argument("--repeats", type=int, default=3, help="timed sync points of each kind (default 3)")
    parser.add_argument("--clients", type=int, default=4, help="client actors issuing the calls (default 4)")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="override the coordinator actor's max_concurrency (default: the actor's own)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a sync point counts as hung")
    args = parser.parse_args(argv)
    print(f"python {platform.python_version()}, ray {ray.__version__}, {os.cpu_count()} CPUs "
          f"({platform.machine()}); one coordinator actor per run, EarlyStopping + ReduceLROnPlateau + "
          f"TerminateOnNaN; median (min-max) of {args.repeats} sync points each (after one warm-up); "
          f"max_concurrency={args.max_concurrency or MAX_CONCURRENCY}. A shared machine: figures are noisy.")
    print(f"per-rank fan-in: N concurrent calls from {args.clients} client actors, N reports in the core; "
          "aggregated: rank 0's one call with the combined report (the coordinator's side)")
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")  # our own, never a shared one
    clients = [Caller.remote() for _ in range(args.clients)]
    previous: dict[tuple[str, bool], float] = {}
    print(f"{'ranks':>6}  {'sync point':<10}  {'per-rank fan-in':<27}  {'its logic':<22}  {'growth':<6}  "
          f"{'aggregated':<27}  {'its logic':<22}  growth")
    for world in args.ranks:
        rows: dict[bool, dict[str, str]] = {}
        for aggregated in (False, True):
            try:
                got = measure(world, clients, args.repeats, args.max_concurrency, args.timeout, aggregated)
            except TimeoutError as exc:
                rows[aggregated] = {kind: f"HUNG ({exc})" for kind in ("batch_end", "epoch_end")}
                continue
            rows[aggregated] = {}
            for kind in ("batch_end", "epoch_end"):
                alone = logic_alone(world, ReportKind(kind), args.repeats, aggregated)
                med = statistics.median(got[kind])
                growth = f"x{med / previous[kind, aggregated]:.1f}" if (kind, aggregated) in previous else ""
                previous[kind, aggregated] = med
                rows[aggregated][kind] = f"{fmt(got[kind]):<27}  {fmt(alone):<22}  {growth:<6}"
        for kind in ("batch_end", "epoch_end"):
            print(f"{world:>6}  {kind:<10}  {rows[False][kind]}  {rows[True][kind]}".rstrip(), flush=True)
    print("aggregated: the ranks' all-reduce of the sums and the broadcast of the decisions over N ranks are not "
          "measurable on one machine; on the training collective they grow with log N, not with N calls into "
          "one actor.")
    ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
