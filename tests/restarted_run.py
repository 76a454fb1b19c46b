"""One uninterrupted run and one run restarted after a worker failure, fitted once per test session
and read by every test that asserts something about a restart from a backup (bit-identical weights,
events, the CSV file, the TensorBoard scalars and histograms): each such fit pair took 10-20 s."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import workloads
from orchestrator import Trainer, callbacks
from orchestrator.storage.fs import StorageSpec
from orchestrator.storage.run_files import read_events

#: What a CSV file held before either run appended to it (append=True keeps it).
PRIOR_CSV = b"epoch,note\r\n-1,from an earlier run\r\n"
EPOCHS = 3  # 7 steps an epoch
FAILING_CALL = 11  # rank 1 raises at its 11th training call: epoch 1, batch 4


@dataclass
class RestartedRuns:
    """The two runs under ``root``: ``reference`` (uninterrupted) and ``faulty`` (restarted once).

    Args:
        root: The storage folder of both runs.
        reference: The uninterrupted run's History.
        faulty: The restarted run's History.
        flag_left: Whether the failure's flag file was still there after the fit (the failure never happened).
        export: The faulty run's values in Ray's metrics export, watched from its end (tests/ray_metrics.py).
    """

    root: Path
    reference: Any
    faulty: Any
    flag_left: bool
    export: Any = None

    def events(self, run_name: str) -> list[dict[str, Any]]:
        return read_events(StorageSpec(str(self.root), run_name).open())

    def csv(self, run_name: str) -> Path:
        return self.root / f"{run_name}.csv"

    def tensorboard(self, run_name: str, folder: str) -> Path:
        return self.root / run_name / "logs" / folder


def backup_callbacks() -> list[Any]:
    """Backups every 3 steps, and the rate halved at the end of epochs 1 and 2 (no epoch improves by 1.0), so
    that a restart from a backup must also restore the learning rate."""
    return [callbacks.BackupAndRestore(save_freq=3, delete_checkpoint=False),
            callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=0, min_delta=1.0)]


def make(root: Path, run_name: str, train_step: Any, **overrides: Any) -> Trainer:
    """The Trainer of these runs (test_fault_tolerance.py trains more runs like it)."""
    kwargs: dict[str, Any] = dict(
        model=workloads.dropout_model, optimizer=workloads.adam, data=workloads.odd_data, train_step=train_step,
        batch_size=16, num_workers=2, seed=0, storage=str(root), run_name=run_name, max_failures=1,
        callbacks=backup_callbacks())
    kwargs.update(overrides)
    return Trainer(**kwargs)


def fit_both(root: Path) -> RestartedRuns:
    """Fit the two runs, each with a CSVLogger (appending to a file with earlier content) and a TensorBoard.

    The faulty run starts on the idle workers the reference run parked (no process started), restarts
    without warm standbys (rank 0 keeps its process, rank 1's is new), from storage
    (``live_recovery=False``: tests/test_live_recovery.py covers the survivors' memory).
    """
    def fit(run_name: str, step: Any, **overrides: Any) -> Any:
        csv = root / f"{run_name}.csv"
        csv.write_bytes(PRIOR_CSV)
        logging = [callbacks.CSVLogger(str(csv), append=True), callbacks.TensorBoard(update_freq=3, histogram_freq=1)]
        return make(root, run_name, step, warm_standbys=False, callbacks=backup_callbacks() + logging,
                    **overrides).fit(epochs=EPOCHS, verbose=0)

    reference = fit("reference", workloads.faulty_step("raise", 0, 10**6, None))
    flag = root / "armed"
    flag.write_text("x")
    faulty = fit("faulty", workloads.faulty_step("raise", 1, FAILING_CALL, str(flag)), live_recovery=False)
    return RestartedRuns(root, reference, faulty, flag.exists())
