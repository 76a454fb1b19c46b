"""A user's script: Trainer.fit with no Ray running, so fit starts (and stops) its own local Ray.

    python tests/entries/own_ray_fit.py STORAGE

Each worker prints a line from the model factory (with its process's niceness and its malloc arena
limit) and notes its process in a folder; the script prints what it checked after fit (Ray stopped,
and none of the noted worker processes still running).
"""

from __future__ import annotations

import os
import sys

import torch

from orchestrator import Trainer
from orchestrator.core.processes import Proc


def build_model() -> torch.nn.Module:
    print(f"model built on a worker at niceness {os.nice(0)} with MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX')}",
          flush=True)
    me = Proc.of(os.getpid())  # noted for the check after fit: this process is gone then
    with open(os.path.join(os.environ["OWN_RAY_WORKERS"], f"{me.pid}-{me.start}"), "w"):
        pass
    return torch.nn.Linear(4, 2)


def load_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    return torch.utils.data.TensorDataset(x, (x.sum(1) > 0).long()), None


if __name__ == "__main__":
    import ray

    workers = os.path.join(sys.argv[1], "worker-processes")
    os.makedirs(workers)
    os.environ["OWN_RAY_WORKERS"] = workers  # the instance fit starts passes it to its workers
    history = Trainer(model=build_model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                      loss=torch.nn.functional.cross_entropy, data=load_data, batch_size=16, num_workers=2,
                      threads_per_worker=1, storage=sys.argv[1], run_name="own-ray").fit(epochs=2, verbose=0)
    print(f"epochs run: {len(history.epoch)}; ray still initialised: {ray.is_initialized()}", flush=True)
    noted = [Proc(*map(int, name.split("-"))) for name in os.listdir(workers)]
    noted = [p for p in noted if p.pid != os.getpid()]  # the driver builds the model too (its checks before fit)
    print(f"worker processes noted: {len(noted)}; still running after fit: {sum(p.alive() for p in noted)}", flush=True)
