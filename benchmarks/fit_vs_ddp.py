"""Steps/s of Trainer.fit (2 workers, EarlyStopping + ReduceLROnPlateau + TerminateOnNaN +
BackupAndRestore) against a hand-written DDP loop under torchrun and the same loop under Ray Train v2's
TorchTrainer, same model, data, batch size and threads, in one run.

    python benchmarks/fit_vs_ddp.py [--epochs 3] [--repeats 5] [--realistic] [--no-ray-train] [--ray-actors]
                                  [--hand-sharing file_system] [--bare-fit]

``--realistic`` runs every side as a GPU job is configured (workload.REALISTIC): ``loader_workers=2``,
``"bf16-mixed"``, ``accumulate_grad_batches=2`` and a warm-up + cosine schedule stepped per optimizer
step; the hand-written loop does the same with DataLoader workers, autocast, ``no_sync`` and
``LambdaLR``. Steps are optimizer steps on every side.

What is timed, the same on every side: the steady state, from the start of the second epoch to the
end of the last one (validation and the epoch boundaries included; with ``--epochs 1``, the one
epoch), from the epoch times each side reports: Trainer.fit's ``epoch_begin``/``epoch_end`` events
(the coordinator's clock), the hand-written loop's epoch starts and end (rank 0). Process start-up,
group formation and the first epoch's warm-up are excluded on every side (benchmarks/startup.py
times start-up).

Ray Train v2 (``RAY_TRAIN_V2_ENABLED=1``, Ray 2.60's default) runs benchmarks/ddp_baseline.py's loop
inside ``TorchTrainer``, as its user guide writes one: the model wrapped by
``ray.train.torch.prepare_model`` (DDP over gloo), the DataLoaders with DistributedSamplers (what
``prepare_data_loader`` adds), and ``ray.train.report`` of the epoch's metrics after every epoch. It
saves no checkpoints, nor does torchrun's loop; Trainer.fit backs up every epoch (BackupAndRestore).
The sides take turns through every order of them (benchmarks/settle.py: with a cyclic rotation each side
always ran right after the same other side, and a side that ran after a Ray side paid for that
instance's processes ending), and each starts once the previous side's processes have ended and the
machine is quiet (at most 30 s). Ratios are medians of the per-repeat ratios, with a
distribution-free interval for the median where there are enough repeats (benchmarks/spread.py).

Loader workers (``--realistic``): every side reads its training and its validation batches through
persistent DataLoader worker processes (fit's ``loader_workers`` serves both). Fit's workers send
batches as named shared-memory files (torch's ``"file_system"`` sharing strategy,
orchestrator/loop/data.py); the hand-written loop's use torch's default (``"file_descriptor"`` on
Linux), as a loop written without that setting does. ``--hand-sharing file_system`` gives the
hand-written loop's workers fit's setting: like for like.

``--ray-actors`` adds a fourth side: the hand-written loop (torchrun's, unchanged) in two plain Ray actors
(``num_cpus=1``, no library around them) on a local Ray started as ``fit`` starts its own
(orchestrator/control/local_ray.py). Against torchrun, it measures what running inside Ray costs by itself,
which fit's ranks pay as well; fit against it measures fit's own cost inside Ray. ``--bare-fit`` adds
``Trainer.fit`` with no callbacks (no backups): fit against it is what the four callbacks and a backup
every epoch cost, bare fit against the hand-written loop what the framework costs without them.

Each side runs as its users run it: every ``Trainer.fit`` starts its own local Ray and stops it after
(``RAY_ADDRESS=local``, as a user's script with no Ray running: README), so its ranks run with the
settings of that instance; Ray Train's side runs on a Ray this script starts for it
(``ray.init(num_cpus=2, include_dashboard=False)``), torchrun's on none.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ray  # noqa: E402

import settle  # noqa: E402
import spread  # noqa: E402
import workload  # noqa: E402
from orchestrator import Trainer, callbacks  # noqa: E402


def the_callbacks(backups: bool = True) -> list:
    """The fit side's callbacks: EarlyStopping, ReduceLROnPlateau, TerminateOnNaN (patience beyond the run)
    and, with ``backups``, BackupAndRestore (a backup every epoch)."""
    chosen = [callbacks.EarlyStopping(monitor="val_loss", patience=100),
              callbacks.ReduceLROnPlateau(monitor="val_loss", patience=100), callbacks.TerminateOnNaN()]
    return chosen + [callbacks.BackupAndRestore()] if backups else chosen


def fit_history(epochs: int, config: dict, chosen: list, **options: Any) -> Any:
    """The History of one Trainer.fit of ``config`` (workload.py) with the callbacks ``chosen`` (and any other
    Trainer ``options``), in a new run folder that is removed after."""
    folder = tempfile.mkdtemp(prefix="fit-vs-ddp-")
    trainer = Trainer(
        storage=folder, run_name="bench",  # a new run each time
        model=workload.build_model, optimizer=workload.make_optimizer,
        loss=__import__("torch").nn.functional.cross_entropy, data=workload.load_data,
        metrics=["accuracy"], batch_size=workload.BATCH, num_workers=2, threads_per_worker=1,
        reuse_workers=False,  # gives its CPUs back at the end, for the next side
        callbacks=chosen,
        **workload.fit_options(config, epochs), **options,
    )
    try:
        return trainer.fit(epochs=epochs, verbose=0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_fit(epochs: int, config: dict, bare: bool = False) -> tuple[int, float]:
    """(optimizer steps, seconds) of the timed epochs of one Trainer.fit of ``config`` (workload.py);
    ``bare``: with no callbacks (no backups either)."""
    history = fit_history(epochs, config, [] if bare else the_callbacks())
    begins = [e["time"] for e in history.events if e["type"] == "epoch_begin"]
    end = [e["time"] for e in history.events if e["type"] == "epoch_end"][-1]
    first = timed_from(epochs)
    steps_per_epoch = history.results[0].steps_run // epochs
    return steps_per_epoch * (epochs - first), end - begins[first]


def timed_from(epochs: int) -> int:
    """The first timed epoch (0-based): the second one, or the only one."""
    return 1 if epochs > 1 else 0


def steady(timings: dict) -> tuple[int, float]:
    """(steps, seconds) of the timed epochs from a hand-written loop's timings (ddp_baseline.train)."""
    first = timed_from(len(timings["epoch_starts"]))
    return sum(timings["epoch_steps"][first:]), timings["end"] - timings["epoch_starts"][first]


