"""A hand-written DDP loop over the benchmark workload; run with torchrun --nproc_per_node 2.

Prints one JSON line (rank 0): {"steps": ..., "seconds": ...} for the timed epochs (optimizer steps).
``--realistic``: the loop a user writes for a GPU job (workload.REALISTIC): DataLoader worker
processes, bf16 autocast, gradient accumulation with ``no_sync`` on all but the last micro-batch,
and a warm-up + cosine schedule stepped after every optimizer step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import workload


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--realistic", action="store_true")
    args = parser.parse_args()
    real = workload.REALISTIC if args.realistic else {}
    accumulate = real.get("accumulate_grad_batches", 1)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = workload.build_model()
    ddp = DistributedDataParallel(model)
    optimizer = workload.make_optimizer(model.parameters())
    train, val = workload.load_data()
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0)
    workers = real.get("loader_workers", 0)
    loader = DataLoader(train, batch_size=workload.BATCH, sampler=sampler, num_workers=workers,
                        persistent_workers=workers > 0)
    schedule = workload.warmup_cosine(optimizer, workload.optimizer_steps(args.epochs, world)) if real else None
    val_loader = DataLoader(val, batch_size=workload.BATCH,
                            sampler=DistributedSampler(val, num_replicas=world, rank=rank, shuffle=False))
    loss_fn = torch.nn.functional.cross_entropy
    steps = 0
    dist.barrier()
    start = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        total = torch.zeros(3, dtype=torch.float64)
        batches = len(loader) - len(loader) % accumulate  # whole optimizer steps only
        for i, (x, y) in enumerate(loader):
            if i >= batches:
                break
            last = (i + 1) % accumulate == 0
            with (contextlib.nullcontext() if last else ddp.no_sync()), \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(real)):
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
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(real)):
                    out = model(x)
                vtotal += torch.stack([loss_fn(out, y).double() * len(y), (out.argmax(1) == y).double().sum(),
                                       torch.tensor(len(y), dtype=torch.float64)])
        dist.all_reduce(total)
        dist.all_reduce(vtotal)
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {total[0] / total[2]:.4f} val_loss {vtotal[0] / vtotal[2]:.4f}",
                  flush=True)
    seconds = time.perf_counter() - start
    if rank == 0:
        print(json.dumps({"steps": steps, "seconds": seconds}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
