"""Goodput at cluster scale, by simulation: backup policy and recovery against a failure process.

    python benchmarks/goodput.py [--days 30] [--gpus 1024 2048 4096 8192 16384] [--seed 0] [--runs 10]
                                 [--stall-s S] [--persist-s S] [--live-recovery-s S] [--cold-restart-s S]
                                 [--ray-recovery-s S] [--step-s S] [--unrecoverable F]

Goodput is the training time that ends up in the final model divided by the wall time. A run of
``--days`` of wall time is simulated for each GPU count and each policy, on the same failure times
(common random numbers, one seeded stream per GPU count and run), so the policies differ only by what
they do; each cell is the mean of ``--runs`` runs.

**The failure process.** Llama 3 405B pre-training on 16,384 GPUs saw 466 job interruptions in 54
days (Dubey et al., "The Llama 3 Herd of Models", 2024, section 3.3.4): a mean time between
interruptions of 54 * 86400 / 466 = 10,012 s (2.8 h). Failures are a Poisson process whose rate
scales with the GPU count: MTBF(N) = 10,012 s * 16,384 / N (44.5 h at 1,024 GPUs).

**Measured costs** (defaults; every one can be overridden by its flag). Per-GPU state is held
constant across GPU counts (weak scaling), so the costs do not change with N:

- ``--stall-s`` 0.26 s: training stall of one backup (copy to CPU + waiting for the previous
  persist) for a ~60M-parameter model with Adam (705 MB of state per rank):
  ``python benchmarks/backup_io.py --repeats 3`` phase 1 ("stage"), median of 3, on the 2-core
  development machine (shared while measured).
- ``--persist-s`` 1.4 s: the background write of the same backup to ``file://`` (phase 2
  "persist", median of 5 in the same run; 0.8-3.8 s). A backup is committed only once it is
  durable: a failure before that falls back to the previous one.
- ``--live-recovery-s`` 1.11 s: SIGKILL of a worker to the next completed step with live recovery
  (``benchmarks/recovery.py``, README); at most the step in flight is redone (a uniform fraction of
  ``--step-s``).
- ``--cold-restart-s`` 6.21 s: the same with ``warm_standbys=False`` and no live recovery: every
  process restarts and reloads the newest committed backup (``benchmarks/recovery.py``).
- ``--ray-recovery-s`` 11.22 s: Ray Train v2's ``TorchTrainer`` on the same kill
  (``benchmarks/recovery.py``); it reloads its newest reported checkpoint. Its checkpoint is written
  inside ``train.report`` on the training thread, so its stall is taken to be the whole persist
  (``--stall-s + --persist-s``) and it is usable as soon as reported.
- ``--step-s`` 2.0 s: one training step at scale (assumed: the step time of a large model).
- ``--unrecoverable`` 0.1: the fraction of failures that live recovery cannot absorb (every replica
  of some state lost, the driver lost): those reload the newest backup. Assumed, not measured.

Recovery times measured on 2 workers are optimistic at 16k GPUs (scheduling, collective set-up);
the ratios between policies matter more than the absolute goodput.

**Policies.** ``fixed T``: a backup every T seconds of training. ``Young/Daly``: T* = sqrt(2 C M(N))
with C the policy's stall (what ``BackupAndRestore(save_freq="auto")`` converges to; with live
recovery only the unrecoverable failures roll back to a backup, so M is M(N) / ``--unrecoverable``),
never below the persist time.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from dataclasses import dataclass

LLAMA3_GPUS = 16_384
LLAMA3_MTBF_S = 54 * 86_400 / 466  # 10,012 s


def mtbf_s(gpus: int) -> float:
    """Mean seconds between job interruptions on ``gpus`` GPUs (Llama 3's rate, linear in the GPU count).

    Example:
        >>> round(mtbf_s(16_384)), round(mtbf_s(1_024) / 3600, 1)
        (10012, 44.5)
    """
    return LLAMA3_MTBF_S * LLAMA3_GPUS / gpus


@dataclass(frozen=True)
class Policy:
    """How a run backs up and recovers.

    Args:
        name: Its row label.
        interval_s: Training seconds between backups.
        stall_s: Wall seconds training stands still per backup (before any wait for the previous persist).
        persist_s: Seconds from the end of the stall to the commit (0: committed when the stall ends).
        recovery_s: Wall seconds from a failure to training again.
        live: Failures (but ``unrecoverable`` of them) lose only the step in flight, not the work since the backup.
    """

    name: str
    interval_s: float
    stall_s: float
    persist_s: float
    recovery_s: float
    live: bool = False


def failure_times(gpus: int, horizon_s: float, seed: int) -> list[float]:
    """Poisson failure times over ``horizon_s`` for ``gpus`` GPUs (a seeded stream per GPU count)."""
    rng = random.Random(f"{seed}-{gpus}")
    times, t = [], 0.0
    while True:
        t += rng.expovariate(1.0 / mtbf_s(gpus))
        if t >= horizon_s:
            return times
        times.append(t)


def simulate(policy: Policy, failures: list[float], horizon_s: float, step_s: float, unrecoverable: float,
             seed: int) -> float:
    """Goodput of ``policy`` over ``horizon_s`` of wall time with failures at ``failures``.

    Training runs in cycles: ``interval_s`` of training, then a stall of ``stall_s`` plus any wait
    for the previous persist; the backup commits ``persist_s`` after its stall. A failure rolls the
    progress back to the newest committed backup (or, for a live policy and a recoverable failure,
    back by the part of the step in flight) and costs ``recovery_s`` (restarted by a failure during it).
    """
    rng = random.Random(f"{seed}-live")  # which failures live recovery absorbs, and the step fraction lost
    t = progress = committed = since = 0.0
    pending: tuple[float, float] | None = None  # (commit time, progress it holds)
    fails = iter(failures)
    next_fail = next(fails, math.inf)
    while t < horizon_s:
        if pending is not None and pending[0] <= t:
            committed, pending = pending[1], None
        train_end = t + policy.interval_s - since
        if min(next_fail, horizon_s) < train_end:  # a failure (or the end) while training
            stop = min(next_fail, horizon_s)
            progress += stop - t
            since += stop - t
            t = stop
        else:
            progress += train_end - t
            t, since = train_end, 0.0
            wait = max(0.0, pending[0] - t) if pending is not None else 0.0
            stall_end = t + wait + policy.stall_s
            if min(next_fail, horizon_s) < stall_end:
                t = min(next_fail, horizon_s)
            else:
                if pending is not None:  # it committed during the wait
                    committed = pending[1]
                t = stall_end
                pending = (t + policy.persist_s, progress)
                if policy.persist_s == 0:
                    committed, pending = progress, None
                continue
        if t >= horizon_s:
            break
        # a failure at t
        if pending is not None and pending[0] <= t:
            committed = pending[1]
        pending = None
        if policy.live and rng.random() >= unrecoverable:
            progress = max(committed, progress - rng.uniform(0.0, step_s))
        else:
            progress, since = committed, 0.0
        t += policy.recovery_s
        next_fail = next(fails, math.inf)
        while next_fail < t:  # failed again while recovering: the recovery starts over
            t = next_fail + policy.recovery_s
            next_fail = next(fails, math.inf)
    return progress / horizon_s


def young_daly(stall_s: float, mtbf: float, persist_s: float) -> float:
    """sqrt(2 C M), never below the persist time (a shorter interval would queue the backups)."""
    return max(math.sqrt(2.0 * stall_s * mtbf), persist_s)


def policies(gpus: int, args: argparse.Namespace) -> list[Policy]:
    m = mtbf_s(gpus)
    c, p = args.stall_s, args.persist_s
    ray_c = c + p
    fixed = [60.0, 600.0, 1800.0, 3600.0]
    rows = [Policy(f"ours, cold restart, backup every {int(f // 60)} min", f, c, p, args.cold_restart_s)
            for f in fixed]
    rows.append(Policy("ours, cold restart, Young/Daly", young_daly(c, m, p), c, p, args.cold_restart_s))
    rows += [Policy(f"ours, live recovery, backup every {int(f // 60)} min", f, c, p, args.live_recovery_s, live=True)
             for f in (600.0, 3600.0)]
    live_m = m / args.unrecoverable if args.unrecoverable > 0 else 30 * 86_400.0
    rows.append(Policy("ours, live recovery, Young/Daly", young_daly(c, live_m, p), c, p, args.live_recovery_s,
                       live=True))
    rows += [Policy(f"Ray Train, checkpoint every {int(f // 60)} min", f, ray_c, 0.0, args.ray_recovery_s)
             for f in (600.0, 3600.0)]
    rows.append(Policy("Ray Train, Young/Daly", young_daly(ray_c, m, 0.0), ray_c, 0.0, args.ray_recovery_s))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=float, default=30.0, help="wall time simulated per run (default 30)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=10, help="seeded runs averaged per cell (default 10)")
    parser.add_argument("--stall-s", type=float, default=0.26, help="backup stall (default 0.26, backup_io.py)")
    parser.add_argument("--persist-s", type=float, default=1.4, help="backup persist (default 1.4, backup_io.py)")
    parser.add_argument("--live-recovery-s", type=float, default=1.11, help="default 1.11 (recovery.py)")
    parser.add_argument("--cold-restart-s", type=float, default=6.21, help="default 6.21 (recovery.py)")
    parser.add_argument("--ray-recovery-s", type=float, default=11.22, help="default 11.22 (recovery.py)")
    parser.add_argument("--step-s", type=float, default=2.0, help="step time at scale (default 2.0, assumed)")
    parser.add_argument("--unrecoverable", type=float, default=0.1,
                        help="fraction of failures live recovery cannot absorb (default 0.1, assumed)")
    args = parser.parse_args(argv)
    horizon = args.days * 86_400.0
    print(f"goodput over {args.days:g} days of wall time per run, mean of {args.runs} seeded runs (seeds "
          f"{args.seed}-{args.seed + args.runs - 1}); failures: Llama 3's 466 in 54 "
          f"days on 16,384 GPUs, scaled with the GPU count; stall {args.stall_s:g} s, persist {args.persist_s:g} s, "
          f"live recovery {args.live_recovery_s:g} s, cold restart {args.cold_restart_s:g} s, Ray Train recovery "
          f"{args.ray_recovery_s:g} s, step {args.step_s:g} s, unrecoverable {args.unrecoverable:g}")
    header = f"{'policy / GPUs':<52}" + "".join(f"{n:>10,}" for n in args.gpus)
    print(header)
    print(f"{'MTBF (h)':<52}" + "".join(f"{mtbf_s(n) / 3600:>10.1f}" for n in args.gpus))
    seeds = range(args.seed, args.seed + args.runs)
    print(f"{'failures per run (mean)':<52}" + "".join(
        f"{sum(len(failure_times(n, horizon, s)) for s in seeds) / args.runs:>10.1f}" for n in args.gpus))
    table: dict[str, list[str]] = {}
    intervals: dict[str, list[str]] = {}
    for n in args.gpus:
        runs = [(s, failure_times(n, horizon, s)) for s in seeds]
        for policy in policies(n, args):
            g = sum(simulate(policy, f, horizon, args.step_s, args.unrecoverable, s) for s, f in runs) / args.runs
            table.setdefault(policy.name, []).append(f"{100 * g:.2f}%")
            if "Young/Daly" in policy.name:
                intervals.setdefault(f"  interval (min): {policy.name}", []).append(f"{policy.interval_s / 60:.1f}")
    for rows in (table, intervals):
        for name, cells in rows.items():
            print(f"{name:<52}" + "".join(f"{c:>10}" for c in cells))
    print("goodput = training time kept in the final model / wall time; same failure times for every policy")


if __name__ == "__main__":
    sys.exit(main())