def as_a_user_runs_fit() -> None:
    """The environment of a user's script that calls ``Trainer.fit`` with no Ray running: ``fit`` starts
    its own local Ray (never one already running here), whose workers import this folder's modules."""
    os.environ["RAY_ADDRESS"] = "local"
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)


def run_ddp(epochs: int, config: dict) -> tuple[int, float]:
    """The same for the hand-written loop under torchrun."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "ddp_baseline.py"), "--epochs", str(epochs), "--config", json.dumps(config)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:  # torchrun's and the ranks' own words, not only the exit status
        raise RuntimeError(f"{' '.join(command)} exited {out.returncode}:\n{out.stderr[-4000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    return steady(json.loads(line))


def ray_train_loop(config: dict) -> None:
    """The hand-written loop as a Ray Train train function (runs on each of its workers)."""
    import torch
    import ray.train
    import ray.train.torch

    import ddp_baseline

    def epoch_end(timings: dict) -> None:
        ray.train.report({"loss": timings["loss"], "val_loss": timings["val_loss"]})
        if ray.train.get_context().get_world_rank() == 0:  # Ray Train v2 keeps metrics only with checkpoints
            Path(config["timings"]).write_text(json.dumps(timings))

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = workload.build_model()
    ddp = ray.train.torch.prepare_model(model)
    ddp_baseline.train(ddp, model, config["epochs"], config["features"], on_epoch_end=epoch_end)


@ray.remote(num_cpus=1)
class HandWrittenRank:
    """One rank of the hand-written loop in a plain Ray actor (the ``--ray-actors`` side)."""

    def train(self, rank: int, store: str, epochs: int, config: dict, epoch_ends: str | None = None) -> dict | None:
        """Train as rank ``rank``; with ``epoch_ends`` (a file), rank 0 appends ``<epoch> <its steps>`` to it as
        each epoch ends (benchmarks/overhead.py follows it)."""
        import ddp_baseline

        def note(timings: dict) -> None:
            with open(epoch_ends, "a") as f:
                f.write(f"{len(timings['epoch_steps']) - 1} {timings['epoch_steps'][-1]}\n")

        hook = note if epoch_ends is not None and rank == 0 else None
        return ddp_baseline.train_rank(epochs, config, on_epoch_end=hook, echo=False,  # no lines in the report
                                       init_method=f"file://{store}", rank=rank, world_size=2)


def run_ray_actors(epochs: int, config: dict) -> tuple[int, float]:
    """The hand-written loop in two plain Ray actors, on a local Ray started with fit's settings."""
    from orchestrator.control.local_ray import shutdown_ray, start_local_ray

    folder = tempfile.mkdtemp(prefix="fit-vs-ray-actors-")  # the ranks meet through a file store in it
    start_local_ray()  # the instance (and settings) fit starts for itself; workers inherit PYTHONPATH
    try:
        store = os.path.join(folder, "store")
        ranks = [HandWrittenRank.remote() for _ in range(2)]
        timings = ray.get([r.train.remote(i, store, epochs, config) for i, r in enumerate(ranks)])[0]
        return steady(timings)
    finally:
        shutdown_ray()  # as fit stops its own: nothing of the instance outlives the side
        shutil.rmtree(folder, ignore_errors=True)


