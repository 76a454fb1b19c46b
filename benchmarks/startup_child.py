"""One start-up of one tool, as a user starts it; benchmarks/startup.py runs this file as a fresh process.

    python benchmarks/startup_child.py fit STAMP_FILE [--steps 8]
    torchrun --standalone --nproc_per_node 2 benchmarks/startup_child.py torchrun STAMP_FILE [--steps 8]
    python benchmarks/startup_child.py ray-train STAMP_FILE [--steps 8]

Each trains benchmarks/workload.py's model and data (batch 64 per worker, 2 workers, 1 thread each)
for ``--steps`` steps, and rank 0 appends ``time.time()`` to STAMP_FILE when its first optimizer
step has completed (a post-step hook of the optimizer, the same on every side). Nothing is
imported before the side's own imports, which are those of a user's script:

- ``fit``: ``from orchestrator import Trainer, callbacks``; ``Trainer(...).fit(...)`` with no Ray
  running, so ``fit`` starts its own local Ray (README), with the callbacks of the steady-state
  benchmark (EarlyStopping, ReduceLROnPlateau, TerminateOnNaN, BackupAndRestore);
- ``torchrun``: torch and torch.distributed, ``init_process_group("gloo")``, DDP, DistributedSampler;
- ``ray-train``: ``TorchTrainer(...).fit()`` with no Ray running, so Ray Train starts a local Ray
  (its quickstart): ``ray.train.torch.prepare_model`` and ``prepare_data_loader`` in the loop.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


class Stamp:
    """An optimizer factory that makes rank 0 append the time of its completed steps to a file (picklable)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, params: Any) -> Any:
        import workload

        optimizer = workload.make_optimizer(params)
        optimizer.register_step_post_hook(self._stepped)
        return optimizer

    def _stepped(self, *_: Any) -> None:
        import torch.distributed as dist

        if dist.get_rank() == 0:
            with open(self.path, "a") as f:
                f.write(f"{time.time()!r}\n")


def fit(stamp: str, steps: int) -> None:
    import torch

    import workload
    from orchestrator import Trainer, callbacks

    with tempfile.TemporaryDirectory(prefix="startup-fit-") as folder:
        Trainer(model=workload.build_model, optimizer=Stamp(stamp), loss=torch.nn.functional.cross_entropy,
                data=workload.load_data, metrics=["accuracy"], batch_size=workload.BATCH, num_workers=2,
                threads_per_worker=1, storage=folder, run_name="startup", steps_per_epoch=steps,
                validation_steps=1,
                callbacks=[callbacks.EarlyStopping(monitor="val_loss", patience=100),
                           callbacks.ReduceLROnPlateau(monitor="val_loss", patience=100),
                           callbacks.TerminateOnNaN(), callbacks.BackupAndRestore()]).fit(epochs=1, verbose=0)


def torchrun(stamp: str, steps: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    import workload

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DistributedDataParallel(workload.build_model())
    optimizer = Stamp(stamp)(model.parameters())
    train, _ = workload.load_data()
    loader = DataLoader(train, batch_size=workload.BATCH, sampler=DistributedSampler(train, shuffle=True, seed=0))
    for i, (x, y) in enumerate(loader):
        if i == steps:
            break
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    dist.destroy_process_group()


def ray_train_loop(config: dict[str, Any]) -> None:
    import torch
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader

    import workload

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(workload.build_model())
    optimizer = Stamp(config["stamp"])(model.parameters())
    train, _ = workload.load_data()
    loader = ray.train.torch.prepare_data_loader(DataLoader(train, batch_size=workload.BATCH, shuffle=True))
    for i, (x, y) in enumerate(loader):
        if i == config["steps"]:
            break
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ray.train.report({"loss": loss.item()})


def ray_train(stamp: str, steps: int) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory(prefix="startup-ray-") as folder:
        TorchTrainer(ray_train_loop, train_loop_config={"stamp": stamp, "steps": steps},
                     scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name="startup", storage_path=folder)).fit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("side", choices=("fit", "torchrun", "ray-train"))
    parser.add_argument("stamp", help="the file rank 0 appends its step times to")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    {"fit": fit, "torchrun": torchrun, "ray-train": ray_train}[args.side](args.stamp, args.steps)


if __name__ == "__main__":
    main()
