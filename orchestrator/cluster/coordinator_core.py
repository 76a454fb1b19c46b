"""The coordinator's logic, without Ray or torch: reports in, one list of decisions out.

:class:`CoordinatorCore` aggregates every rank's report for one sync point exactly, runs the
callbacks once on the cluster-wide logs, records events in the vocabulary of
:mod:`orchestrator.core.events`, and commits a backup once every rank's files are durable.
The ranks combine their reports of a sync point over their process group and rank 0 hands them
over once (:mod:`orchestrator.loop.group_link`), so the core runs once per point; the Ray actor in
:mod:`orchestrator.cluster.coordinator` only wires it to the ranks and the driver.
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
import warnings
from typing import Any, Callable

from orchestrator.callbacks.base import BackupCost, Callback, TrainingView
from orchestrator.callbacks.callback_list import CallbackList
from orchestrator.cluster.decision_events import Position, decision_event, with_details
from orchestrator.cluster.report_checks import same_data, same_lr
from orchestrator.cluster.specs import CoordinatorSpec
from orchestrator.core.events import EventType, undeclared_fields
from orchestrator.core.metrics import PhaseSums, aggregate
from orchestrator.cluster.saves_in_flight import SavesInFlight
from orchestrator.decisions import (Backup, Decision, Report, ReportKind, Rollback, SetLearningRate, SkipBatches,
                                    StopTraining, SyncEvery)
from orchestrator.storage.checkpoint import FileEntry, Manifest, commit, purge_older, read_coordinator_state, step_dir
from orchestrator.storage.layout import check_layout
from orchestrator.storage.lease import LeaseLost, check_token

#: One sync point's reports by rank: ``{0: combined}`` (the ranks' reports combined over their
#: process group), or every rank's report (when they disagree, so that the checks name each rank).
Reports = dict[int, Report]


class CoordinatorCore:
    """The coordinator's logic: run the callbacks once per sync point on cluster-wide logs.

    Args:
        callbacks: Callbacks that decide (``runs_on == "coordinator"``), in the user's order.
        params: Keras-style params given to every callback.
        world_size: Number of ranks (each commits its files of every backup).
        storage: The run storage backups are committed to (a ``RunStorage``), or None.
        restore: The coordinator state of the backup this attempt resumes from, or None.
        backup_dir: The run's backup folder, used by ``Backup`` decisions that leave it ``None``.
        keep_backups: Committed backups kept, used by ``Backup`` decisions that leave ``keep`` ``None``.
        resumed_from: The committed folder this attempt resumes from (never overwritten).
        lease_token: The driver's run-lease token, checked on storage before every commit and
            purge (a fenced-out attempt does neither, and stops); None: no check.
        failures: Failed attempts of the run the driver restarted after, before this one (callbacks
            read it as ``trainer.failures``).

    Example:
        >>> from orchestrator.decisions import ReportKind
        >>> core = CoordinatorCore([], {"epochs": 1}, world_size=1)
        >>> core.handle({0: Report(ReportKind.TRAIN_BEGIN, learning_rate=0.1, steps_per_epoch=4)})
        []
        >>> core.view.learning_rate
        0.1
    """

    def __init__(self, callbacks: list[Callback], params: dict[str, Any], world_size: int, *,
                 storage: Any = None, restore: dict[str, Any] | None = None, backup_dir: str = "backup",
                 keep_backups: int = 1, resumed_from: str | None = None, lease_token: int | None = None,
                 failures: int = 0) -> None:
        self.world_size = world_size
        self.lease_token = lease_token
        self.last_committed = resumed_from
        self.skip: list[tuple[int, int]] = [tuple(p) for p in (restore or {}).get("skip", [])]
        self.backup_dir = backup_dir
        self.keep_backups = keep_backups
        self.view = TrainingView(world_size=world_size, failures=failures)
        self.callbacks = CallbackList(callbacks, self.view)
        self.sync_every = self.callbacks.batch_sync_every()  # the ranks' batch sync interval (the plan's at first)
        self.callbacks.set_params(params)
        self.callbacks.set_storage(storage)
        self.storage = storage
        self.restore = restore
        self.events: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.error_traceback: str = ""
        self.last_logs: dict[str, float] = {}
        self.history: list[dict[str, Any]] = list((restore or {}).get("history", []))
        self.layout: dict[str, Any] | None = (restore or {}).get("layout")
        self.saves = SavesInFlight(world_size)  # decided, not yet committed
        self.sealed = False
        self._epoch_lr: float | None = (restore or {}).get("view", {}).get("epoch_learning_rate")
        self.position = Position.from_state(restore)  # where the ranks are: moved at every sync point
        self._rate_in: float | None = None
        self._handlers: dict[ReportKind, Callable[[Report, Reports], list[Decision]]] = {
            ReportKind.TRAIN_BEGIN: self._on_train_begin,
            ReportKind.EPOCH_BEGIN: self._on_epoch_begin,
            ReportKind.BATCH_END: self._on_batch_end,
            ReportKind.EPOCH_END: self._on_epoch_end,
            ReportKind.TRAIN_END: self._on_train_end,
        }

    @classmethod
    def from_spec(cls, spec: CoordinatorSpec) -> "CoordinatorCore":
        """The core for one attempt, its storage opened from the spec."""
        return cls(spec.callbacks, spec.params, spec.world_size,
                   storage=spec.storage.open() if spec.storage is not None else None, restore=spec.restore,
                   backup_dir=spec.backup_dir, keep_backups=spec.keep_backups, resumed_from=spec.resumed_from,
                   lease_token=spec.lease_token, failures=spec.failures)

    # -- state (travels inside Backup decisions) -----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"callbacks": self.callbacks.state_dict(), "history": [dict(h) for h in self.history],
                "last_logs": dict(self.last_logs), "skip": [list(p) for p in self.skip], "layout": self.layout,
                "view": {"learning_rate": self.view.learning_rate, "epoch_learning_rate": self._epoch_lr,
                         "epoch": self.view.epoch, "step": self.view.step, "global_step": self.view.global_step,
                         **self.position.state_dict()}}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.callbacks.load_state_dict(state.get("callbacks", []))
        self.history = [dict(h) for h in state.get("history", [])]
        self.last_logs = dict(state.get("last_logs", {}))
        view = state.get("view", {})
        self.view.epoch = int(view.get("epoch", 0))
        self.view.step = int(view.get("step", 0))
        self.position = Position.from_state(state)

    # -- sync points -----------------------------------------------------------------------
    def handle(self, reports: Reports) -> list[Decision]:
        """Run the hooks of one sync point once, on its reports; return the decisions for all ranks.

        ``reports`` is ``{0: combined}`` (the ranks' sums added up, flags OR-ed) or every rank's report;
        both give the same logs.

        A callback that raises stops every rank (``StopTraining(reason="callback_error")``); the
        exception is kept in :attr:`error` for the driver. Warnings become ``warning`` events.
        """
        if self.error is not None:
            return [StopTraining(reason="callback_error", source="coordinator")]
        first = reports[min(reports)]
        self._rate_in = first.learning_rate  # before the hooks: the "old" rate of a SetLearningRate they decide
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                decisions = self._handlers[first.kind](first, reports)
            except Exception as exc:  # a callback raised: stop every rank, re-raise on the driver
                self.error = exc
                self.error_traceback = traceback.format_exc()
                decisions = [StopTraining(reason="callback_error", source="coordinator")]
        for w in caught:  # the driver re-issues them, so users see Keras's warnings where they run fit
            self._emit(EventType.WARNING, message=str(w.message), category=w.category.__name__)
        every = self.callbacks.batch_sync_every()
        if every != self.sync_every and self.error is None:  # first: applied before a Rollback raises on the ranks
            self.sync_every = every
            decisions.insert(0, SyncEvery(every))
        return decisions

    def _emit(self, kind: EventType, **fields: Any) -> None:
        undeclared = undeclared_fields(kind, fields)
        if undeclared:
            raise ValueError(f"event {kind.value!r} has no fields {undeclared}; declare them in "
                             "orchestrator.core.events")
        self.events.append({"type": kind, "time": time.time(), **fields})

    def _record(self, decisions: list[Decision], epoch: int, step: int, poisoned: bool = False) -> list[Decision]:
        """Emit events for the decisions; fill Backups with the state as of now and Rollbacks with a folder.

        A sync point whose step was non-finite (``poisoned``) or that rolls back never backs up:
        the poisoned state is not worth keeping, and committing it would purge the rollback target.
        """
        rolls_back = any(isinstance(d, Rollback) for d in decisions)
        filled: list[Decision] = []
        for d in decisions:
            if isinstance(d, SkipBatches):
                self.skip = [tuple(p) for p in d.batches]
            elif isinstance(d, Rollback):
                d = self._roll_back(d, epoch, step)
            elif isinstance(d, Backup):
                if poisoned or rolls_back:
                    why = "rolled back at the same sync point" if rolls_back else "the step was not finite"
                    self._emit(EventType.BACKUP_SKIPPED, epoch=epoch, step=self.view.global_step,
                               reason=f"backup decided by {d.source or 'a callback'} not taken: {why}")
                    continue
                d = self._start_write(d)
                if d is None:
                    continue
            filled.append(d)
        rate = self.view.learning_rate if self._rate_in is None else self._rate_in  # what a SetLearningRate changes
        for d in filled:
            event = decision_event(d, learning_rate=rate, global_step=self.view.global_step)
            if event is not None:
                self._emit(event[0], epoch=epoch, step=step, **event[1])
            rate = d.value if isinstance(d, SetLearningRate) else rate
        return filled

    def _start_write(self, decision: Backup) -> Backup | None:
        """The decision with its folder, count, state and write number filled in; None when that
        exact state is already committed (never overwritten)."""
        d = dataclasses.replace(decision,
                                backup_dir=self.backup_dir if decision.backup_dir is None else decision.backup_dir,
                                keep=self.keep_backups if decision.keep is None else decision.keep)
        folder = step_dir(d.backup_dir, self.view.global_step)
        if self.last_committed == folder:
            return None
        write = self.saves.start(folder)  # reports of an earlier save of this folder are now stale
        return dataclasses.replace(d, coordinator_state=self.state_dict(), write=write)

    def _abandon_writes(self, reason: str) -> None:
        """Saves still in flight never commit: their commit would purge what is being restored."""
        for folder in self.saves.abandon():
            self._emit(EventType.BACKUP_SKIPPED, folder=folder, reason=reason)

    def _roll_back(self, decision: Rollback, epoch: int, step: int) -> Decision:
        """Restore the coordinator to the newest committed backup (keeping the state of callbacks
        that survive rollbacks); the ranks reload the same folder. Saves still in flight are
        abandoned, so nothing commits (and purges) while the ranks reload."""
        if self.last_committed is None or self.storage is None:
            self._emit(EventType.WARNING, message="a rollback was requested but no backup has been committed yet; "
                       "stopping training (add BackupAndRestore with a small save_freq)", category="UserWarning")
            return StopTraining(reason="nan_detected", source=decision.source)
        self._abandon_writes(f"abandoned: the run rolled back to {self.last_committed}")
        bad_step = self.view.global_step
        state = read_coordinator_state(self.storage, self.last_committed)
        survivors = {i: cb.state_dict() for i, cb in enumerate(self.callbacks.callbacks) if cb.survives_rollback}
        self._load_state(state)
        for i, st in survivors.items():
            self.callbacks.callbacks[i].load_state_dict(st)
        rate = float(state.get("view", {}).get("learning_rate", self.view.learning_rate))
        self.view.learning_rate = rate * decision.lr_factor if decision.lr_factor else rate
        self._epoch_lr = self.view.learning_rate  # the replay runs at this rate
        fields = {"folder": self.last_committed, "skip": [list(p) for p in self.skip], "source": decision.source,
                  "bad_step": bad_step, "target_step": int(state.get("view", {}).get("global_step", 0)),
                  "lr_factor": decision.lr_factor, "learning_rate": self.view.learning_rate}
        self._emit(EventType.ROLLED_BACK, epoch=epoch, step=step,
                   **with_details(EventType.ROLLED_BACK, fields, decision.details))
        return dataclasses.replace(decision, folder=self.last_committed)

    def _on_train_begin(self, first: Report, reports: Reports) -> list[Decision]:
        self.view.learning_rate = same_lr(reports)
        same_data(reports)
        if first.layout is not None:  # what this attempt's positions mean; a resume must not change it
            check_layout(self.layout, first.layout, self.last_committed or "the backup")
            self.layout = dict(first.layout)
        self.callbacks.params["steps"] = first.steps_per_epoch
        self.view.global_step = self.position.global_step = first.global_step
        self._emit(EventType.TRAIN_BEGIN, steps=first.steps_per_epoch, global_step=first.global_step,
                   epoch=self.position.epoch, initial_step=max(self.position.done, 0))
        decisions = self.callbacks.call("on_train_begin", {})
        if self.restore is not None:  # after on_train_begin, which resets callbacks as Keras does
            self._load_state(self.restore)
        if self.skip:
            decisions.append(SkipBatches(tuple(self.skip)))
        return self._record(decisions, 0, -1)

    def _on_epoch_begin(self, first: Report, reports: Reports) -> list[Decision]:
        self.view.epoch, self.view.step = first.epoch, 0
        self.view.learning_rate = same_lr(reports)
        self.position.move(first.epoch, 0, first.global_step)
        self._emit(EventType.EPOCH_BEGIN, epoch=first.epoch, global_step=first.global_step)
        decisions = self.callbacks.call("on_epoch_begin", first.epoch, {})
        if self.callbacks.batch_sync_every() is not None:
            decisions += self.callbacks.call("on_train_batch_begin", 0, {})
        self._epoch_lr = self.view.learning_rate  # what History logs for this epoch
        return self._record(decisions, first.epoch, -1)

    def _on_batch_end(self, first: Report, reports: Reports) -> list[Decision]:
        self.view.step, self.view.global_step = first.step, first.global_step
        self.position.move(first.epoch, first.step + 1, first.global_step)
        self.view.learning_rate = same_lr(reports)  # a per-step schedule moves it between epochs
        nonfinite = any(r.nonfinite for r in reports.values())
        if any(r.preempted for r in reports.values()):  # an emergency backup at this very step, then a stop
            self._emit(EventType.PREEMPTED, epoch=first.epoch, step=first.global_step)
            return self._record([Backup(source="preemption"), StopTraining(reason="preempted", source="preemption")],
                                first.epoch, first.step)
        logs = aggregate(_sums(r.train) for r in reports.values())
        if nonfinite and math.isfinite(logs.get("loss", math.nan)):
            logs["loss"] = math.nan
        if nonfinite:
            self._emit(EventType.NAN_DETECTED, epoch=first.epoch, step=first.step, global_step=first.global_step)
        decisions = self.callbacks.call("on_train_batch_end", first.step, dict(logs))
        self._emit(EventType.BATCH_END, epoch=first.epoch, step=first.step, logs=logs, global_step=first.global_step)
        more = not first.epoch_ends and (first.steps_per_epoch is None or first.step + 1 < first.steps_per_epoch)
        if not any(isinstance(d, StopTraining) for d in decisions) and more \
                and self.callbacks.batch_sync_every() is not None:
            decisions += self.callbacks.call("on_train_batch_begin", first.step + 1, {})
        return self._record(decisions, first.epoch, first.step, poisoned=nonfinite)

    def _on_epoch_end(self, first: Report, reports: Reports) -> list[Decision]:
        self.view.global_step = first.global_step
        self.position.move(first.epoch + 1, 0, first.global_step)  # before any Backup: it resumes the next epoch
        lr_used = self._epoch_lr if self._epoch_lr is not None else self.view.learning_rate
        # History logs the rate the epoch started with; epoch-end callbacks see the rate now (a per-step
        # schedule moved it), which a SetLearningRate they decide is relative to
        self.view.learning_rate = same_lr(reports)
        logs = aggregate(_sums(r.train) for r in reports.values())
        if first.val is not None:
            val_logs = aggregate(_sums(r.val) for r in reports.values())
            decisions = self.callbacks.call("on_test_begin", {})
            decisions += self.callbacks.call("on_test_end", dict(val_logs))
            logs.update({f"val_{k}": v for k, v in val_logs.items()})
        else:
            decisions = []
        logs["learning_rate"] = lr_used
        decisions += self.callbacks.call("on_epoch_end", first.epoch, logs)
        logs["learning_rate"] = lr_used  # Keras logs the rate used during the epoch
        self.last_logs = dict(logs)
        self.history.append({"epoch": first.epoch, "logs": dict(logs)})
        self._emit(EventType.EPOCH_END, epoch=first.epoch, logs=dict(logs), global_step=first.global_step)
        if any(r.preempted for r in reports.values()) \
                and not any(isinstance(d, (StopTraining, Rollback)) for d in decisions):
            # a rank got a preemption notice by this epoch's end: an emergency backup of the finished epoch
            # (its hooks ran), then a stop; a run the hooks stop or roll back carries on as decided instead
            self._emit(EventType.PREEMPTED, epoch=first.epoch, step=first.global_step)
            if not any(isinstance(d, Backup) for d in decisions):
                decisions.append(Backup(source="preemption"))
            decisions.append(StopTraining(reason="preempted", source="preemption"))
        return self._record(decisions, first.epoch, -1)

    def _on_train_end(self, first: Report, reports: Reports) -> list[Decision]:
        decisions = self.callbacks.call("on_train_end", dict(self.last_logs))
        self._emit(EventType.TRAIN_END, logs=dict(self.last_logs))
        return self._record(decisions, first.epoch, -1)

    # -- between sync points ---------------------------------------------------------------
    def progress(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        """Rank 0's running logs, for the driver's progress bar (with the global step, when known)."""
        self._emit(EventType.PROGRESS, epoch=epoch, step=step, logs=logs,
                   global_step=self.position.global_at(epoch, step))

    def persisted(self, rank: int, folder: str, entries: list[FileEntry] | None, meta: dict[str, Any]) -> None:
        """Record one rank's durable files; commit the step once every rank's are in (in any order).

        ``entries`` is None when the rank could not write its files: that save is never committed.
        After :meth:`seal` nothing is recorded or committed any more.
        A report of another save than the one in flight for ``folder`` (an earlier save of a
        folder written again after a rollback, or one abandoned by a rollback) is ignored.
        """
        if self.sealed or not self.saves.current(folder, meta.get("write")):
            return
        if entries is None:
            self._emit(EventType.BACKUP_FAILED, rank=rank, folder=folder, step=meta.get("step"),
                       error=meta.get("error"))
            self.saves.fail(folder)
            return
        done = self.saves.add(rank, folder, entries, float(meta.get("stall_s") or 0.0))
        if done is None:
            return
        manifest = Manifest(step=int(meta["step"]), epoch=int(meta["epoch"]), batch=int(meta["batch"]),
                            phase=str(meta["phase"]), world_size=self.world_size, files=done.files,
                            token=self.lease_token)
        if not self._still_owner(folder):
            return
        commit(self.storage, meta["backup_dir"], manifest)
        self.last_committed = folder
        removed = purge_older(self.storage, meta["backup_dir"], manifest.step, keep=int(meta.get("keep", 1))) \
            if self._still_owner(folder) else []
        self.view.last_backup = BackupCost(step=manifest.step, stall_s=done.stall_s, persist_s=done.persist_s)
        self._emit(EventType.BACKUP_COMMITTED, epoch=manifest.epoch, step=manifest.step, folder=folder,
                   bytes=sum(f.size for f in done.files), purged=removed, stall_s=round(done.stall_s, 4),
                   persist_s=round(done.persist_s, 4))

    def seal(self) -> None:
        """The attempt is ending: commit nothing more, so that every commit made has its event drained."""
        self.sealed = True

    def _still_owner(self, folder: str) -> bool:
        """Whether this attempt still holds the run lease; if not, it stops (the error goes to the driver)."""
        if self.lease_token is None or self.storage is None:
            return True
        try:
            check_token(self.storage, self.lease_token)
        except LeaseLost as exc:
            self._emit(EventType.BACKUP_FAILED, folder=folder, rank=None, error=f"fenced out: {exc}")
            if self.error is None:
                self.error = exc  # the next sync point stops every rank; the driver raises it
            return False
        return True

    def drain(self) -> list[dict[str, Any]]:
        """The events recorded since the previous call, oldest first."""
        events, self.events = self.events, []
        return events


def _sums(value: object) -> PhaseSums:
    return value if isinstance(value, PhaseSums) else PhaseSums()
