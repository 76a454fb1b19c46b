"""Roll every rank back to the newest committed backup when the loss goes non-finite (beyond Keras)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from orchestrator.callbacks.base import Callback
from orchestrator.decisions import Backup, Rollback, SkipBatches, StopTraining


class RollbackOnNaN(Callback):
    """On a NaN or infinite loss on any rank, reload the newest committed backup and continue.

    Every rank rolls back at the same step, skips the batches that produced non-finite losses
    (recorded in the backups, so a resumed run skips them too), optionally scales the learning
    rate, and trains on. After ``max_rollbacks`` it stops training like :class:`TerminateOnNaN`.
    Rolls back to the backups of :class:`BackupAndRestore` (the run's backup folder); a fresh
    run also backs up its initial state, so a NaN in the very first batches can roll back too.
    Backups are never committed from a state holding non-finite weights.

    Each rollback's ``rolled_back`` event in ``events.jsonl`` carries ``bad_step`` (the global step
    that went non-finite), ``target_step`` (the global step of the backup reloaded), the loss
    (``monitor``, ``value``), ``rollbacks`` so far and ``max_rollbacks``; the final stop's
    ``terminated_on_nan`` event the same values.

    Args:
        max_rollbacks: Rollbacks allowed before training stops. Defaults to ``3``.
        lr_factor: Multiply the learning rate by this after each rollback (e.g. ``0.5``);
            ``None`` keeps the restored rate. Defaults to ``None``.
        skip_batches: Skip the batch that produced the non-finite loss when replaying.
            Defaults to ``True``.

    Example:
        >>> cb = RollbackOnNaN(max_rollbacks=2, lr_factor=0.5)
        >>> [type(d).__name__ for d in cb.on_train_batch_end(4, {"loss": float("nan")})]
        ['SkipBatches', 'Rollback']
    """

    survives_rollback: ClassVar[bool] = True

    def __init__(self, max_rollbacks: int = 3, lr_factor: float | None = None, skip_batches: bool = True) -> None:
        super().__init__()
        if not isinstance(max_rollbacks, int) or isinstance(max_rollbacks, bool) or max_rollbacks < 0:
            raise ValueError(f"RollbackOnNaN: max_rollbacks must be an integer >= 0, got {max_rollbacks!r}")
        if lr_factor is not None and (not isinstance(lr_factor, (int, float)) or not 0 < lr_factor <= 1):
            raise ValueError(f"RollbackOnNaN: lr_factor must be in (0, 1] or None, got {lr_factor!r}")
        self.max_rollbacks = max_rollbacks
        self.lr_factor = lr_factor
        self.skip_batches = bool(skip_batches)
        self.rollbacks = 0
        self.skipped: list[tuple[int, int]] = []

    def on_train_begin(self, logs: dict | None = None) -> Backup | None:
        """A fresh run backs up its initial state, so even a NaN in the first batches can roll back."""
        if self.trainer.global_step == 0:
            return Backup(source="RollbackOnNaN")  # the run's backup folder and policy
        return None

    def on_batch_end(self, batch: int, logs: dict | None = None) -> list | StopTraining | None:
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(loss):
            return None
        if self.rollbacks >= self.max_rollbacks:
            print(f"Batch {batch}: Invalid loss after {self.rollbacks} rollbacks, terminating training")
            return StopTraining(reason="nan_detected", source="RollbackOnNaN", details=self._details(loss))
        self.rollbacks += 1
        if self.skip_batches:
            self.skipped.append((self.trainer.epoch, batch))
        return [SkipBatches(tuple(self.skipped)),
                Rollback(lr_factor=self.lr_factor, source="RollbackOnNaN", details=self._details(loss))]

    def _details(self, loss: float) -> dict[str, Any]:
        """What its event records: the non-finite loss and the rollbacks so far (this one included)."""
        return {"monitor": "loss", "value": float(loss), "rollbacks": self.rollbacks,
                "max_rollbacks": self.max_rollbacks}

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "skipped": [list(p) for p in self.skipped]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollbacks = int(state.get("rollbacks", 0))
        self.skipped = [(int(e), int(b)) for e, b in state.get("skipped", [])]
