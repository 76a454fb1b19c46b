"""Batch hooks at sync points: ``on_train_batch_begin`` only for a batch that will run."""

from __future__ import annotations

import pytest

from orchestrator.callbacks import Callback
from orchestrator.cluster.coordinator_core import CoordinatorCore
from orchestrator.core.metrics import PhaseSums
from orchestrator.decisions import Report, ReportKind


class BatchRecorder(Callback):
    batch_sync_every = 1

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def on_train_batch_begin(self, batch, logs=None):
        self.calls.append(f"begin:{batch}")

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(f"end:{batch}")


def _batch_end(step: int, steps_per_epoch: int | None, epoch_ends: bool, world_size: int = 2) -> dict[int, Report]:
    return {rank: Report(ReportKind.BATCH_END, epoch=0, step=step, train=PhaseSums({"loss": 1.0}, 2),
                         learning_rate=0.1, steps_per_epoch=steps_per_epoch, global_step=step + 1,
                         epoch_ends=epoch_ends) for rank in range(world_size)}


@pytest.mark.parametrize("steps_per_epoch, step, epoch_ends, calls", [
    (4, 1, False, ["end:1", "begin:2"]),      # a batch follows
    (4, 3, False, ["end:3"]),                 # the epoch's last step
    (4, 1, True, ["end:1"]),                  # a rank's stream ran out before steps_per_epoch
    (None, 5, False, ["end:5", "begin:6"]),   # a stream of unknown length goes on
    (None, 5, True, ["end:5"]),               # ... until some rank runs out
])
def test_batch_begin_is_called_for_the_next_batch_only_when_one_will_run(steps_per_epoch, step, epoch_ends, calls):
    recorder = BatchRecorder()
    core = CoordinatorCore([recorder], {"epochs": 1}, world_size=2)
    core.handle({rank: Report(ReportKind.TRAIN_BEGIN, learning_rate=0.1, steps_per_epoch=steps_per_epoch)
                 for rank in range(2)})
    core.handle(_batch_end(step, steps_per_epoch, epoch_ends))
    assert recorder.calls == calls
