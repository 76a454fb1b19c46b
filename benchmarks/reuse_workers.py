"""Fits in one driver, one after another: workers reused across fits (the default) against a cold start each time.

    python benchmarks/reuse_workers.py [--fits 7] [--workers 2]

The driver starts Ray itself with ``ray.init`` (reuse only applies on a Ray the driver keeps, as in
a notebook or a Ray job running several fits), then runs ``--fits`` fits of benchmarks/workload.py's
model and data for one short epoch (512 samples per worker set), in rounds: per round ``--fits``
fits with ``reuse_workers=False``, then ``--fits`` with ``reuse_workers=True`` (a cold fit releases
the parked workers, so the two kinds cannot alternate fit by fit). Each fit is timed from the
``fit`` call to its return; medians and spread are printed. The first reused fit of each round is
left out: it starts cold.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray  # noqa: E402
import torch  # noqa: E402

import workload  # noqa: E402
from orchestrator import Trainer  # noqa: E402


def small_data():
    train, _ = workload.load_data()
    x, y = train.tensors
    return torch.utils.data.TensorDataset(x[:512], y[:512]), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fits", type=int, default=6, help="fits of each kind per round (default 6)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="workers per fit (default 2)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, ray {ray.__version__}; "
          f"{args.rounds} rounds of {args.fits} fits of each kind, {args.workers} workers, 1 CPU each, batch 64, "
          "512 samples, one epoch, no validation")
    ray.init(include_dashboard=False, logging_level="WARNING")
    storage = tempfile.mkdtemp(prefix="reuse-workers-")
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.rounds):
        for reuse in (False, True):
            for i in range(args.fits):
                trainer = Trainer(model=workload.build_model, optimizer=workload.make_optimizer,
                                  loss=torch.nn.functional.cross_entropy, data=small_data, batch_size=64,
                                  num_workers=args.workers, storage=storage, run_name=f"fit-{r}-{reuse}-{i}",
                                  reuse_workers=reuse)
                start = time.perf_counter()
                trainer.fit(epochs=1, verbose=0)
                if not (reuse and i == 0):  # the first fit of a reused block starts cold
                    times[reuse].append(time.perf_counter() - start)
    ray.shutdown()
    for reuse, label in ((True, "reuse_workers=True "), (False, "reuse_workers=False")):
        t = times[reuse]
        print(f"{label}: median {statistics.median(t):.2f} s per fit (min {min(t):.2f}, max {max(t):.2f}, "
              f"{len(t)} fits)")
    print(f"ratio (cold / reused): {statistics.median(times[False]) / statistics.median(times[True]):.1f}x")


if __name__ == "__main__":
    main()
