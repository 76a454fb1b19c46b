"""Steps/s of Trainer.fit (2 workers, EarlyStopping + ReduceLROnPlateau + TerminateOnNaN) against a
hand-written DDP loop under torchrun, same model, data, batch size and threads, in one run.

    python benchmarks/fit_vs_ddp.py [--epochs 3] [--repeats 5] [--realistic]

``--realistic`` runs both sides as a GPU job is configured (workload.REALISTIC): ``loader_workers=2``,
``"bf16-mixed"``, ``accumulate_grad_batches=2`` and a warm-up + cosine schedule stepped per optimizer
step; the hand-written loop does the same with DataLoader workers, autocast, ``no_sync`` and
``LambdaLR``. Steps are optimizer steps on both sides.

Both sides are timed from the start of the first epoch to the end of the last one (validation
included); process start-up and group formation are excluded on both sides.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ray  # noqa: E402

import workload  # noqa: E402
from orchestrator import Trainer, callbacks  # noqa: E402


def run_fit(epochs: int, realistic: bool) -> tuple[int, float]:
    real = workload.REALISTIC if realistic else {}
    extra = {} if not real else dict(
        loader_workers=real["loader_workers"], precision=real["precision"],
        accumulate_grad_batches=real["accumulate_grad_batches"], lr_scheduler_interval="step",
        lr_scheduler=functools.partial(workload.warmup_cosine, total_steps=workload.optimizer_steps(epochs)))
    folder = tempfile.mkdtemp(prefix="fit-vs-ddp-")
    trainer = Trainer(
        storage=folder, run_name="bench",  # a new run each time
        model=workload.build_model, optimizer=workload.make_optimizer,
        loss=__import__("torch").nn.functional.cross_entropy, data=workload.load_data,
        metrics=["accuracy"], batch_size=workload.BATCH, num_workers=2, threads_per_worker=1,
        callbacks=[callbacks.EarlyStopping(monitor="val_loss", patience=100),
                   callbacks.ReduceLROnPlateau(monitor="val_loss", patience=100),
                   callbacks.TerminateOnNaN()],
        **extra,
    )
    try:
        history = trainer.fit(epochs=epochs, verbose=0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    begin = next(e["time"] for e in history.events if e["type"] == "epoch_begin")
    end = [e["time"] for e in history.events if e["type"] == "epoch_end"][-1]
    return history.results[0].steps_run, end - begin


def run_ddp(epochs: int, realistic: bool) -> tuple[int, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(HERE / "ddp_baseline.py"), "--epochs", str(epochs)] + (["--realistic"] if realistic else []),
        env=env, capture_output=True, text=True, check=True, timeout=600,
    )
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    result = json.loads(line)
    return result["steps"], result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--realistic", action="store_true", help="loader workers, bf16, accumulation, cosine")
    args = parser.parse_args()
    import torch
    print(f"torch {torch.__version__}, ray {ray.__version__}, epochs {args.epochs}, repeats {args.repeats}, "
          f"batch {workload.BATCH}/worker, 2 workers x 1 thread, "
          f"config {workload.REALISTIC if args.realistic else 'plain fp32, 1 micro-batch, constant lr'}", flush=True)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}})
    rows = []
    try:
        for i in range(args.repeats):  # interleaved, so drift hits both sides alike
            fs, ft = run_fit(args.epochs, args.realistic)
            ds, dt = run_ddp(args.epochs, args.realistic)
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
