"""The fit loop beside the hand-written DDP loop on two ranks, without Ray: wall time per step.

    python benchmarks/two_ranks.py [--configs plain realistic] [--steps N] [--blocks 10] [--warmup 2]
                                    [--hand-sharing file_system]

benchmarks/rank_overhead.py's alternating blocks (hand fit fit hand ...: each block ``--steps``
optimizer steps of one loop, the hand blocks run inside the fit loop's sync points, so both loops
take turns in the same processes under the same load), on a two-rank gloo group of two processes
(``torch.multiprocessing``, file:// store in a temporary folder, 1 torch thread each). A block is
timed by the wall clock, not a thread's CPU time: with two ranks a step also waits for the slower
rank in the gradient all-reduce, and that wait is part of what a loop costs.

What this leaves out, against benchmarks/fit_vs_ddp.py: Ray. The ranks here are plain processes
with no Ray worker threads, no coordinator, raylet, gcs or agents beside them, so the ratio printed
is the loop's own share of fit's gap to the hand-written loop (its per-step work and its collectives);
fit_vs_ddp.py's ratio adds what the Ray processes take from the cores (benchmarks/overhead.py).

Configurations: ``plain`` (fp32, one micro-batch, constant rate; 128 steps a block) and ``realistic``
(workload.REALISTIC: loader workers, bf16 autocast, accumulation, warm-up + cosine; 32 steps a
block, about 3 s). Prints, from rank 0, for each configuration each loop's median wall time per
optimizer step over the timed blocks, their ratio as steps/s, and the median and range of the
ratio over neighbouring block pairs; then the same for rank 0's training thread's CPU time per step
(less noisy than the wall clock, and what each loop itself costs beside the waits).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rank_overhead  # noqa: E402
import workload  # noqa: E402

WORLD_SIZE = 2
#: Optimizer steps per block by configuration: a block of about 1.5-3 s on a 2-core machine.
STEPS = {"plain": 128, "realistic": 32}


def rank_main(rank: int, store: str, config: str, steps: int, args: argparse.Namespace) -> None:
    """One rank: join the group, run the alternating blocks, print the figures on rank 0."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        link = rank_overhead.run(steps, args.blocks, args.warmup, realistic=config == "realistic", rank=rank,
                                 world_size=WORLD_SIZE, clock=time.perf_counter, hand_sharing=args.hand_sharing)
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return
    hand, fit = statistics.median(link.hand_times), statistics.median(link.fit_times)
    pairs = [h / f for h, f in zip(link.hand_times, link.fit_times)]
    settings = workload.REALISTIC if config == "realistic" else "plain fp32, 1 micro-batch, constant lr"
    print(f"\n{config} ({settings}), {steps} steps a block; wall time per optimizer step, median over blocks (ms):")
    print(f"  hand-written DDP loop  {hand * 1e3:.3f}  (blocks: min {min(link.hand_times) * 1e3:.3f}, "
          f"max {max(link.hand_times) * 1e3:.3f})")
    print(f"  TrainLoop (fit)        {fit * 1e3:.3f}  (blocks: min {min(link.fit_times) * 1e3:.3f}, "
          f"max {max(link.fit_times) * 1e3:.3f})")
    print(f"  steps/s fit / hand     {hand / fit:.3f}  (block pairs: median {statistics.median(pairs):.3f}, "
          f"min {min(pairs):.3f}, max {max(pairs):.3f})")
    hand_cpu, fit_cpu = statistics.median(link.hand_cpu), statistics.median(link.fit_cpu)
    cpu_pairs = [f / h for h, f in zip(link.hand_cpu, link.fit_cpu)]
    print(f"  rank 0's training thread, CPU per step (ms): hand {hand_cpu * 1e3:.3f}, fit {fit_cpu * 1e3:.3f}, "
          f"fit / hand {fit_cpu / hand_cpu:.3f} (block pairs: median {statistics.median(cpu_pairs):.3f}, "
          f"min {min(cpu_pairs):.3f}, max {max(cpu_pairs):.3f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=list(STEPS), default=list(STEPS), help="configurations to run")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps per block (default: {STEPS})")
    parser.add_argument("--blocks", type=int, default=10, help="timed blocks of each loop")
    parser.add_argument("--warmup", type=int, default=2, help="untimed blocks of each loop first")
    parser.add_argument("--hand-sharing", choices=["file_descriptor", "file_system"], default=None,
                        help="realistic: the hand-written loop's loader workers use this torch sharing strategy "
                        "(default: torch's; fit's use file_system): like for like with file_system")
    args = parser.parse_args()
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs; {WORLD_SIZE} ranks x 1 torch thread (gloo, file:// store, no Ray)")
    print(f"settings: timed blocks {args.blocks} of each loop (after {args.warmup} warm-up), model MLP "
          f"{workload.FEATURES}-512-512-{workload.CLASSES}, batch {workload.BATCH} per rank, SGD lr {workload.LR} "
          f"momentum 0.9, metrics: accuracy; configurations: {', '.join(args.configs)}; realistic loader workers' sharing "
          f"strategy: fit file_system, hand-written loop {args.hand_sharing or 'torch default'}", flush=True)
    for config in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(rank_main, args=(f"{tmp}/store", config, args.steps or STEPS[config], args), nprocs=WORLD_SIZE)


if __name__ == "__main__":
    main()
