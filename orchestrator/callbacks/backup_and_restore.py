"""Back up the full training state and resume from it (Keras 3 ``BackupAndRestore``, mid-epoch exact)."""

from __future__ import annotations

import math
import time
from typing import Any

from orchestrator.callbacks.backup_interval import AutoInterval
from orchestrator.callbacks.base import Callback
from orchestrator.decisions import Backup, BackupInterval, Decision

#: ``mtbf_s`` of ``save_freq="auto"`` when not given: one failure a day.
DEFAULT_MTBF_S = 24 * 3600.0


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
        save_freq: ``"epoch"`` to back up at the end of every epoch, an integer number of
            batches (counted across epochs, as Keras does), or ``"auto"``: every N batches with N
            chosen, and re-chosen as the costs change, by the Young/Daly rule
            ``sqrt(2 * C * MTBF)`` from the measured backup stall C, ``mtbf_s`` and the measured
            step time (see :mod:`orchestrator.callbacks.backup_interval`; each choice is a
            ``backup_interval`` event). Defaults to ``"epoch"``.
        double_checkpoint: Keep the previous committed backup as well as the newest, as a
            fallback if the newest turns out corrupt. Defaults to ``False``.
        delete_checkpoint: Delete the backups once training finishes successfully. Defaults
            to ``True``.
        mtbf_s: With ``save_freq="auto"`` only: the mean seconds between failures of the whole
            job. Once the run has restarted after failures, the observed rate takes over
            (``(trained seconds + mtbf_s) / (failures + 1)``). Defaults to 24 hours.
        min_interval_s: With ``save_freq="auto"`` only: the shortest interval in seconds (the
            measured persist time raises it, so backups never queue). Defaults to ``10.0``.
        max_interval_s: With ``save_freq="auto"`` only: the longest interval in seconds.
            Defaults to ``3600.0``.

    With ``save_freq="auto"`` the ranks sync at the first step (to time it); the first backup
    comes after ``min_interval_s`` (it measures the cost), and from then on every sync point
    re-evaluates the interval from the newest costs. Backups land on multiples of the interval,
    as with an integer ``save_freq``.

    Example:
        >>> cb = BackupAndRestore(save_freq=50)
        >>> cb.batch_sync_every
        50
        >>> BackupAndRestore(save_freq="auto", mtbf_s=3600.0).batch_sync_every  # until the first step is timed
        1
    """

    def __init__(self, backup_dir: str = "backup", save_freq: str | int = "epoch",
                 double_checkpoint: bool = False, delete_checkpoint: bool = True, *,
                 mtbf_s: float | None = None, min_interval_s: float | None = None,
                 max_interval_s: float | None = None) -> None:
        super().__init__()
        if not isinstance(backup_dir, str) or not backup_dir.strip():
            raise ValueError(f"BackupAndRestore: backup_dir must be a non-empty path or URL, got {backup_dir!r}")
        if save_freq not in ("epoch", "auto") and (not isinstance(save_freq, int) or isinstance(save_freq, bool)
                                                   or save_freq < 1):
            raise ValueError(
                f"Invalid value for argument `save_freq`. Received: save_freq={save_freq!r}. "
                "Expected either 'epoch', 'auto' or a positive integer value."
            )
        self.backup_dir = backup_dir.rstrip("/")
        self.save_freq = save_freq
        self.double_checkpoint = bool(double_checkpoint)
        self.delete_checkpoint = bool(delete_checkpoint)
        self.batch_sync_every = save_freq if isinstance(save_freq, int) else None
        self._seen = 0  # global batches seen at the previous batch-hook call
        self.auto: AutoInterval | None = None
        if save_freq == "auto":
            self.auto = AutoInterval(*_auto_args(mtbf_s, min_interval_s, max_interval_s))
            self.batch_sync_every = 1  # the first step is timed, then the interval is chosen
        else:
            for name, value in (("mtbf_s", mtbf_s), ("min_interval_s", min_interval_s),
                                ("max_interval_s", max_interval_s)):
                if value is not None:
                    raise ValueError(f"BackupAndRestore: {name} applies only to save_freq='auto', "
                                     f"got {name}={value!r} with save_freq={save_freq!r}")
        self._clock: tuple[float, int] | None = None  # (monotonic seconds, global step) at the previous sync
        self._trained_s = 0.0  # wall seconds trained, over every attempt (as of the backup resumed from)
        self._cost_step: int | None = None  # the step of the newest backup cost taken into account

    @property
    def keep(self) -> int:
        """How many committed backups to keep."""
        return 2 if self.double_checkpoint else 1

    def _decide(self) -> Backup:
        return Backup(backup_dir=self.backup_dir, keep=self.keep, source="BackupAndRestore")

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._clock = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.auto is not None:  # the time from here to the next batch sync is training only
            self._clock = (time.monotonic(), self.trainer.global_step)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> Decision | list[Decision] | None:
        if self.save_freq == "epoch":
            return None
        decisions: list[Decision] = self._re_evaluate() if self.auto is not None else []
        seen = self.trainer.global_step
        every = self.batch_sync_every or 1
        if seen // every > self._seen // every:
            decisions.append(self._decide())
        self._seen = seen
        return decisions or None

    def _re_evaluate(self) -> list[Decision]:
        """``save_freq="auto"``: take in the step time and the newest backup cost; a new interval if due."""
        assert self.auto is not None
        now, step = time.monotonic(), self.trainer.global_step
        if self._clock is not None and step > self._clock[1]:
            self.auto.see_steps(now - self._clock[0], step - self._clock[1])
            self._trained_s += now - self._clock[0]
        self._clock = (now, step)
        cost = self.trainer.last_backup
        if cost is not None and cost.step != self._cost_step:
            self._cost_step = cost.step
            self.auto.see_backup(cost.stall_s, cost.persist_s)
        choice = self.auto.evaluate(self._trained_s, self.trainer.failures)
        if choice is None:
            return []
        self.batch_sync_every = choice.steps
        details = choice.fields()
        details.pop("steps")
        return [BackupInterval(steps=choice.steps, source=self.name, details=details)]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> Backup | None:
        return self._decide() if self.save_freq == "epoch" else None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"seen": self._seen}
        if self.auto is not None:
            state.update(auto=self.auto.state_dict(), every=self.batch_sync_every, trained_s=self._trained_s,
                         cost_step=self._cost_step)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._seen = int(state.get("seen", 0))
        if self.auto is not None and "auto" in state:
            self.auto.load_state_dict(state["auto"])
            self.batch_sync_every = int(state.get("every") or 1)
            self._trained_s = float(state.get("trained_s", 0.0))
            self._cost_step = state.get("cost_step")


def _auto_args(mtbf_s: float | None, min_interval_s: float | None,
               max_interval_s: float | None) -> tuple[float, float, float]:
    """The ``save_freq="auto"`` settings with their defaults; ValueError naming a bad one."""
    values = {"mtbf_s": DEFAULT_MTBF_S if mtbf_s is None else mtbf_s,
              "min_interval_s": 10.0 if min_interval_s is None else min_interval_s,
              "max_interval_s": 3600.0 if max_interval_s is None else max_interval_s}
    for name, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                or value < 0 or (value == 0 and name != "min_interval_s"):
            need = "a non-negative" if name == "min_interval_s" else "a positive"
            raise ValueError(f"BackupAndRestore: {name} must be {need} finite number of seconds, got {name}={value!r}")
    if values["max_interval_s"] < values["min_interval_s"]:
        raise ValueError(f"BackupAndRestore: max_interval_s={values['max_interval_s']!r} is below "
                         f"min_interval_s={values['min_interval_s']!r}")
    return float(values["mtbf_s"]), float(values["min_interval_s"]), float(values["max_interval_s"])
