"""Sharded (``strategy="fsdp"``) against replicated (``"ddp"``) backups on 2 CPU ranks (gloo).

Run::

    python benchmarks/fsdp_backup.py [--params-millions 50] [--world-size 2] [--repeats 3]

For a stack of ``nn.Linear`` layers with about ``--params-millions`` parameters (float32) and
``torch.optim.Adam`` (one step taken, so ``exp_avg`` / ``exp_avg_sq`` exist), each rank builds the
model as the training loop does (``shard_model`` + per-layer units, or DDP), then runs the loop's
own :class:`~orchestrator.loop.saver.RankSaver` backups into a local run directory and prints, per rank:

- **stall**: ``RankSaver.backup`` until it returns (staging this rank's state into CPU buffers, the
  only part training waits for; median of the 2nd and later saves, which reuse the buffers), and the
  memcpy time of the same bytes (``dst.copy_(src)`` into preallocated buffers) for the target
  "stall <= 1.5x the memcpy of that rank's shard";
- **persist**: ``backup`` -> ``flush`` (the background write: DCP for fsdp, ``torch.save`` for ddp;
  median);
- **state bytes**: this rank's model + optimizer state in memory (its local shards under fsdp);
- **bytes written**: the sizes of the files this rank reported to the coordinator (target for fsdp:
  about 1/N of the total).

Everything goes to stdout.
"""

from __future__ import annotations

import argparse
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.decisions import Backup  # noqa: E402
from orchestrator.loop.fsdp import local, shard_model  # noqa: E402
from orchestrator.loop.rank_state import MetricSums, Position, Snapshots, rank_components  # noqa: E402
from orchestrator.loop.saver import RankSaver  # noqa: E402
from orchestrator.loop.sharded_state import ShardedSnapshots, sharded_components  # noqa: E402
from orchestrator.loop.specs import LoopResult  # noqa: E402
from orchestrator.storage.fs import StorageSpec  # noqa: E402

WIDTH = 2048


def build(params_millions: float) -> torch.nn.Module:
    layers = max(1, round(params_millions * 1e6 / (WIDTH * WIDTH + WIDTH)))
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])


def _tensors(node: Any) -> list[torch.Tensor]:
    if isinstance(node, torch.Tensor):
        return [local(node)]
    if isinstance(node, dict):
        return [t for v in node.values() for t in _tensors(v)]
    if isinstance(node, (list, tuple)):
        return [t for v in node for t in _tensors(v)]
    return []


def _memcpy_s(tensors: list[torch.Tensor], repeats: int) -> float:
    dst = [torch.empty_like(t) for t in tensors]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for d, t in zip(dst, tensors):
            d.copy_(t)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rank_main(rank: int, world: int, port: int, strategy: str, params_millions: float, repeats: int, root: str,
              out: Any) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(params_millions)
    if strategy == "fsdp":
        shard_model(model, (torch.nn.Linear,), torch.device("cpu"))
        trained: torch.nn.Module = model
    else:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    trained(torch.randn(4, WIDTH)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    snapshots = ShardedSnapshots() if strategy == "fsdp" else Snapshots()
    components = rank_components(model, optimizer, snapshots=snapshots, position=Position(),
                                 metric_sums=MetricSums(torch.device("cpu")), result=LoopResult(rank=rank))
    group = None
    if strategy == "fsdp":
        components.update(sharded_components(model, optimizer, snapshots))
        group = dist.new_group(backend="gloo")
    state_tensors = _tensors({n: c.stateful.state_dict() for n, c in components.items() if n in ("model", "optimizer")})
    state_bytes = sum(t.numel() * t.element_size() for t in state_tensors)
    reports: list[Any] = []
    storage = StorageSpec(f"file://{root}", strategy).open()
    saver = RankSaver(components, rank, world, storage, on_persisted=lambda *a: reports.append(a), group=group,
                      model=model)
    stalls, persists, written = [], [], 0
    position = Position()
    for i in range(repeats + 1):
        position.advance(0, i)
        dist.barrier()
        start = time.perf_counter()
        saver.backup(Backup(backup_dir="backup", keep=1, coordinator_state={}, write=i), position)
        stalled = time.perf_counter() - start
        saver.flush()
        persisted = time.perf_counter() - start
        entries = reports[-1][2]
        if entries is None:
            raise RuntimeError(f"backup failed: {reports[-1][3]}")
        written = sum(e.size for e in entries)
        if i > 0:  # the first save allocates the staging buffers
            stalls.append(stalled)
            persists.append(persisted)
    memcpy = _memcpy_s(state_tensors, max(repeats, 3))
    out.put({"strategy": strategy, "rank": rank, "stall_s": statistics.median(stalls), "memcpy_s": memcpy,
             "persist_s": statistics.median(persists), "state_bytes": state_bytes, "written_bytes": written})
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params-millions", type=float, default=50.0)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = build(args.params_millions)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}, "
          f"{torch.get_num_threads()} threads available, 1 torch thread per rank")
    print(f"model: {n_params / 1e6:.1f}M float32 parameters ({n_params * 4 / 2**20:.0f} MiB; with Adam's two moments "
          f"{n_params * 12 / 2**20:.0f} MiB of model + optimizer state), {args.world_size} ranks (gloo), "
          f"{args.repeats} timed backups after a first one, local file:// run directory")
    ctx = mp.get_context("spawn")
    rows = []
    for strategy in ("ddp", "fsdp"):
        queue = ctx.Queue()
        with tempfile.TemporaryDirectory() as root:
            mp.start_processes(rank_main, args=(args.world_size, _port(), strategy, args.params_millions,
                                                args.repeats, root, queue), nprocs=args.world_size,
                               start_method="spawn")
        rows += sorted((queue.get() for _ in range(args.world_size)), key=lambda r: r["rank"])
    mib = 2**20
    print(f"{'strategy':>8} {'rank':>4} {'state MiB':>10} {'stall s':>8} {'memcpy s':>9} {'stall/memcpy':>12} "
          f"{'persist s':>10} {'written MiB':>12} {'share':>6}")
    for strategy in ("ddp", "fsdp"):
        mine = [r for r in rows if r["strategy"] == strategy]
        total = sum(r["written_bytes"] for r in mine)
        for r in mine:
            print(f"{strategy:>8} {r['rank']:>4} {r['state_bytes'] / mib:>10.1f} {r['stall_s']:>8.3f} "
                  f"{r['memcpy_s']:>9.3f} {r['stall_s'] / r['memcpy_s']:>12.2f} {r['persist_s']:>10.3f} "
                  f"{r['written_bytes'] / mib:>12.1f} {r['written_bytes'] / total:>6.2f}")


if __name__ == "__main__":
    main()
