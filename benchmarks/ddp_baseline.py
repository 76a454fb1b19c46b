"""A hand-written DDP loop over the benchmark workload; run with torchrun --nproc_per_node 2.

Prints one JSON line (rank 0): {"steps": ..., "seconds": ..., "epoch_starts": [...], "epoch_steps": [...],
"end": ...}: optimizer steps and seconds of all the epochs, and each epoch's start (``time.time()``),
its optimizer steps, and the end of the last one, so a caller can time the epochs it chooses.
``--realistic``: the loop a user writes for a GPU job (workload.REALISTIC): DataLoader worker
processes (persistent, for the training and the validation loader alike), bf16 autocast, gradient accumulation with ``no_sync`` on all but the last micro-batch,
and a warm-up + cosine schedule stepped after every optimizer step; ``--config JSON``: any
configuration of workload.py (each feature alone: benchmarks/features.py; not ``strategy``).

:func:`train` is the loop itself; benchmarks/fit_vs_ddp.py also runs it inside Ray Train's
TorchTrainer (the loop a Ray Train user writes, with the model wrapped by ``prepare_model``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

import workload


def share_as(strategy: str | None) -> Callable[[int], None] | None:
    """A loader ``worker_init_fn`` that sets torch's sharing ``strategy`` in each worker (None: torch's default)."""
    if strategy is None:
        return None
    return functools.partial(_set_sharing, strategy)


def _set_sharing(strategy: str, worker_id: int) -> None:
    torch.multiprocessing.set_sharing_strategy(strategy)


def train(ddp: torch.nn.Module, model: torch.nn.Module, epochs: int, config: dict[str, Any],
          on_epoch_end: Callable[[dict[str, Any]], None] | None = None, echo: bool = True) -> dict[str, Any]:
    """Train ``ddp`` (``model`` wrapped in DistributedDataParallel) for ``epochs`` epochs, validating after each.

    Args:
        ddp: The wrapped model; the process group is formed.
        model: The module it wraps (validation calls it directly, as a user does).
        epochs: Epochs to run.
        config: A configuration of workload.py (``{}``: plain fp32; workload.REALISTIC: loader workers,
            bf16 autocast, accumulation, warm-up + cosine).
        on_epoch_end: Called on every rank after each epoch with the timings so far (a Ray Train
            loop reports them). Defaults to nothing.
        echo: Rank 0 prints each epoch's loss and val_loss (a Ray actor's prints reach the driver's
            output, so the Ray actors side turns this off).

    Returns:
        ``{"steps", "seconds", "epoch_starts", "epoch_steps", "end"}`` as printed by this script.
    """
    if config.get("strategy", "ddp") != "ddp":
        raise ValueError(f"the hand-written loop is DDP only, not strategy={config['strategy']!r}")
    accumulate = config.get("accumulate_grad_batches", 1)
    bf16 = config.get("precision", "32-true") == "bf16-mixed"
    rank, world = dist.get_rank(), dist.get_world_size()
    optimizer = workload.make_optimizer(model.parameters())
    train_ds, val_ds = workload.load_data()
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=0)
    workers = config.get("loader_workers", 0)
    loader = DataLoader(train_ds, batch_size=workload.BATCH, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0, worker_init_fn=share_as(config.get("sharing")))
    schedule = workload.warmup_cosine(optimizer, workload.optimizer_steps(epochs, world, config),
                                      config["warmup_steps"]) if "warmup_steps" in config else None
    # validation reads through the same worker processes (as fit's loader_workers and torch's reference examples)
    val_loader = DataLoader(val_ds, batch_size=workload.BATCH,
                            sampler=DistributedSampler(val_ds, num_replicas=world, rank=rank, shuffle=False),
                            num_workers=workers, persistent_workers=workers > 0,
                            worker_init_fn=share_as(config.get("sharing")))
    loss_fn = torch.nn.functional.cross_entropy
    timings: dict[str, Any] = {"epoch_starts": [], "epoch_steps": []}
    dist.barrier()
    start = time.perf_counter()
    for epoch in range(epochs):
        timings["epoch_starts"].append(time.time())
        steps = 0
        sampler.set_epoch(epoch)
        ddp.train()
        total = torch.zeros(3, dtype=torch.float64)
        batches = len(loader) - len(loader) % accumulate  # whole optimizer steps only
        for i, (x, y) in enumerate(loader):
            if i >= batches:
                break
            last = (i + 1) % accumulate == 0
            with (contextlib.nullcontext() if last else ddp.no_sync()), \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = ddp(x)
                loss = loss_fn(out, y)
                (loss / accumulate).backward()
            if last:
                optimizer.step()
                optimizer.zero_grad()
                if schedule is not None:
                    schedule.step()
                steps += 1
            total += torch.stack([loss.detach().double() * len(y),
                                  (out.argmax(1) == y).double().sum(), torch.tensor(len(y), dtype=torch.float64)])
        model.eval()
        vtotal = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            for x, y in val_loader:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = model(x)
                vtotal += torch.stack([loss_fn(out, y).double() * len(y), (out.argmax(1) == y).double().sum(),
                                       torch.tensor(len(y), dtype=torch.float64)])
        dist.all_reduce(total)
        dist.all_reduce(vtotal)
        timings["epoch_steps"].append(steps)
        timings["end"] = time.time()
        if rank == 0 and echo:
            print(f"epoch {epoch + 1}: loss {total[0] / total[2]:.4f} val_loss {vtotal[0] / vtotal[2]:.4f}",
                  flush=True)
        if on_epoch_end is not None:
            on_epoch_end(dict(timings, loss=float(total[0] / total[2]), val_loss=float(vtotal[0] / vtotal[2])))
    timings.update(steps=sum(timings["epoch_steps"]), seconds=time.perf_counter() - start)
    return timings


def train_rank(epochs: int, config: dict[str, Any],
               on_epoch_end: Callable[[dict[str, Any]], None] | None = None, echo: bool = True,
               **init: Any) -> dict[str, Any] | None:
    """One rank of the hand-written job: join the gloo group (``init``: ``init_process_group``'s arguments;
    none under torchrun, which sets the environment), wrap the seeded model in DDP, :func:`train` it
    (``on_epoch_end``, ``echo``: as :func:`train`'s), leave.

    Returns:
        :func:`train`'s timings on rank 0, None on the others.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", **init)
    ddp = None
    try:
        torch.manual_seed(0)
        model = workload.build_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        timings = train(ddp, model, epochs, config, on_epoch_end=on_epoch_end, echo=echo)
        return timings if dist.get_rank() == 0 else None
    finally:
        # the wrapper (its reducer holds the group) goes first: freed at exit, after the group was
        # destroyed, it aborted a rank now and then ("terminate called without an active exception")
        del ddp
        gc.collect()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--realistic", action="store_true")
    parser.add_argument("--config", type=json.loads, default=None, help="a configuration of workload.py, as JSON")
    args = parser.parse_args()
    config = args.config if args.config is not None else workload.REALISTIC if args.realistic else {}
    timings = train_rank(args.epochs, config)
    if timings is not None:
        print(json.dumps(timings), flush=True)


if __name__ == "__main__":
    main()
