"""ProgbarLogger as the driver feeds it (DriverCallbacks replaying the coordinator's events), without Ray:
one line per epoch off a terminal; on one a bar with steps/s, the running loss and an ETA, which
resumes at the restored step after a restart."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest

from orchestrator.callbacks import Callback, History, ProgbarLogger
from orchestrator.cluster.coordinator_core import CoordinatorCore
from orchestrator.control.driver_side import DriverCallbacks
from orchestrator.core.metrics import PhaseSums
from orchestrator.decisions import Backup, Report, ReportKind

EPOCHS, STEPS = 3, 10
EPOCH_LOGS = {"loss": 0.5, "val_loss": 0.625, "learning_rate": 0.1}


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "time": 100.0, **fields}


def epoch_events(epoch: int, first: int = 0, begin: bool = True) -> list[dict[str, Any]]:
    """What the coordinator sends for one epoch from batch ``first``: progress about once a second, a batch sync."""
    out = [event("epoch_begin", epoch=epoch, global_step=epoch * STEPS)] if begin else []
    for step in range(first, STEPS):
        out.append(event("progress", epoch=epoch, step=step, logs={"loss": 0.5}))
        if step == 4:
            out.append(event("batch_end", epoch=epoch, step=step, logs={"loss": 0.5}))
    return out + [event("epoch_end", epoch=epoch, logs=dict(EPOCH_LOGS))]


def driver(stream: io.StringIO, verbose: Any = "auto") -> tuple[DriverCallbacks, ProgbarLogger]:
    bar = ProgbarLogger(stream=stream)
    return DriverCallbacks([bar, History()], {"epochs": EPOCHS, "verbose": verbose}), bar


def train_begin(epoch: int = 0, initial_step: int = 0) -> dict[str, Any]:
    return event("train_begin", steps=STEPS, global_step=epoch * STEPS + initial_step, epoch=epoch,
                 initial_step=initial_step)


@pytest.mark.parametrize("verbose", ["auto", 1, 2])
def test_off_a_terminal_each_epoch_prints_exactly_one_line_with_its_logs_even_across_a_restart(verbose):
    out = io.StringIO()
    callbacks, _ = driver(out, verbose)
    replay = [train_begin(), *epoch_events(0), *epoch_events(1)[:4]]  # attempt 1 fails in epoch 1 ...
    replay += [train_begin(1, initial_step=3), *epoch_events(1, first=3, begin=False), *epoch_events(2),
               event("train_end", logs=dict(EPOCH_LOGS))]  # ... attempt 2 resumes at its step 3
    for e in replay:
        callbacks.dispatch(e)

    lines = out.getvalue().splitlines()
    assert len(lines) == EPOCHS
    for epoch, line in enumerate(lines, start=1):
        assert re.fullmatch(rf"Epoch {epoch}/{EPOCHS} - \d+\.\ds - loss: 0\.5000 - val_loss: 0\.6250 - "
                            r"learning_rate: 0\.1000", line), line


def test_on_a_terminal_the_bar_shows_steps_per_second_the_running_loss_and_an_eta():
    out = FakeTTY()
    callbacks, bar = driver(out)
    for e in [train_begin(), *epoch_events(0)[:5]]:  # epoch_begin, then progress up to step 3
        callbacks.dispatch(e)
    assert bar._bar.n == 4 and bar._bar.total == STEPS
    shown = out.getvalue().split("\r")[-1]
    assert re.search(r"Epoch 1/3: +40%.*\| 4/10 \[\d\d:\d\d<(\d\d:\d\d|\?), +[\d.?]+ ?step/s, loss: 0\.5000\]",
                     shown), shown


@pytest.mark.parametrize(
    "failed_at, resumes_at",
    [((1, 7), (1, 3)),  # a restart in the same driver: back from step 7 to the backup's step 3
     ((0, 9), (1, 0)),  # a backup at the end of epoch 0: epoch 1 begins anew
     ((2, 4), (2, 4))],  # an emergency backup at the step it stopped at
)
def test_after_a_restart_the_bar_resumes_at_the_restored_step(failed_at, resumes_at):
    callbacks, bar = driver(FakeTTY())
    epoch, step = failed_at
    partial = [event("epoch_begin", epoch=epoch)] + [event("progress", epoch=epoch, step=s, logs={"loss": 0.5})
                                                      for s in range(step)]
    for e in [train_begin(), *[x for ep in range(epoch) for x in epoch_events(ep)], *partial]:
        callbacks.dispatch(e)
    assert bar._bar.n == step  # the failed attempt's bar got this far

    callbacks.dispatch(train_begin(*resumes_at))
    if resumes_at[1] == 0:
        assert bar._bar is None  # the failed bar is closed; the next epoch_begin opens a fresh one
        callbacks.dispatch(event("epoch_begin", epoch=resumes_at[0]))
    assert (bar._bar.n, bar._bar.desc) == (resumes_at[1], f"Epoch {resumes_at[0] + 1}/{EPOCHS}")
    callbacks.dispatch(event("progress", epoch=resumes_at[0], step=resumes_at[1] + 2, logs={"loss": 0.25}))
    assert bar._bar.n == resumes_at[1] + 3


class BackupAtStep(Callback):
    """Decides a backup at one batch sync point, and keeps its coordinator state."""

    batch_sync_every = 1

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.state = step, None

    def on_train_batch_end(self, batch, logs=None):
        return Backup(source="test") if batch == self.step else None


def test_a_new_driver_resuming_a_backup_opens_the_bar_at_the_backups_step():
    saver = BackupAtStep(step=6)
    core = CoordinatorCore([saver], {"epochs": EPOCHS, "steps": STEPS}, world_size=1)
    sync = lambda kind, **f: core.handle({0: Report(kind, learning_rate=0.1, steps_per_epoch=STEPS, **f)})  # noqa: E731
    sync(ReportKind.TRAIN_BEGIN)
    sync(ReportKind.EPOCH_BEGIN, epoch=0)
    sync(ReportKind.EPOCH_END, epoch=0, train=PhaseSums({"loss": 1.0}, 1), global_step=STEPS)
    sync(ReportKind.EPOCH_BEGIN, epoch=1, global_step=STEPS)
    decided = [d for s in range(7) for d in sync(ReportKind.BATCH_END, epoch=1, step=s, global_step=STEPS + s + 1,
                                                train=PhaseSums({"loss": 1.0}, 1))]
    (backup,) = [d for d in decided if isinstance(d, Backup)]

    resumed = CoordinatorCore([BackupAtStep(step=-1)], {"epochs": EPOCHS, "steps": STEPS}, world_size=1,
                              restore=backup.coordinator_state, resumed_from="backup/step-17")
    resumed.handle({0: Report(ReportKind.TRAIN_BEGIN, learning_rate=0.1, steps_per_epoch=STEPS,
                              global_step=STEPS + 7)})
    callbacks, bar = driver(FakeTTY())
    for e in resumed.drain():
        callbacks.dispatch(e)
    assert (bar._bar.n, bar._bar.desc) == (7, "Epoch 2/3")
