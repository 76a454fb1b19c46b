"""The coordinator: one Ray actor that turns every rank's reports into one set of decisions.

Each rank calls :meth:`Coordinator.sync` at the same sync point. The last rank to arrive
triggers the aggregation and the callbacks, exactly once; every rank gets the same decision
list back. Progress and epoch logs queue up for the driver, which polls :meth:`poll`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import ray

from orchestrator.callbacks.base import Callback, TrainingView
from orchestrator.callbacks.callback_list import CallbackList
from orchestrator.storage.checkpoint import FileEntry, Manifest, commit, purge_older, read_coordinator_state, step_dir
from orchestrator.decisions import (
    Backup,
    Decision,
    Report,
    Rollback,
    SaveModel,
    SetLearningRate,
    SkipBatches,
    StopTraining,
)
from orchestrator.cluster.specs import CoordinatorSpec
from orchestrator.core.metrics import PhaseSums, aggregate

logger = logging.getLogger(__name__)


@dataclass
class _Barrier:
    reports: dict[int, Report] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: list[Decision] = field(default_factory=list)
    served: int = 0


class CoordinatorCore:
    """The coordinator's logic without Ray (tested directly; wrapped by the actor below).

    Args:
        callbacks: Callbacks that decide (``runs_on == "coordinator"``).
        params: Keras-style params given to every callback.
        world_size: Number of ranks that report at each sync point.
    """

    def __init__(self, callbacks: list[Callback], params: dict[str, Any], world_size: int,
                 storage: Any = None, restore: dict[str, Any] | None = None, backup_dir: str = "backup",
                 keep_backups: int = 1, resumed_from: str | None = None) -> None:
        self.world_size = world_size
        self.last_committed = resumed_from
        self.skip: list[tuple[int, int]] = [tuple(p) for p in (restore or {}).get("skip", [])]
        self.backup_dir = backup_dir
        self.keep_backups = keep_backups
        self.view = TrainingView(world_size=world_size)
        self.callbacks = CallbackList(callbacks, self.view)
        self.callbacks.set_params(params)
        self.storage = storage
        self.restore = restore
        self.events: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.error_traceback: str = ""
        self.last_logs: dict[str, float] = {}
        self.history: list[dict[str, Any]] = list((restore or {}).get("history", []))
        self._persisted: dict[str, dict[int, list[FileEntry] | None]] = {}

    # -- state (travels inside Backup decisions) -----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"callbacks": self.callbacks.state_dict(), "history": [dict(h) for h in self.history],
                "last_logs": dict(self.last_logs), "skip": [list(p) for p in self.skip],
                "view": {"learning_rate": self.view.learning_rate, "epoch": self.view.epoch,
                         "step": self.view.step, "global_step": self.view.global_step}}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.callbacks.load_state_dict(state.get("callbacks", []))
        self.history = [dict(h) for h in state.get("history", [])]
        self.last_logs = dict(state.get("last_logs", {}))
        view = state.get("view", {})
        self.view.epoch = int(view.get("epoch", 0))
        self.view.step = int(view.get("step", 0))

    def handle(self, reports: dict[int, Report]) -> list[Decision]:
        """Run the hooks for one sync point, once; return the decisions for every rank."""
        if self.error is not None:
            return [StopTraining(reason="callback_error", source="coordinator")]
        first = reports[min(reports)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                decisions = getattr(self, f"_on_{first.kind}")(first, reports)
            except Exception as exc:  # a callback raised: stop every rank, re-raise on the driver
                self.error = exc
                self.error_traceback = traceback.format_exc()
                decisions = [StopTraining(reason="callback_error", source="coordinator")]
        for w in caught:  # the driver re-issues them, so users see Keras's warnings where they run fit
            self._emit("warning", message=str(w.message), category=w.category.__name__)
        return decisions

    def _emit(self, type_: str, **fields: Any) -> None:
        self.events.append({"type": type_, "time": time.time(), **fields})

    def _record(self, decisions: list[Decision], epoch: int, step: int) -> list[Decision]:
        """Emit events for the decisions; fill Backups with the state as of now and Rollbacks with a folder."""
        filled: list[Decision] = []
        for d in decisions:
            if isinstance(d, SkipBatches):
                self.skip = [tuple(p) for p in d.batches]
            elif isinstance(d, Rollback):
                d = self._roll_back(d, epoch, step)
            elif isinstance(d, Backup):
                if not d.backup_dir:  # "the run's backup folder"
                    d = dataclasses.replace(d, backup_dir=self.backup_dir, keep=self.keep_backups)
                if self.last_committed == step_dir(d.backup_dir, self.view.global_step):
                    continue  # that exact state is already committed; never overwrite it
                d = dataclasses.replace(d, coordinator_state=self.state_dict())
            filled.append(d)
        decisions = filled
        for d in decisions:
            if isinstance(d, SaveModel):
                self._emit("checkpoint_saved", path=d.filepath, epoch=epoch, step=step)
            elif isinstance(d, StopTraining):
                self._emit("stop", reason=d.reason, source=d.source, epoch=epoch, step=step)
            elif isinstance(d, SetLearningRate):
                self._emit("lr_changed", value=d.value, source=d.source, epoch=epoch, step=step)
        return decisions

    def _roll_back(self, decision: Rollback, epoch: int, step: int) -> Decision:
        """Restore the coordinator to the newest committed backup (keeping the state of callbacks
        that survive rollbacks); the ranks reload the same folder."""
        if self.last_committed is None or self.storage is None:
            self._emit("warning", message="a rollback was requested but no backup has been committed yet; "
                       "stopping training (add BackupAndRestore with a small save_freq)", category="UserWarning")
            return StopTraining(reason="nan_detected", source=decision.source)
        state = read_coordinator_state(self.storage, self.last_committed)
        survivors = {i: cb.state_dict() for i, cb in enumerate(self.callbacks.callbacks)
                     if getattr(cb, "survives_rollback", False)}
        self._load_state(state)
        for i, st in survivors.items():
            self.callbacks.callbacks[i].load_state_dict(st)
        rate = float(state.get("view", {}).get("learning_rate", self.view.learning_rate))
        self.view.learning_rate = rate * decision.lr_factor if decision.lr_factor else rate
        self._emit("rolled_back", epoch=epoch, step=step, folder=self.last_committed, skip=[list(p) for p in self.skip])
        return dataclasses.replace(decision, folder=self.last_committed)

    def _check_same_lr(self, reports: dict[int, Report]) -> float:
        rates = {r.learning_rate for r in reports.values()}
        if len(rates) > 1:
            raise RuntimeError(f"ranks disagree on the learning rate: {sorted(rates)}")
        return rates.pop()

    def _on_train_begin(self, first: Report, reports: dict[int, Report]) -> list[Decision]:
        self.view.learning_rate = self._check_same_lr(reports)
        self.callbacks.params["steps"] = first.steps_per_epoch
        self.view.global_step = first.global_step
        self._emit("train_begin", steps=first.steps_per_epoch, global_step=first.global_step)
        decisions = self.callbacks.call("on_train_begin", {})
        if self.restore is not None:  # after on_train_begin, which resets callbacks as Keras does
            self._load_state(self.restore)
        if self.skip:
            decisions.append(SkipBatches(tuple(self.skip)))
        return self._record(decisions, 0, -1)

    def _on_epoch_begin(self, first: Report, reports: dict[int, Report]) -> list[Decision]:
        self.view.epoch, self.view.step = first.epoch, 0
        self.view.learning_rate = self._check_same_lr(reports)
        self._emit("epoch_begin", epoch=first.epoch)
        decisions = self.callbacks.call("on_epoch_begin", first.epoch, {})
        if self.callbacks.batch_sync_every() is not None:
            decisions += self.callbacks.call("on_train_batch_begin", 0, {})
        return self._record(decisions, first.epoch, -1)

    def _on_batch_end(self, first: Report, reports: dict[int, Report]) -> list[Decision]:
        self.view.step, self.view.global_step = first.step, first.global_step
        if first.preempted:  # an emergency backup at this very step, then every rank stops
            self._emit("preempted", epoch=first.epoch, step=first.global_step)
            return self._record([Backup(backup_dir=self.backup_dir, keep=self.keep_backups, source="preemption"),
                                 StopTraining(reason="preempted", source="preemption")], first.epoch, first.step)
        logs = aggregate(_sums(r.train) for r in reports.values())
        if first.nonfinite and math.isfinite(logs.get("loss", math.nan)):
            logs["loss"] = math.nan
        if first.nonfinite:
            self._emit("nan_detected", epoch=first.epoch, step=first.step)
        decisions = self.callbacks.call("on_train_batch_end", first.step, dict(logs))
        self._emit("batch_end", epoch=first.epoch, step=first.step, logs=logs)
        if not any(isinstance(d, StopTraining) for d in decisions) and first.step + 1 < first.steps_per_epoch \
                and self.callbacks.batch_sync_every() is not None:
            decisions += self.callbacks.call("on_train_batch_begin", first.step + 1, {})
        return self._record(decisions, first.epoch, first.step)

    def _on_epoch_end(self, first: Report, reports: dict[int, Report]) -> list[Decision]:
        self.view.global_step = first.global_step
        lr_used = self.view.learning_rate
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
        self._emit("epoch_end", epoch=first.epoch, logs=dict(logs))
        return self._record(decisions, first.epoch, -1)

    def _on_train_end(self, first: Report, reports: dict[int, Report]) -> list[Decision]:
        decisions = self.callbacks.call("on_train_end", dict(self.last_logs))
        self._emit("train_end", logs=dict(self.last_logs))
        return self._record(decisions, first.epoch, -1)

    def progress(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        self._emit("progress", epoch=epoch, step=step, logs=logs)

    def persisted(self, rank: int, folder: str, entries: list[FileEntry] | None, meta: dict[str, Any]) -> None:
        """Record one rank's durable files; commit the step when every rank's are in."""
        if entries is None:
            self._emit("backup_failed", rank=rank, folder=folder, step=meta.get("step"), error=meta.get("error"))
            self._persisted.pop(folder, None)
            return
        ranks = self._persisted.setdefault(folder, {})
        ranks[rank] = entries
        if len(ranks) < self.world_size or any(v is None for v in ranks.values()):
            return
        del self._persisted[folder]
        files = [e for r in sorted(ranks) for e in ranks[r]]
        manifest = Manifest(step=int(meta["step"]), epoch=int(meta["epoch"]), batch=int(meta["batch"]),
                            phase=str(meta["phase"]), world_size=self.world_size, files=files)
        commit(self.storage, meta["backup_dir"], manifest)
        self.last_committed = folder
        removed = purge_older(self.storage, meta["backup_dir"], manifest.step, keep=int(meta.get("keep", 1)))
        self._emit("backup_committed", epoch=manifest.epoch, step=manifest.step, folder=folder,
                   bytes=sum(f.size for f in files), purged=removed)

    def drain(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events


def _sums(value: object) -> PhaseSums:
    return value if isinstance(value, PhaseSums) else PhaseSums()


@ray.remote(num_cpus=0, max_restarts=0)
class Coordinator:
    """Ray actor around :class:`CoordinatorCore` with a per-sync-point barrier.

    Started bare (so that a spare can be started ahead of a restart), then given its run with
    :meth:`setup` before any rank talks to it.
    """

    def __init__(self) -> None:
        self.core: CoordinatorCore = None  # type: ignore[assignment] - set by setup()
        self._barriers: dict[tuple[str, int, int], _Barrier] = {}
        self._beats: dict[int, float] = {}  # a rank is watched from its first sign of life on
        self._waiting: set[int] = set()

    def setup(self, spec: CoordinatorSpec) -> None:
        storage = spec.storage.open() if spec.storage is not None else None
        self.core = CoordinatorCore(spec.callbacks, spec.params, spec.world_size, storage, spec.restore,
                                    spec.backup_dir, spec.keep_backups, spec.resumed_from)

    async def sync(self, rank: int, report: Report) -> list[Decision]:
        key = (report.kind, report.epoch, report.step)
        barrier = self._barriers.setdefault(key, _Barrier())
        barrier.reports[rank] = report
        self._waiting.add(rank)  # a rank waiting here for the others is alive
        try:
            if len(barrier.reports) == self.core.world_size:
                barrier.result = self.core.handle(barrier.reports)
                barrier.done.set()
            await barrier.done.wait()
        finally:
            self._waiting.discard(rank)
            self._beats[rank] = time.monotonic()
        barrier.served += 1
        if barrier.served == self.core.world_size:
            del self._barriers[key]
        return barrier.result

    def heartbeat(self, rank: int) -> None:
        self._beats[rank] = time.monotonic()

    def node_id(self) -> str:
        """The Ray node this coordinator runs on (watched for drains like the workers' nodes)."""
        return ray.get_runtime_context().get_node_id()

    def progress(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        self._beats[0] = time.monotonic()
        self.core.progress(epoch, step, logs)

    def persisted(self, rank: int, folder: str, entries: list[FileEntry] | None, meta: dict[str, Any]) -> None:
        self.core.persisted(rank, folder, entries, meta)

    def poll(self) -> tuple[list[dict[str, Any]], dict[int, float]]:
        """New events, and each started rank's seconds since its last sign of life (0 while waiting at a sync)."""
        now = time.monotonic()
        ages = {rank: 0.0 if rank in self._waiting else now - beat for rank, beat in self._beats.items()}
        return self.core.drain(), ages

    def callback_states(self) -> list[dict[str, Any]]:
        return self.core.callbacks.state_dict()

    def error(self) -> tuple[BaseException | None, str]:
        error = self.core.error
        if error is not None:
            try:
                ray.cloudpickle.dumps(error)
            except Exception:
                error = None  # the traceback text still reaches the driver
        return error, self.core.error_traceback
