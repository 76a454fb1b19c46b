"""Recovery from a worker SIGKILL: Trainer.fit (max_failures=1, BackupAndRestore) against Ray Train's
TorchTrainer (FailureConfig(max_failures=1) and its checkpoints), same model and data, in one run.

    pip install -e ".[bench]"   # ray[train]
    python benchmarks/recovery.py [--repeats 3] [--kill-step 70] [--save-every 40] [--step-seconds 0.1]

Both sides train benchmarks/workload.py's model and data (batch 64, SGD with momentum) for one epoch
(128 steps per rank) on 2 workers with 1 CPU each (gloo, DDP), checkpoint every ``--save-every``
steps, and sleep ``--step-seconds`` in every step so a step takes a known minimum time. When rank 1
is about to run global step ``--kill-step + 1`` (``--kill-step`` steps done) on the first attempt,
it writes the time and SIGKILLs its own process (once, guarded by a flag file). Both sides restart
the group and resume from their newest checkpoint.

Measured the same way on both sides, with one clock (one machine): rank 0 appends ``time.time()``
to a file in a post-step hook of its optimizer, i.e. when an optimizer step has completed.

- recovery: kill -> the first step completed after the restart (the issue's definition);
- regain: kill -> step ``kill-step + 1`` completed (recovery plus redoing the lost steps);
- lost: steps completed before the kill that were redone (kill-step minus the restored step;
  the orchestrator's from the "recovered" event in events.jsonl (a live recovery from the survivors'
  memory, the default) or the "restored" one (a backup), Ray Train's from its checkpoint).

Ray Train: Ray 2.60 runs Train V2 by default (``RAY_TRAIN_V2_ENABLED`` unset means on); the path
used is printed. Its controller polls the workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``
(default 2 s), which is also when a reported checkpoint is registered; the defaults put the kill
about 3 s after the last checkpoint so that checkpoint is usable (kill sooner after one and Ray
Train may resume from the one before). Ray Train's defaults are left as they are.

The orchestrator runs twice per repeat: as configured by default (``warm_standbys=True``: the
restart promotes idle standby processes that already imported torch, and a spare coordinator)
and with ``warm_standbys=False`` (every process of the restart is a cold start, as in Ray Train).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ray  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import workload  # noqa: E402
from orchestrator import Trainer, callbacks  # noqa: E402

TARGET = 0.5


@dataclass
class Probe:
    """Shared by both sides: the step delay, the one-off kill and the step timestamps (picklable)."""

    folder: str
    kill_step: int
    step_seconds: float
    steps: int  # the run's optimizer steps (one epoch)

    @property
    def flag(self) -> str:
        return os.path.join(self.folder, "armed")

    @property
    def kill_file(self) -> str:
        return os.path.join(self.folder, "killed_at")

    @property
    def steps_file(self) -> str:
        return os.path.join(self.folder, "steps")

    def arm(self) -> None:
        Path(self.flag).write_text("x")

    def before_step(self, done: int) -> None:
        """Called on every rank before a training step, with the number of steps done."""
        time.sleep(self.step_seconds)
        if done == self.kill_step and dist.get_rank() == 1 and os.path.exists(self.flag):
            os.remove(self.flag)
            Path(self.kill_file).write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)

    def optimizer(self, params: Any) -> torch.optim.Optimizer:
        opt = workload.make_optimizer(params)
        opt.register_step_post_hook(self._stepped)
        return opt

    def _stepped(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if dist.get_rank() == 0:
            with open(self.steps_file, "a") as f:
                f.write(f"{time.time()!r} {os.getpid()}\n")

    def measure(self, restored_step: int) -> dict[str, float]:
        killed = float(Path(self.kill_file).read_text())
        stamps = [(float(t), int(p)) for t, p in (ln.split() for ln in Path(self.steps_file).read_text().splitlines())]
        before = [s for s in stamps if s[0] <= killed]
        after = [s for s in stamps if s[0] > killed]
        lost = self.kill_step - restored_step
        assert len(before) == self.kill_step, (len(before), self.kill_step)
        # the rerun trained every step after the one it resumed from (rank 0's process may have survived the
        # kill: a restart without standbys keeps the ranks that did)
        assert len(after) == self.steps - restored_step, (len(after), self.steps, restored_step)
        return {"recovery": after[0][0] - killed, "regain": after[lost][0] - killed, "lost": float(lost)}


# -- the orchestrator ----------------------------------------------------------------------------
class OrchestratorStep:
    """train_step for Trainer: the probe's delay and kill, then the default forward and loss."""

    def __init__(self, probe: Probe) -> None:
        self.probe, self.done = probe, 0  # steps done by this process (= global steps on attempt 1)

    def __call__(self, model: torch.nn.Module, batch: Any) -> dict[str, Any]:
        inputs, targets = batch
        if model.training:
            self.probe.before_step(self.done)
            self.done += 1
        return {"loss": torch.nn.functional.cross_entropy(model(inputs), targets), "batch_size": len(targets)}


