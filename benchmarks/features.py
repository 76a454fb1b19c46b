"""What each training feature costs: Trainer.fit with one feature on (bf16 autocast, gradient
accumulation, DataLoader workers, a per-step schedule, fsdp, then all of workload.REALISTIC)
against Trainer.fit without it, and the hand-written DDP loop under torchrun with and without the
same feature, in one run.

    python benchmarks/features.py [--epochs 2] [--repeats 3] [--only NAME ...] [--fit-only]

The unit is samples per second (both ranks together): a feature that changes the number of optimizer
steps (accumulation) is compared on the data it trains on. Each configuration's cost is the median,
over repeats, of its rate divided by the plain configuration's rate on the same side in the same
repeat; ``fit / DDP`` compares the two sides on the same configuration (1.0: the framework adds no
cost to the feature). The timing is benchmarks/fit_vs_ddp.py's: the steady state, from the start of
the second epoch to the end of the last one, from each side's epoch times; configurations and sides
run in an order that rotates from repeat to repeat, each run once the previous one's processes have
ended and the machine is quiet (benchmarks/settle.py, at most 30 s: with the rotation a configuration
always runs after the same other one, and would otherwise pay for that one's Ray ending). fsdp is
timed on Trainer.fit only (the hand-written loop is DDP). On a CPU without native bf16 units, bf16
autocast is slower than fp32 on both sides: it is the framework's share, ``fit / DDP``, that this
measures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ray  # noqa: E402

import settle  # noqa: E402
import workload  # noqa: E402
from fit_vs_ddp import as_a_user_runs_fit, run_ddp, run_fit  # noqa: E402

PLAIN = "plain fp32"
SIDES = {"fit": run_fit, "DDP": run_ddp}


def samples_per_s(config: dict, steps: int, seconds: float) -> float:
    """Samples per second of both ranks from a side's (optimizer steps, seconds)."""
    return steps * config.get("accumulate_grad_batches", 1) * workload.BATCH * 2 / seconds


def runs(config: dict, fit_only: bool) -> list[str]:
    """The sides that run ``config``."""
    return ["fit"] if fit_only or config.get("strategy", "ddp") != "ddp" else list(SIDES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=list(workload.FEATURE_CONFIGS), metavar="NAME",
                        help=f"these features only (of: {', '.join(workload.FEATURE_CONFIGS)})")
    parser.add_argument("--fit-only", action="store_true", help="leave the hand-written loop out")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is warm-up, not timed)")
    import torch

    configs = {PLAIN: {}, **{name: workload.FEATURE_CONFIGS[name] for name in args.only or workload.FEATURE_CONFIGS}}
    print(f"torch {torch.__version__}, ray {ray.__version__}, epochs {args.epochs} (timed: 2-{args.epochs}), "
          f"repeats {args.repeats}, batch {workload.BATCH}/worker, 2 workers x 1 thread, sides: Trainer.fit "
          f"(EarlyStopping, ReduceLROnPlateau, TerminateOnNaN, BackupAndRestore)"
          + ("" if args.fit_only else " and the hand-written DDP loop under torchrun")
          + "; each fit starts its own local Ray (RAY_ADDRESS=local); each run after a wait for a quiet machine; "
          "configurations: "
          + "; ".join(f"{name} {config}" for name, config in configs.items()), flush=True)
    as_a_user_runs_fit()
    rates: dict[tuple[str, str], list[float]] = {}
    for i in range(args.repeats):  # interleaved, so drift hits every configuration alike
        names = list(configs)
        for name in names[i % len(names):] + names[:i % len(names)]:
            sides = runs(configs[name], args.fit_only)
            for side in sides[i % len(sides):] + sides[:i % len(sides)]:
                settle.wait_quiet()  # the previous run's processes end before this one starts
                steps, seconds = SIDES[side](args.epochs, configs[name])
                rate = samples_per_s(configs[name], steps, seconds)
                rates.setdefault((name, side), []).append(rate)
                print(f"repeat {i + 1}: {name}, {side}: {steps} optimizer steps in {seconds:.2f}s = "
                      f"{rate:.0f} samples/s", flush=True)
    print(report(configs, rates))


def report(configs: dict[str, dict], rates: dict[tuple[str, str], list[float]]) -> str:
    """A table: each configuration's median rate per side, its cost against plain on that side (median of
    the per-repeat ratios, with their range) and fit / DDP (the same)."""
    def ratio(a: list[float], b: list[float]) -> str:
        paired = [x / y for x, y in zip(a, b)]
        return f"{statistics.median(paired):.3f} ({min(paired):.3f}-{max(paired):.3f})"

    lines = ["", "| configuration | fit samples/s | fit vs plain fit | DDP samples/s | DDP vs plain DDP | fit / DDP |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in configs:
        cells = [name]
        for side in SIDES:
            got = rates.get((name, side))
            if got is None:
                cells += ["-", "-"]
                continue
            cells += [f"{statistics.median(got):.0f} ({min(got):.0f}-{max(got):.0f})",
                      "1" if name == PLAIN else ratio(got, rates[(PLAIN, side)])]
        both = (name, "DDP") in rates
        cells.append(ratio(rates[(name, "fit")], rates[(name, "DDP")]) if both else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
