"""Fan-in at scale, by simulation: N concurrent callers into one real coordinator actor.

    python benchmarks/coordinator_fanin.py [--ranks 1024 8192] [--repeats 3] [--clients 4]

Every rank calls ``Coordinator.sync`` at every sync point, so at scale the coordinator receives N
Ray calls per point. This starts one real :data:`CoordinatorActor`, sets it up with
``CoordinatorSpec(world_size=N)`` and EarlyStopping, ReduceLROnPlateau and TerminateOnNaN, and has
a handful of client actors (``--clients``, not one actor per rank) issue the N calls of each sync
point concurrently, each call as a rank would (its own report with its metric sums). A sync point's
time is from the first call issued to the last answer received (wall clocks of one machine). It
times a batch sync (``batch_end``) and an epoch end (``epoch_end`` with validation sums), median
and spread of ``--repeats``, and for comparison the coordinator's logic alone on the same reports,
in process (``CoordinatorCore.handle``).

An async Ray actor runs at most ``max_concurrency`` calls at once (1,000 by default); a rank waiting
at the barrier holds one, so the coordinator sets it above any world size (see
``orchestrator/cluster/coordinator.py``). ``--max-concurrency 1000`` shows what the default does at
1,024 ranks: the 1,001st rank never gets in and the sync point hangs (reported after ``--timeout``).
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
from orchestrator.cluster.coordinator import MAX_CONCURRENCY, CoordinatorActor
from orchestrator.cluster.coordinator_core import CoordinatorCore
from orchestrator.cluster.specs import CoordinatorSpec
from orchestrator.core.metrics import PhaseSums
from orchestrator.decisions import Report, ReportKind

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


@ray.remote(num_cpus=0)
class Caller:
    """Issues the calls of many ranks at once and waits for all of their answers."""

    async def sync(self, coordinator: Any, ranks: list[int], kind: str, epoch: int, step: int) -> tuple[float, float]:
        reports = [report(ReportKind(kind), r, epoch, step) for r in ranks]  # built before the clock starts
        start = time.time()
        await asyncio.gather(*[coordinator.sync.remote(r, rep) for r, rep in zip(ranks, reports)])
        return start, time.time()


def timed_sync(coordinator: Any, clients: list, world: int, kind: ReportKind, epoch: int, step: int = -1,
               timeout: float = 120.0) -> float:
    """Seconds from the first call of the sync point to its last answer, over every client."""
    shares = [list(range(i, world, len(clients))) for i in range(len(clients))]
    refs = [c.sync.remote(coordinator, share, str(kind), epoch, step) for c, share in zip(clients, shares)]
    done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if pending:
        raise TimeoutError(f"{kind} sync point of {world} ranks not done after {timeout:g} s")
    spans = ray.get(done)
    return max(e for _, e in spans) - min(s for s, _ in spans)


def logic_alone(world: int, kind: ReportKind, repeats: int) -> list[float]:
    """The core's handle on every rank's reports, in process (no Ray): the logic's share of a sync point."""
    core = CoordinatorCore(callbacks(), dict(PARAMS), world)
    core.handle({r: report(ReportKind.TRAIN_BEGIN, r, 0) for r in range(world)})
    times = []
    for epoch in range(repeats):
        core.handle({r: report(ReportKind.EPOCH_BEGIN, r, epoch) for r in range(world)})
        reports = {r: report(kind, r, epoch, 0 if kind is ReportKind.BATCH_END else -1) for r in range(world)}
        if kind is ReportKind.EPOCH_END:
            core.handle({r: report(ReportKind.BATCH_END, r, epoch, 0) for r in range(world)})
        start = time.perf_counter()
        core.handle(reports)
        times.append(time.perf_counter() - start)
        if kind is ReportKind.BATCH_END:
            core.handle({r: report(ReportKind.EPOCH_END, r, epoch) for r in range(world)})
    return times


def measure(world: int, clients: list, repeats: int, max_concurrency: int | None, timeout: float) -> dict:
    actor = CoordinatorActor.options(max_concurrency=max_concurrency) if max_concurrency else CoordinatorActor
    coordinator = actor.remote()
    ray.get(coordinator.setup.remote(CoordinatorSpec(callbacks=callbacks(), params=dict(PARAMS), world_size=world)))
    out: dict[str, list[float]] = {"batch_end": [], "epoch_end": []}
    try:
        timed_sync(coordinator, clients, world, ReportKind.TRAIN_BEGIN, 0, timeout=timeout)
        for epoch in range(repeats + 1):  # the first epoch warms up (connections, imports): not counted
            timed_sync(coordinator, clients, world, ReportKind.EPOCH_BEGIN, epoch, timeout=timeout)
            batch = timed_sync(coordinator, clients, world, ReportKind.BATCH_END, epoch, 0, timeout=timeout)
            end = timed_sync(coordinator, clients, world, ReportKind.EPOCH_END, epoch, timeout=timeout)
            if epoch:
                out["batch_end"].append(batch)
                out["epoch_end"].append(end)
    finally:
        ray.kill(coordinator)
    return out


def fmt(times: list[float]) -> str:
    ms = [t * 1000 for t in times]
    return f"{statistics.median(ms):8.1f} ms (min {min(ms):.1f}, max {max(ms):.1f})"


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
          f"({platform.machine()}); one CoordinatorActor, {args.clients} client actors, EarlyStopping + "
          f"ReduceLROnPlateau + TerminateOnNaN; median of {args.repeats} sync points each (after one warm-up); "
          f"max_concurrency={args.max_concurrency or MAX_CONCURRENCY}. A shared machine: figures are noisy.")
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")  # our own, never a shared one
    clients = [Caller.remote() for _ in range(args.clients)]
    previous: dict[str, float] = {}
    print(f"{'ranks':>6}  {'sync point':<10}  {'through the actor':<36}  {'logic alone':<36}  growth")
    for world in args.ranks:
        try:
            got = measure(world, clients, args.repeats, args.max_concurrency, args.timeout)
        except TimeoutError as exc:
            print(f"{world:>6}  HUNG: {exc}")
            continue
        for kind in ("batch_end", "epoch_end"):
            alone = logic_alone(world, ReportKind(kind), args.repeats)
            med = statistics.median(got[kind])
            growth = f"x{med / previous[kind]:.1f}" if kind in previous else ""
            previous[kind] = med
            print(f"{world:>6}  {kind:<10}  {fmt(got[kind]):<36}  {fmt(alone):<36}  {growth}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