def run_orchestrator(probe: Probe, save_every: int, warm: bool = True) -> dict[str, float]:
    storage = os.path.join(probe.folder, "storage")
    trainer = Trainer(model=workload.build_model, optimizer=probe.optimizer, data=workload.load_data,
                      train_step=OrchestratorStep(probe), batch_size=workload.BATCH, num_workers=2,
                      threads_per_worker=1, max_failures=1, storage=storage, run_name="recovery",
                      callbacks=[callbacks.BackupAndRestore(save_freq=save_every)], warm_standbys=warm)
    trainer.fit(epochs=1, verbose=0)
    events = [json.loads(ln) for ln in Path(storage, "recovery", "events.jsonl").read_text().splitlines()]
    assert sum(e["type"] == "worker_failed" for e in events) == 1, "the kill did not happen once"
    restored = [e["step"] for e in events if e["type"] in ("recovered", "restored")]  # memory, or a backup
    assert len(restored) == 1, events
    return probe.measure(restored[0])


# -- Ray Train ------------------------------------------------------------------------------------
def ray_train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, DistributedSampler, Subset

    probe: Probe = config["probe"]
    save_every: int = config["save_every"]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = workload.build_model()
    optimizer = probe.optimizer(model.parameters())
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        Path(probe.folder, "ray_restored").write_text(str(step))
    model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU)
    train_ds, _ = workload.load_data()
    sampler = DistributedSampler(train_ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
    sampler.set_epoch(0)
    indices = list(sampler)[step * workload.BATCH:]  # skip the steps the checkpoint already holds
    loader = DataLoader(Subset(train_ds, indices), batch_size=workload.BATCH)
    model.train()
    for inputs, targets in loader:
        probe.before_step(step)
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % save_every == 0:
            if rank == 0:
                with tempfile.TemporaryDirectory() as folder:
                    torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
                                "step": step}, os.path.join(folder, "state.pt"))
                    ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report({"step": step})


def run_ray_train(probe: Probe, save_every: int) -> dict[str, float]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        ray_train_loop, train_loop_config={"probe": probe, "save_every": save_every},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="recovery", storage_path=os.path.join(probe.folder, "ray_storage"),
                             failure_config=FailureConfig(max_failures=1),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    trainer.fit()
    return probe.measure(int(Path(probe.folder, "ray_restored").read_text()))


# -- driver ---------------------------------------------------------------------------------------
def ray_train_path() -> str:
    from ray.train.v2._internal.constants import is_v2_enabled

    return "Ray Train V2" if is_v2_enabled() else "Ray Train V1 (RAY_TRAIN_V2_ENABLED=0)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kill-step", type=int, default=70, help="steps done when rank 1 is killed")
    parser.add_argument("--save-every", type=int, default=40, help="steps between checkpoints (both sides)")
    parser.add_argument("--step-seconds", type=float, default=0.1, help="sleep in every step (both sides)")
    args = parser.parse_args()
    steps_per_epoch = workload.TRAIN // 2 // workload.BATCH
    if not args.save_every <= args.kill_step < steps_per_epoch:
        parser.error(f"need --save-every <= --kill-step < {steps_per_epoch} (one epoch)")
    path = ray_train_path()
    print(f"ray {ray.__version__}, torch {torch.__version__}, {path}", flush=True)
    root = tempfile.mkdtemp(prefix="recovery-bench-")
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}})
    rows: list[tuple[dict[str, float], dict[str, float], dict[str, float]]] = []
    try:
        for i in range(args.repeats):  # interleaved, alternating which side goes first
            results: dict[str, dict[str, float]] = {}
            sides = [("orch", run_orchestrator), ("ray", run_ray_train),
                     ("cold", lambda probe, every: run_orchestrator(probe, every, warm=False))]
            for side, run in sides if i % 2 == 0 else sides[::-1]:
                probe = Probe(os.path.join(root, f"{side}-{i}"), args.kill_step, args.step_seconds, steps_per_epoch)
                os.makedirs(probe.folder)
                probe.arm()
                results[side] = run(probe, args.save_every)
            ours, theirs, cold = results["orch"], results["ray"], results["cold"]
            rows.append((ours, theirs, cold))
            print(f"repeat {i + 1}: orchestrator recovery {ours['recovery']:.2f}s, lost {ours['lost']:.0f}, "
                  f"regain {ours['regain']:.2f}s | {path} recovery {theirs['recovery']:.2f}s, "
                  f"lost {theirs['lost']:.0f}, regain {theirs['regain']:.2f}s | "
                  f"ratio {ours['recovery'] / theirs['recovery']:.3f} | without warm standbys: recovery "
                  f"{cold['recovery']:.2f}s, ratio {cold['recovery'] / theirs['recovery']:.3f}", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    def med(side: int, key: str) -> float:
        return statistics.median(r[side][key] for r in rows)

    print(f"\nkill at step {args.kill_step}, checkpoints every {args.save_every} steps, "
          f"{args.step_seconds:g}s sleep per step, median of {args.repeats}:")
    print(f"{'side':<34}{'recovery s':>12}{'lost steps':>12}{'regain s':>10}")
    for name, side in (("orchestrator", 0), ("orchestrator, warm_standbys=False", 2), (path, 1)):
        print(f"{name:<34}{med(side, 'recovery'):>12.2f}{med(side, 'lost'):>12.0f}{med(side, 'regain'):>10.2f}")
    ratio = med(0, "recovery") / med(1, "recovery")
    paired = statistics.median(o["recovery"] / t["recovery"] for o, t, _ in rows)
    print(f"recovery ratio orchestrator / Ray Train: {ratio:.3f} (median of pairs {paired:.3f}); "
          f"target <= {TARGET}: {'OK' if ratio <= TARGET else 'MISS'}; without warm standbys "
          f"{med(2, 'recovery') / med(1, 'recovery'):.3f}")


if __name__ == "__main__":
    main()
