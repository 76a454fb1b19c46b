"""GPU smoke run: bf16-mixed + gradient accumulation + a backup and a restore, through Trainer, on the
GPUs this machine has (one worker per GPU, nccl); prints steps/s and peak GPU memory.

    python benchmarks/gpu_smoke.py [--epochs 3] [--compile]

Starts its own local Ray instance (as the README's demo does). Rank 0 raises once, mid-run, so the
run restarts (max_failures=1) and restores from its newest backup (BackupAndRestore(save_freq=...));
the script fails (exit 1) unless a backup was committed and a restore happened. steps/s is the median
over the epochs that ran without a failure (validation included). On a machine without a CUDA GPU it
says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

FEATURES, HIDDEN, CLASSES = 1024, 4096, 16
SAMPLES, BATCH, ACCUMULATE = 65536, 256, 2
SAVE_FREQ = 20  # optimizer steps between backups
FAIL_AT_CALL = 3 * SAVE_FREQ * ACCUMULATE + 5  # rank 0's training call that raises (once)


def build_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.GELU(), torch.nn.Linear(HIDDEN, HIDDEN),
                               torch.nn.GELU(), torch.nn.Linear(HIDDEN, CLASSES))


def make_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-3)


def load_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    y = (x[:, :CLASSES] * 3).argmax(1)  # learnable
    split = SAMPLES * 7 // 8
    return torch.utils.data.TensorDataset(x[:split], y[:split]), torch.utils.data.TensorDataset(x[split:], y[split:])


def failing_step(flag_path: str):
    """The cross-entropy step, logging the peak GPU memory; rank 0 raises once while ``flag_path`` exists."""
    calls = {"n": 0}

    def train_step(model, batch):
        import torch.distributed as dist

        inputs, targets = batch
        if model.training:
            if dist.get_rank() == 0 and calls["n"] == FAIL_AT_CALL and os.path.exists(flag_path):
                os.remove(flag_path)
                raise RuntimeError(f"gpu_smoke: injected failure at training call {FAIL_AT_CALL}")
            calls["n"] += 1
        outputs = model(inputs)
        peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30)
        return {"loss": torch.nn.functional.cross_entropy(outputs.float(), targets), "peak_gib": peak,
                "batch_size": len(targets)}

    return train_step


def _epoch_rates(events: list[dict], steps_per_epoch: int) -> list[float]:
    """steps/s of every epoch whose begin and end are in the same attempt."""
    begins = {(e.get("attempt"), e["epoch"]): e["time"] for e in events if e["type"] == "epoch_begin"}
    return [steps_per_epoch / (e["time"] - begins[(e.get("attempt"), e["epoch"])]) for e in events
            if e["type"] == "epoch_end" and (e.get("attempt"), e["epoch"]) in begins]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also pass compile=True")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to run, "
              "skipping (exit 0)")
        return 0

    import ray

    from orchestrator import Trainer, callbacks

    gpus = torch.cuda.device_count()
    names = sorted({torch.cuda.get_device_name(i) for i in range(gpus)})
    print(f"gpu_smoke: {gpus} GPU(s): {', '.join(names)}; torch {torch.__version__}", flush=True)
    ray.init(num_gpus=gpus, num_cpus=max(2, gpus * 2), include_dashboard=False, logging_level="WARNING")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            flag = os.path.join(tmp, "fail-once")
            Path(flag).touch()
            trainer = Trainer(
                model=build_model, optimizer=make_optimizer, data=load_data, train_step=failing_step(flag),
                batch_size=BATCH, num_workers=gpus, use_gpu=True, precision="bf16-mixed",
                accumulate_grad_batches=ACCUMULATE, storage=os.path.join(tmp, "runs"), run_name="gpu-smoke",
                callbacks=[callbacks.BackupAndRestore(save_freq=SAVE_FREQ)], max_failures=1,
                resources_per_worker={"CPU": 1, "GPU": 1}, compile=args.compile)
            history = trainer.fit(epochs=args.epochs, verbose=2)
    finally:
        ray.shutdown()
    events = history.events
    kinds = [e["type"] for e in events]
    steps_per_epoch = next(e["steps"] for e in events if e["type"] == "train_begin")
    rates = _epoch_rates(events, steps_per_epoch)
    restored = [e for e in events if e["type"] == "restored"]
    peak = max(history.history.get("peak_gib", [float("nan")]))
    print(f"gpu_smoke: precision=bf16-mixed accumulate_grad_batches={ACCUMULATE} batch_size={BATCH} x {gpus} GPU(s), "
          f"compile={args.compile}")
    print(f"gpu_smoke: steps/s (optimizer steps, median of {len(rates)} clean epochs): "
          f"{statistics.median(rates) if rates else float('nan'):.2f}")
    print(f"gpu_smoke: peak GPU memory (rank 0, torch.cuda.max_memory_allocated): {peak:.2f} GiB")
    print(f"gpu_smoke: backups committed: {kinds.count('backup_committed')}, workers failed: "
          f"{kinds.count('worker_failed')}, restored from: {[e.get('folder') for e in restored]}")
    print(f"gpu_smoke: final loss {history.history['loss'][-1]:.4f}, val_loss {history.history['val_loss'][-1]:.4f}")
    ok = kinds.count("backup_committed") > 0 and any(e.get("step", 0) > 0 for e in restored)
    print("gpu_smoke: OK" if ok else "gpu_smoke: FAILED (no backup was committed or no restore happened)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