def run_ray_train(epochs: int, config: dict) -> tuple[int, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.control.local_ray import shutdown_ray

    folder = tempfile.mkdtemp(prefix="fit-vs-ray-train-")
    timings = os.path.join(folder, "timings.json")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}})
    try:
        TorchTrainer(
            ray_train_loop, train_loop_config={"epochs": epochs, "features": config, "timings": timings},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="bench", storage_path=folder),
        ).fit()
        return steady(json.loads(Path(timings).read_text()))  # rank 0's, after the last epoch
    finally:
        shutdown_ray()  # as fit stops its own: nothing of the instance outlives the side
        shutil.rmtree(folder, ignore_errors=True)


def run_bare_fit(epochs: int, config: dict) -> tuple[int, float]:
    """:func:`run_fit` with no callbacks."""
    return run_fit(epochs, config, bare=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--realistic", action="store_true", help="loader workers, bf16, accumulation, cosine")
    parser.add_argument("--no-ray-train", action="store_true", help="leave Ray Train out (fit and torchrun only)")
    parser.add_argument("--hand-sharing", choices=["file_descriptor", "file_system"], default=None,
                        help="the hand-written loop's loader workers use this torch sharing strategy (default: torch's, "
                             "file_descriptor on Linux; fit's loader workers use file_system)")
    parser.add_argument("--ray-actors", action="store_true",
                        help="also run the hand-written loop in two plain Ray actors (Ray's own cost)")
    parser.add_argument("--bare-fit", action="store_true",
                        help="also run Trainer.fit with no callbacks (what the callbacks and backups cost)")
    args = parser.parse_args()
    import torch
    with_ray_train = not args.no_ray_train
    timed = f"epochs 2-{args.epochs}" if args.epochs > 1 else "epoch 1 (one epoch: no steady state apart)"
    print(f"torch {torch.__version__}, ray {ray.__version__}, epochs {args.epochs}, repeats {args.repeats}, "
          f"batch {workload.BATCH}/worker, 2 workers x 1 thread, "
          f"config {workload.REALISTIC if args.realistic else 'plain fp32, 1 micro-batch, constant lr'}; "
          f"timed: {timed}, from each side's epoch times; sides in every order in turn, each after a wait for a quiet machine; each fit starts its own local "
          f"Ray (RAY_ADDRESS=local)"
          + ("; Ray Train v2 (RAY_TRAIN_V2_ENABLED=1) runs the hand-written loop" if with_ray_train else "")
          + ("; Ray actors: the hand-written loop in 2 plain Ray actors on a Ray started as fit's" if args.ray_actors
             else "")
          + ("; bare fit: Trainer.fit with no callbacks (no backups)" if args.bare_fit else "")
          + (f"; loader workers' sharing strategy: fit file_system, hand-written loop "
             f"{args.hand_sharing or 'torch default (' + torch.multiprocessing.get_sharing_strategy() + ')'}"
             if args.realistic else ""),
          flush=True)
    as_a_user_runs_fit()
    sides = {"fit": run_fit, "torchrun DDP": run_ddp}
    if with_ray_train:
        sides["Ray Train v2"] = run_ray_train
    if args.ray_actors:
        sides["Ray actors"] = run_ray_actors
    if args.bare_fit:
        sides["bare fit"] = run_bare_fit
    rates: dict[str, list[float]] = {name: [] for name in sides}
    config = workload.REALISTIC if args.realistic else {}
    hand_config = dict(config, sharing=args.hand_sharing) if args.hand_sharing else config
    waits: list[float] = []
    for i, order in enumerate(settle.side_orders(list(sides), args.repeats)):  # interleaved: drift hits every side alike
        measured = {}
        for name in order:
            waits.append(settle.wait_quiet())  # the previous side's processes end before this one starts
            measured[name] = sides[name](args.epochs, config if name in ("fit", "bare fit") else hand_config)
            rates[name].append(measured[name][0] / measured[name][1])
        fs, ft = measured["fit"]
        ds, dt = measured["torchrun DDP"]
        line = (f"repeat {i + 1}: fit {fs} steps in {ft:.2f}s = {fs / ft:.1f} steps/s | "
                f"torchrun DDP {ds} steps in {dt:.2f}s = {ds / dt:.1f} steps/s | ratio {fs / ft / (ds / dt):.3f}")
        if with_ray_train:
            rs, rt = measured["Ray Train v2"]
            line += (f" | Ray Train v2 {rs} steps in {rt:.2f}s = {rs / rt:.1f} steps/s | "
                     f"fit / Ray Train {fs / ft / (rs / rt):.3f}")
        if args.ray_actors:
            as_, at = measured["Ray actors"]
            line += (f" | Ray actors {as_} steps in {at:.2f}s = {as_ / at:.1f} steps/s | "
                     f"fit / Ray actors {fs / ft / (as_ / at):.3f}")
        if args.bare_fit:
            bs, bt = measured["bare fit"]
            line += f" | bare fit {bs} steps in {bt:.2f}s = {bs / bt:.1f} steps/s | fit / bare fit {fs / ft / (bs / bt):.3f}"
        print(line, flush=True)
    fit_best = max(rates["fit"])
    ddp_best = max(rates["torchrun DDP"])
    paired = [f / d for f, d in zip(rates["fit"], rates["torchrun DDP"])]
    print(f"waited for a quiet machine before each side: median {spread.median(waits):.1f} s, max {max(waits):.1f} s")
    print(f"best of {args.repeats}: fit {fit_best:.1f} steps/s, DDP {ddp_best:.1f} steps/s, "
          f"ratio {fit_best / ddp_best:.3f}")
    for name, values in rates.items():
        print(f"{name}: median {spread.median(values):.1f} steps/s (min {min(values):.1f}, max {max(values):.1f})")
    print(f"fit / torchrun DDP, the {args.repeats} interleaved pair ratios: {spread.describe(paired)}; "
          f"target >= 0.97")
    if with_ray_train:
        against = [f / r for f, r in zip(rates["fit"], rates["Ray Train v2"])]
        print(f"fit / Ray Train v2, the {args.repeats} per-repeat ratios: {spread.describe(against)}")
        inside = [r / d for r, d in zip(rates["Ray Train v2"], rates["torchrun DDP"])]
        print(f"Ray Train v2 / torchrun DDP (the same hand-written loop inside Ray and outside it), the "
              f"{args.repeats} per-repeat ratios: {spread.describe(inside)}")
    pairs: list[tuple[str, str, str]] = []  # (label, numerator side, denominator side)
    if args.ray_actors:
        pairs += [("Ray actors / torchrun DDP (the same hand-written loop in plain Ray actors and outside Ray)",
                   "Ray actors", "torchrun DDP"),
                  ("fit / Ray actors (fit and the hand-written loop, both inside Ray)", "fit", "Ray actors")]
    if args.bare_fit:
        pairs += [("bare fit / torchrun DDP (fit with no callbacks against the hand-written loop)",
                   "bare fit", "torchrun DDP"),
                  ("fit / bare fit (what the callbacks and a backup every epoch cost)", "fit", "bare fit")]
    for label, top, bottom in pairs:
        ratios = [t / b for t, b in zip(rates[top], rates[bottom])]
        print(f"{label}, the {args.repeats} per-repeat ratios: {spread.describe(ratios)}")


if __name__ == "__main__":
    main()
