"""Where a fit's epoch goes, read from its own events: with a backup every epoch and without.

    python benchmarks/epoch_phases.py [--epochs 10] [--repeats 3] [--realistic]

Runs ``Trainer.fit`` as benchmarks/fit_vs_ddp.py's fit side does (its own local Ray, 2 workers x 1
thread, EarlyStopping + ReduceLROnPlateau + TerminateOnNaN), alternately with and without
``BackupAndRestore()`` (a backup at every epoch's end), and splits each timed epoch (the second
on) by the times of the events the coordinator records (``History.events``, the coordinator's clock):

- **epoch**: ``epoch_begin`` to ``epoch_end``: the epoch's steps, its validation and the epoch-end
  sync point up to the coordinator's handling of it;
- **between epochs**: ``epoch_end`` to the next ``epoch_begin``: the decisions sent back to the ranks
  and applied (a backup's staging copy among them), then the next epoch-begin sync point;
- **commit**: ``epoch_end`` to that backup's ``backup_committed`` (the files written and made durable
  in the ranks' persist threads while the next epoch trains, then the coordinator's commit).

Per side it prints the medians over every timed epoch of every repeat, and steps/s over the timed
epochs; per repeat the ratio of the two sides' steps/s (interleaved, so drift hits both alike). What a
backup costs the training is the difference of the two sides' phases: the wall-clock figures here are
medians of many epochs, less noisy than one run's steps/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fit_vs_ddp  # noqa: E402
import workload  # noqa: E402

SIDES = ("with backups", "without backups")


def run(epochs: int, config: dict, backups: bool) -> dict[str, list[float]]:
    """One fit: its timed epochs' phases in ms (``epoch``, ``between``, ``commit``) and its ``steps/s``."""
    history = fit_vs_ddp.fit_history(epochs, config, fit_vs_ddp.the_callbacks(backups))
    times = {kind: [e["time"] for e in history.events if e["type"] == kind]
             for kind in ("epoch_begin", "epoch_end", "backup_committed")}
    begins, ends, commits = times["epoch_begin"], times["epoch_end"], times["backup_committed"]
    timed = range(1, epochs)
    steps = history.results[0].steps_run // epochs
    return {
        "epoch": [(ends[i] - begins[i]) * 1e3 for i in timed],
        "between": [(begins[i + 1] - ends[i]) * 1e3 for i in timed if i + 1 < len(begins)],
        "commit": [(min(c for c in commits if c >= ends[i]) - ends[i]) * 1e3 for i in timed
                   if any(c >= ends[i] for c in commits)],
        "steps/s": [steps * (epochs - 1) / (ends[-1] - begins[1])],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each fit (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="fits of each side")
    parser.add_argument("--realistic", action="store_true",
                        help="workload.REALISTIC: loader workers, bf16, accumulation, warm-up + cosine per step")
    args = parser.parse_args()
    if args.epochs < 3:
        parser.error("--epochs must be at least 3 (the first is not timed, and a gap needs two timed epochs)")
    import ray
    import torch
    config = workload.REALISTIC if args.realistic else {}
    print(f"torch {torch.__version__}, ray {ray.__version__}, epochs {args.epochs} (timed: 2-{args.epochs}), "
          f"repeats {args.repeats}, batch {workload.BATCH}/worker, 2 workers x 1 thread, config "
          f"{config or 'plain fp32, 1 micro-batch, constant lr'}; callbacks EarlyStopping, ReduceLROnPlateau, "
          f"TerminateOnNaN, and BackupAndRestore() on one side; each fit starts its own local Ray "
          f"(RAY_ADDRESS=local); sides alternate, the first side rotating", flush=True)
    fit_vs_ddp.as_a_user_runs_fit()
    found: dict[str, dict[str, list[float]]] = {side: {} for side in SIDES}
    ratios = []
    for i in range(args.repeats):
        rates = {}
        for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
            phases = run(args.epochs, config, backups=side == SIDES[0])
            for name, values in phases.items():
                found[side].setdefault(name, []).extend(values)
            rates[side] = phases["steps/s"][0]
        ratios.append(rates[SIDES[0]] / rates[SIDES[1]])
        print(f"repeat {i + 1}: " + " | ".join(f"{side} {rates[side]:.1f} steps/s" for side in SIDES)
              + f" | ratio {ratios[-1]:.3f}", flush=True)
    print("\nmedians over the timed epochs of every repeat (ms; steps/s: median of the repeats):")
    print(f"  {'side':<18}{'epoch':>10}{'between':>10}{'commit':>10}{'steps/s':>10}")
    for side in SIDES:
        row = [statistics.median(found[side][name]) if found[side].get(name) else None
               for name in ("epoch", "between", "commit", "steps/s")]
        print(f"  {side:<18}" + "".join(f"{v:>10.1f}" if v is not None else f"{'-':>10}" for v in row))
    (with_, without) = (found[side] for side in SIDES)
    extra = {name: statistics.median(with_[name]) - statistics.median(without[name]) for name in ("epoch", "between")}
    per_epoch = statistics.median(without["epoch"]) + statistics.median(without["between"])
    print(f"a backup every epoch adds {extra['epoch']:.1f} ms to the epoch and {extra['between']:.1f} ms between "
          f"epochs: {(extra['epoch'] + extra['between']) / per_epoch:.1%} of an epoch without backups "
          f"({per_epoch:.0f} ms)")
    print(f"steps/s with / without backups, median of the {args.repeats} per-repeat ratios: "
          f"{statistics.median(ratios):.3f} (repeats {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
