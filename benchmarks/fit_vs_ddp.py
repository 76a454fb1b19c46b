"""Steps/s of Trainer.fit (2 workers, EarlyStopping + ReduceLROnPlateau + TerminateOnNaN) against a
hand-written DDP loop under torchrun, same model, data, batch size and threads, in one run.

    python benchmarks/fit_vs_ddp.py [--epochs 3] [--repeats 2]

Both sides are timed from the start of the first epoch to the end of the last one (validation
included); process start-up and group formation are excluded on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ray  # noqa: E402

import workload  # noqa: E402
from orchestrator import Trainer, callbacks  # noqa: E402


def run_fit(epochs: int) -> tuple[int, float]:
    trainer = Trainer(
        model=workload.build_model, optimizer=workload.make_optimizer,
        loss=__import__("torch").nn.functional.cross_entropy, data=workload.load_data,
        metrics=["accuracy"], batch_size=workload.BATCH, num_workers=2, threads_per_worker=1,
        callbacks=[callbacks.EarlyStopping(monitor="val_loss", patience=100),
                   callbacks.ReduceLROnPlateau(monitor="val_loss", patience=100),
                   callbacks.TerminateOnNaN()],
    )
    history = trainer.fit(epochs=epochs, verbose=0)
    begin = next(e["time"] for e in history.events if e["type"] == "epoch_begin")
    end = [e["time"] for e in history.events if e["type"] == "epoch_end"][-1]
    return history.results[0].steps_run, end - begin


def run_ddp(epochs: int) -> tuple[int, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(HERE / "ddp_baseline.py"), "--epochs", str(epochs)],
        env=env, capture_output=True, text=True, check=True, timeout=600,
    )
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    result = json.loads(line)
    return result["steps"], result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}})
    rows = []
    try:
        for i in range(args.repeats):  # interleaved, so drift hits both sides alike
            fs, ft = run_fit(args.epochs)
            ds, dt = run_ddp(args.epochs)
            rows.append((fs / ft, ds / dt))
            print(f"repeat {i + 1}: fit {fs} steps in {ft:.2f}s = {fs / ft:.1f} steps/s | "
                  f"torchrun DDP {ds} steps in {dt:.2f}s = {ds / dt:.1f} steps/s | ratio {fs / ft / (ds / dt):.3f}",
                  flush=True)
    finally:
        ray.shutdown()
    fit_best = max(r[0] for r in rows)
    ddp_best = max(r[1] for r in rows)
    paired = sorted(f / d for f, d in rows)
    median = paired[len(paired) // 2] if len(paired) % 2 else (paired[len(paired) // 2 - 1] + paired[len(paired) // 2]) / 2
    print(f"best of {args.repeats}: fit {fit_best:.1f} steps/s, DDP {ddp_best:.1f} steps/s, "
          f"ratio {fit_best / ddp_best:.3f}")
    print(f"median of the {args.repeats} interleaved pair ratios: {median:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
