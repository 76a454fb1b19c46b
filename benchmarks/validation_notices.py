"""Time of a validation pass that watches for preemption notices: checked every round against the default pace.

    python benchmarks/validation_notices.py [--repeats 30] [--batch 64]

Two ranks in a real gloo group (processes spawned here, no Ray), one thread each, validate the
benchmark workload's model (benchmarks/workload.py: MLP 256-512-512-10) on its validation set
(2,048 samples: 16 rounds of 64 per rank) with :class:`~orchestrator.loop.validation.Validation`, as
every rank of ``fit`` does after each epoch while training goes on (``watch=True``). The passes
alternate between ``notice_every_s=0`` (every round all-reduces the notices and reads the result:
how every pass ran before the default pace) and the default (rounds 0 and 1, then about every
``NOTICE_EVERY_S`` seconds). Prints the median pass of each, their ratio and the checks each made.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _rank(rank: int, store: str, repeats: int, batch: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)  # no port to race for
    try:
        import workload
        from orchestrator.loop.validation import NOTICE_EVERY_S, Validation

        torch.manual_seed(0)
        model = workload.build_model()
        _, val = workload.load_data()
        notice = threading.Event()

        def step(m: torch.nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {"loss": torch.nn.functional.cross_entropy(m(b[0]), b[1])}

        times: dict[float, list[float]] = {0.0: [], NOTICE_EVERY_S: []}
        checks: dict[float, int] = {}
        for _ in range(repeats):
            for every in times:
                v = Validation(val, rank=rank, world_size=2, batch_size=batch, seed=0, device=torch.device("cpu"),
                               preemption=notice, beat=lambda: None, notice_every_s=every)
                dist.barrier()
                began = time.perf_counter()
                v.run(model, step, watch=True)
                times[every].append(time.perf_counter() - began)
                checks[every] = v.checks
        if rank == 0:
            out.put({"rounds": v.rounds, "every": NOTICE_EVERY_S,
                     "median": {k: statistics.median(x) for k, x in times.items()},
                     "spread": {k: (min(x), max(x)) for k, x in times.items()}, "checks": checks})
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="passes of each kind (alternating)")
    parser.add_argument("--batch", type=int, default=64, help="validation batch size per rank")
    args = parser.parse_args()
    print(f"python {platform.python_version()}, torch {torch.__version__}, 2 gloo ranks x 1 thread, "
          f"batch {args.batch}/rank, {args.repeats} passes of each, alternating", flush=True)
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="validation-notices-") as folder:
        procs = [ctx.Process(target=_rank, args=(r, f"{folder}/store", args.repeats, args.batch, out))
                 for r in range(2)]
        for p in procs:
            p.start()
        got = out.get()
        for p in procs:
            p.join(120)
    every, rounds = got["every"], got["rounds"]
    for key, label in ((0.0, "every round"), (every, f"default pace ({every:g} s)")):
        low, high = got["spread"][key]
        print(f"notices checked {label}: median pass {got['median'][key] * 1e3:.1f} ms "
              f"(min {low * 1e3:.1f}, max {high * 1e3:.1f}), {got['checks'][key]} checks in {rounds} rounds")
    print(f"default / every round: {got['median'][every] / got['median'][0.0]:.2f}")


if __name__ == "__main__":
    main()
