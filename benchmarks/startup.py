"""Start-up: from the command's start to the first completed training step, for Trainer.fit, torchrun
and Ray Train v2's TorchTrainer, each started as a fresh process the way a user starts it.

    python benchmarks/startup.py [--repeats 6] [--steps 8] [--source DIR ...] [--skip torchrun]

Each repeat runs the three sides one after another, each as a new process (benchmarks/startup_child.py),
in an order that goes through every permutation of the sides (benchmarks/settle.py: drift and a warm page
cache hit every side alike, and no side always starts right after the same other one, whose Ray may still
be ending), each once the machine is quiet again (at most 30 s):

- this project: ``python startup_child.py fit``: a script calling ``Trainer(...).fit(...)`` with no
  Ray running, so ``fit`` starts its own local Ray, as README describes;
- torchrun: ``torchrun --standalone --nproc_per_node 2 startup_child.py torchrun``, a hand-written
  DDP loop (PyTorch's own launcher: no Ray, no fault tolerance);
- Ray Train v2: ``python startup_child.py ray-train``: a script calling ``TorchTrainer(...).fit()``
  with no Ray running, so Ray Train starts its local Ray, as its quickstart does.

Start-up is timed with one clock (one machine): from just before the process is created to the time
rank 0 wrote when its first optimizer step completed. The process's whole run (to its exit, Ray's
shutdown included) is printed beside it. ``--source`` names checkouts whose ``orchestrator`` package
the fit side imports (default: this one): each is a side of its own, so that two versions are
compared interleaved under the same conditions; ``--skip`` leaves sides out (``torchrun``, ``ray-train``).
Same model, data and batch on every side: benchmarks/workload.py,
batch 64 per worker, 2 workers with 1 thread each, ``--steps`` steps. ``RAY_ADDRESS=local`` is set
for the children, so neither Ray side joins a Ray cluster that something else started on this machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import settle  # noqa: E402

CHILD = HERE / "startup_child.py"
TARGET = 0.5  # this project's start-up at most half of Ray Train's

FIT = "orchestrator fit"
SIDES = {
    FIT: lambda stamp, steps: [sys.executable, str(CHILD), "fit", stamp, "--steps", str(steps)],
    "torchrun DDP": lambda stamp, steps: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node", "2", str(CHILD), "torchrun", stamp,
                                          "--steps", str(steps)],
    "Ray Train v2": lambda stamp, steps: [sys.executable, str(CHILD), "ray-train", stamp, "--steps", str(steps)],
}


def start_once(side: str, folder: str, steps: int, timeout_s: float, source: Path = HERE.parent) -> tuple[float, float]:
    """Run one side as a fresh process (the fit side importing ``source``'s package): (seconds to its
    first completed step, seconds to its exit)."""
    stamp = os.path.join(folder, f"{side.split()[0]}-{time.monotonic_ns()}")
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_ADDRESS="local", RAY_TRAIN_V2_ENABLED="1",
               PYTHONPATH=os.pathsep.join([str(HERE), str(source)]))
    began = time.time()
    done = subprocess.run(SIDES[side.split(" (")[0]](stamp, steps), env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    ended = time.time()
    if done.returncode != 0 or not os.path.exists(stamp):
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise RuntimeError(f"{side} exited {done.returncode} without a completed step:\n{tail}")
    first = float(Path(stamp).read_text().split()[0])
    return first - began, ended - began


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} s (min {min(values):.2f}, max {max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6,
                        help="start-ups of each side (default 6: with three sides, each order once)")
    parser.add_argument("--steps", type=int, default=8, help="training steps each side runs (default 8)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one start may take (default 300)")
    parser.add_argument("--source", nargs="+", type=Path, default=[HERE.parent],
                        help="checkouts whose orchestrator package the fit side imports, each a side "
                             "(default: this one)")
    parser.add_argument("--skip", nargs="+", choices=("torchrun", "ray-train"), default=[],
                        help="sides to leave out")
    args = parser.parse_args()
    sources = {FIT if len(args.source) == 1 else f"{FIT} ({s})": s.resolve() for s in args.source}
    for s in sources.values():
        if not (s / "orchestrator" / "__init__.py").exists():
            parser.error(f"--source {s}: no orchestrator package there")
    print(f"python {platform.python_version()}, torch {version('torch')}, ray {version('ray')} (Ray Train v2: "
          f"RAY_TRAIN_V2_ENABLED=1), {os.cpu_count()} CPUs; {args.repeats} repeats, sides in every order in turn, "
          "each after a wait for a quiet machine; "
          "workload MLP 256-512-512-10, batch 64 per worker, 2 workers x 1 thread (OMP_NUM_THREADS=1), "
          f"{args.steps} steps; timed from process creation to rank 0's first completed optimizer step", flush=True)
    skipped = {"torchrun": "torchrun DDP", "ray-train": "Ray Train v2"}
    names = list(sources) + [n for n in SIDES if n != FIT and n not in {skipped[k] for k in args.skip}]
    first: dict[str, list[float]] = {n: [] for n in names}
    total: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as folder:
        for i, order in enumerate(settle.side_orders(names, args.repeats)):
            for side in order:
                settle.wait_quiet()  # the previous side's Ray has ended: its exit takes no CPU from this start
                to_step, to_exit = start_once(side, folder, args.steps, args.timeout,
                                              sources.get(side, HERE.parent))
                first[side].append(to_step)
                total[side].append(to_exit)
            print(f"repeat {i + 1} ({' -> '.join(order)}): " + " | ".join(
                f"{n} {first[n][-1]:.2f} s (exit {total[n][-1]:.2f} s)" for n in names), flush=True)
    print(f"\nmedian of {args.repeats} (min, max)")
    print(f"{'side':<18}{'to the first step':>36}{'to the exit':>36}")
    for n in names:
        print(f"{n:<18}{spread(first[n]):>36}{spread(total[n]):>36}")
    for fit in sources:
        ours = first[fit]
        if "Ray Train v2" in first:
            ray_train = first["Ray Train v2"]
            ratio = statistics.median(ours) / statistics.median(ray_train)
            pairs = [o / r for o, r in zip(ours, ray_train)]
            print(f"start-up ratio {fit} / Ray Train v2: {ratio:.2f} (repeats {min(pairs):.2f}-{max(pairs):.2f}); "
                  f"target <= {TARGET}: {'OK' if ratio <= TARGET else 'MISS'}")
        if "torchrun DDP" in first:
            ddp = statistics.median(first["torchrun DDP"])
            print(f"start-up ratio {fit} / torchrun: {statistics.median(ours) / ddp:.2f}")


if __name__ == "__main__":
    main()
