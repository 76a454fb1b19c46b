"""Back up the full training state and resume from it (Keras 3 ``BackupAndRestore``, mid-epoch exact)."""

from __future__ import annotations

from typing import Any

from orchestrator.callbacks.base import Callback
from orchestrator.decisions import Backup


class BackupAndRestore(Callback):
    """Periodically back up the whole training state so an interrupted run resumes exactly.

    Unlike Keras, which restarts the interrupted epoch, a resumed run continues at the very
    next batch: model, optimizer, per-rank RNG streams, sampler position, partial epoch
    metrics, and the state of every callback and of the coordinator are all restored. On CPU
    the resumed run ends bit-identical to one that was never interrupted.

    A backup is ``<backup_dir>/step-<N>/``; it counts only once its manifest (file sizes and
    CRC-32 checksums, written last) exists. Resuming picks the newest committed step whose
    files verify; older steps are removed after a newer one commits.

    Args:
        backup_dir: Where backups go: a path relative to the run directory, or an fsspec URL on
            the run's filesystem. Defaults to ``"backup"`` (``<storage>/<run_name>/backup``).
            It becomes the run's backup folder: emergency backups on preemption and those of
            :class:`RollbackOnNaN` (``Backup(backup_dir=None)``) go there too.
        save_freq: ``"epoch"`` to back up at the end of every epoch, or an integer number of
            batches (counted across epochs, as Keras does). Defaults to ``"epoch"``.
        double_checkpoint: Keep the previous committed backup as well as the newest, as a
            fallback if the newest turns out corrupt. Defaults to ``False``.
        delete_checkpoint: Delete the backups once training finishes successfully. Defaults
            to ``True``.

    Example:
        >>> cb = BackupAndRestore(save_freq=50)
        >>> cb.batch_sync_every
        50
    """

    def __init__(self, backup_dir: str = "backup", save_freq: str | int = "epoch",
                 double_checkpoint: bool = False, delete_checkpoint: bool = True) -> None:
        super().__init__()
        if not isinstance(backup_dir, str) or not backup_dir.strip():
            raise ValueError(f"BackupAndRestore: backup_dir must be a non-empty path or URL, got {backup_dir!r}")
        if save_freq != "epoch" and (not isinstance(save_freq, int) or isinstance(save_freq, bool)
                                     or save_freq < 1):
            raise ValueError(
                f"Invalid value for argument `save_freq`. Received: save_freq={save_freq!r}. "
                "Expected either 'epoch' or a positive integer value."
            )
        self.backup_dir = backup_dir.rstrip("/")
        self.save_freq = save_freq
        self.double_checkpoint = bool(double_checkpoint)
        self.delete_checkpoint = bool(delete_checkpoint)
        self.batch_sync_every = save_freq if isinstance(save_freq, int) else None
        self._seen = 0  # global batches seen at the previous batch-hook call

    @property
    def keep(self) -> int:
        """How many committed backups to keep."""
        return 2 if self.double_checkpoint else 1

    def _decide(self) -> Backup:
        return Backup(backup_dir=self.backup_dir, keep=self.keep, source="BackupAndRestore")

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> Backup | None:
        if self.save_freq == "epoch":
            return None
        seen = self.trainer.global_step
        if seen // self.save_freq > self._seen // self.save_freq:
            self._seen = seen
            return self._decide()
        self._seen = seen
        return None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> Backup | None:
        return self._decide() if self.save_freq == "epoch" else None

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self._seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._seen = int(state.get("seen", 0))
