"""The two sides benchmarks/overhead.py measures, each run as a child process of it: one Trainer.fit, or
the hand-written loop in two plain Ray actors (``--hand``). Each prints a mark (``@@overhead begin|end
<steps per epoch>``) at its window's start and end, then ``@@overhead rate <steps/s>``: its pace between
the window's epochs, from its own epoch times.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

MARK = "@@overhead"


def child(epochs: int, max_failures: int, realistic: bool = False) -> None:
    """Run one fit (benchmarks/fit_vs_ddp.py's fit side), printing a mark (with the steps per epoch) at the
    window's start and end."""
    import fit_vs_ddp
    import workload
    from orchestrator import callbacks

    class Marks(callbacks.Callback):
        runs_on = "driver"

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            if epoch == 1:
                print(f"{MARK} begin {self.params.get('steps')}", flush=True)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if epoch == epochs - 2:  # the last epoch still runs: every process (loader workers too) is alive
                print(f"{MARK} end {self.params.get('steps')}", flush=True)

    history = fit_vs_ddp.fit_history(epochs, workload.REALISTIC if realistic else {},
                                     fit_vs_ddp.the_callbacks() + [Marks()], max_failures=max_failures)
    # the marks reach this driver with its events (about once a second): the steps of the window they
    # bound follow from the exact pace between the epochs' own times (the coordinator's clock)
    begin = next(e for e in history.events if e["type"] == "epoch_begin" and e["epoch"] == 1)
    end = next(e for e in history.events if e["type"] == "epoch_end" and e["epoch"] == epochs - 2)
    print(f"{MARK} rate {(end['global_step'] - begin['global_step']) / (end['time'] - begin['time'])}", flush=True)


def child_hand(epochs: int, realistic: bool = False) -> None:
    """The hand-written loop (benchmarks/ddp_baseline.py) in two plain Ray actors on a local Ray started as
    fit starts its own (benchmarks/fit_vs_ddp.py's ``--ray-actors`` side; realistic: its loader workers
    share batches by file name, as fit's do), with :func:`child`'s marks: rank 0 appends each epoch's end
    to a file that this process follows (every 10 ms)."""
    import ray

    import fit_vs_ddp
    import workload
    from orchestrator.control.local_ray import shutdown_ray, start_local_ray

    config = dict(workload.REALISTIC, sharing="file_system") if realistic else {}
    with tempfile.TemporaryDirectory(prefix="overhead-hand-") as folder:
        ends = Path(folder, "epoch-ends")
        ends.touch()
        start_local_ray()
        try:
            ranks = [fit_vs_ddp.HandWrittenRank.remote() for _ in range(2)]
            pending = [r.train.remote(i, str(Path(folder, "store")), epochs, config, str(ends))
                       for i, r in enumerate(ranks)]
            refs, partial = list(pending), ""
            with ends.open() as f:
                while pending:  # rank 0 writes an epoch's line before it goes on (its last before it returns)
                    _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.01)
                    *lines, partial = (partial + f.read()).split("\n")
                    for line in lines:
                        epoch, steps = line.split()[:2]
                        if int(epoch) in (0, epochs - 2):  # the end of epoch 1 is the start of epoch 2
                            print(f"{MARK} {'begin' if int(epoch) == 0 else 'end'} {steps}", flush=True)
            timings = ray.get(refs)[0]
        finally:
            shutdown_ray()
    steps = sum(timings["epoch_steps"][1:epochs - 1])
    print(f"{MARK} rate {steps / (timings['epoch_starts'][epochs - 1] - timings['epoch_starts'][1])}", flush=True)
