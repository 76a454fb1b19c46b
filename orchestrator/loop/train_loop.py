"""The per-worker training loop: torch only, no Ray.

Every rank runs :class:`TrainLoop`. Per step it does forward, backward and the optimizer step.
The step's per-rank signals ``[non-finite loss flag, loss * n, n, preemption notice, out of data]`` ride the
step's own gradient all-reduce: they are the gradient of a small "signal" parameter (see
:class:`SignalledModule`), so DDP averages them together with the model's gradients and no extra
collective runs. The averaged gradients are identical on every rank, so every rank also checks
them for non-finite values locally and reaches the same verdict: such a step applies no update
and is reported like a non-finite loss. Per epoch (and at the rare batch sync points) it sends a
:class:`~orchestrator.decisions.Report` through a :class:`CoordinatorLink` and applies the
decisions it gets back. All ranks get the same decisions, so they stay in lockstep without ever
deciding alone.

A preemption notice is honoured at the next training step (in its all-reduce), during validation
(a small all-reduce of the notice at rounds 0 and 1, then about every 0.5 s: validation is abandoned
on every rank together and the emergency backup holds the end of the epoch's training, so a resume
redoes validation and the epoch-end hooks once) and at the epoch-end sync point (the coordinator runs
the epoch-end hooks, then decides the emergency backup). The validation pass is
:class:`~orchestrator.loop.validation.Validation`.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable

import torch

from orchestrator.decisions import (Backup, Decision, Report, ReportKind, RestoreWeights, Rollback, SaveModel,
                                    SetLearningRate, SkipBatches, SnapshotWeights, StopTraining, SyncEvery,
                                    WriteHistograms)
from orchestrator.core.config import elastic_accumulation, validation_due
from orchestrator.loop.data import ShardSampler, Window, epoch_window, make_loader, shutdown_workers
from orchestrator.loop.live import DERIVED, LiveState, reseed
from orchestrator.loop.group_link import Pulse
from orchestrator.loop.iterable import DataInput, as_datasets, data_components, train_stream
from orchestrator.loop.model_side import ModelSide, build_model_side, release_reducer
from orchestrator.loop.optim_step import OptimStep, micro_batch_groups, steps_per_epoch
from orchestrator.loop.rank_state import MetricSums, Position, rank_components
from orchestrator.loop.saver import PendingRestore, RankSaver
from orchestrator.loop.regroup import check_regroup, regrouped
from orchestrator.loop.specs import CoordinatorLink, LoopResult, TrainSpec
from orchestrator.loop.steps import make_default_step, resolve_metrics
from orchestrator.loop.validation import Validation
from orchestrator.storage.layout import ResumeMismatch, check_layout, config_layout


class _RolledBack(Exception):
    """Unwinds the loop after every rank reloaded a backup (a Rollback decision)."""


class TrainLoop:
    """One rank's training loop.

    Its state is :attr:`components`, a mapping of named components
    (:class:`~orchestrator.loop.rank_state.Component`) built with the model: ``model``,
    ``optimizer``, ``snapshots`` (shared by all ranks) and ``position``, ``metric_sums``,
    ``result``, ``rng`` (each rank's own; ``rng`` restored last). Backups, resumes and
    rollbacks save and load exactly that mapping.

    Args:
        spec: What every rank of this attempt runs (loop config, epochs, resume point, ...).
        rank: This rank.
        world_size: Number of ranks.
        device: Where the model lives.
        link: The coordinator link.
        storage: The opened run storage (for backups and checkpoints), or None.
        preemption: Set (from another thread) when a preemption notice arrives.
        data_input: ``data()``'s value to ``(train, val)`` (Ray layer: Ray Datasets to shards). Defaults to as is.
        live_restore: ``(shared states, own states)`` copied from the survivors of a failed attempt
            (a live recovery, see :mod:`~orchestrator.loop.live`), loaded instead of a backup. Defaults to None.

    Example:
        >>> result = TrainLoop(spec, rank=0, world_size=1, device=torch.device("cpu"),
        ...                    link=link, storage=spec.storage.open()).run()  # doctest: +SKIP
    """

    def __init__(self, spec: TrainSpec, rank: int, world_size: int, device: torch.device,
                 link: CoordinatorLink, storage: Any = None, preemption: threading.Event | None = None,
                 data_input: DataInput = as_datasets,
                 live_restore: tuple[dict[str, Any], dict[str, Any]] | None = None) -> None:
        self.spec = spec
        self.config = spec.loop
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.link = link
        self.epochs = spec.epochs
        self.batch_sync_every = spec.batch_sync_every
        self.storage = storage
        self.resume_from = spec.resume_from
        self.preemption, self.data_input = preemption or threading.Event(), data_input
        self.live_restore = live_restore
        self.live: LiveState | None = None  # built with the components; a survivor's state is copied from it
        self.skip: set[tuple[int, int]] = set()
        self.position = Position()
        self.metric_sums = MetricSums(device)
        self.result = LoopResult(rank=rank)
        self.pulse = Pulse(link, rank, spec.loop.progress_interval_s)  # progress and heartbeats, time-gated
        #: Micro-batches per optimizer step: an elastic run on fewer ranks runs more (the same global batch).
        self.accumulate = spec.loop.accumulate_grad_batches if spec.max_workers is None else \
            elastic_accumulation(spec.loop.accumulate_grad_batches, spec.max_workers, world_size)

    # -- setup ---------------------------------------------------------------------------
    def _build(self) -> None:
        """The model side (:mod:`~orchestrator.loop.model_side`), the data, then the named components."""
        side = build_model_side(self.config, self.device, self.world_size)
        self.model, self.optimizer, self.precision, self.ddp = side.model, side.optimizer, side.precision, side.ddp
        self.lr_scheduler, self.lrs, self.snapshots = side.lr_scheduler, side.lrs, side.snapshots
        self.fsdp = side.sharded
        train_ds = self._build_data()
        self._build_state(train_ds, side)

    def _build_data(self) -> Any:
        """The training loader (or stream) and the validation pass; returns the training dataset."""
        cfg = self.config
        train_ds, val_ds = self.data_input(cfg.data(), self.rank, self.world_size, cfg)
        self.stream = train_stream(train_ds, self.rank, self.world_size, cfg, self.device)  # iterables: see iterable.py
        if self.stream is not None:
            self.train_loader, self.steps_per_epoch = self.stream.loader, cfg.steps_per_epoch  # None: unknown (Keras)
        else:
            if train_ds is None or len(train_ds) == 0:
                raise ValueError("data() returned an empty training dataset")
            self.train_sampler = ShardSampler(len(train_ds), self.rank, self.world_size, shuffle=True,
                                              seed=cfg.seed, pad=True)
            # private generators: creating an iterator must not draw from the global RNG (exact resume)
            self.train_loader = make_loader(train_ds, self.train_sampler, batch_size=cfg.batch_size, seed=cfg.seed,
                                            workers=cfg.loader_workers, pin_memory=self.device.type == "cuda")
            self.steps_per_pass = steps_per_epoch(math.ceil(self.train_sampler.shard_length() / cfg.batch_size),
                                                  self.accumulate)  # optimizer steps (the same on any elastic size)
            self.steps_per_epoch = cfg.steps_per_epoch or self.steps_per_pass  # Keras's params["steps"]
        #: What this rank's positions mean, and which optional components its backups hold: a resume
        #: must not change it (checked here and by the coordinator). An elastic run records its max
        #: world size and configured accumulation: a step means the same samples on any of its world sizes.
        self.layout = {**config_layout(cfg, self.spec.max_workers or self.world_size),
                       "samples": "iterable" if self.stream is not None else len(train_ds),
                       "parameters": {name: list(p.shape) for name, p in self.model.named_parameters()}}
        self.validation = Validation(val_ds, rank=self.rank, world_size=self.world_size,
                                     batch_size=cfg.val_batch_size or cfg.batch_size, seed=cfg.seed,
                                     device=self.device, preemption=self.preemption, beat=self.pulse.beat,
                                     steps=cfg.validation_steps, workers=cfg.loader_workers,
                                     pin_memory=self.device.type == "cuda", lockstep=self.fsdp)
        return train_ds

    def _build_state(self, train_ds: Any, side: ModelSide) -> None:
        """The step functions, the named components (what backups hold), the step, live state and saver."""
        cfg = self.config
        metric_fns = resolve_metrics(cfg.metrics)
        default = make_default_step(cfg.loss, metric_fns) if cfg.loss is not None else None
        self.train_step: Callable[..., Any] = cfg.train_step or default  # type: ignore[assignment]
        self.val_step: Callable[..., Any] = cfg.val_step or self.train_step
        self.components = rank_components(self.model, self.optimizer, snapshots=self.snapshots,
                                          position=self.position, metric_sums=self.metric_sums, result=self.result,
                                          scaler=self.precision.scaler, lr_scheduler=self.lr_scheduler)
        if self.fsdp:  # model, optimizer and snapshots: every rank's shards, through DCP
            from orchestrator.loop.sharded_state import sharded_components

            self.components.update(sharded_components(self.model, self.optimizer, self.snapshots))
        self.components.update(data_components(train_ds, self.stream))  # train_stream / train_data: their state
        self.optim_step = OptimStep(ddp=self.ddp, model=self.model, signals=side.signals,
                                    optimizer=self.optimizer, precision=self.precision, lrs=self.lrs,
                                    sums=self.metric_sums, world_size=self.world_size,
                                    clip_grad_norm=cfg.clip_grad_norm, preemption=self.preemption,
                                    train_step=self.train_step, device=self.device)
        self.live = LiveState(self.components, self.rank, cfg.seed)
        self.optim_step.before_update = self.live.unmark  # the update changes the state: no copy from here
        self.saver = RankSaver(self.components, self.rank, self.world_size, self.storage,
                               on_persisted=self.link.persisted, group=side.backup_group,
                               model=self.model)
        reseed(cfg.seed, self.rank, 0)  # per-rank streams (dropout, augmentation), reseeded at every step

    # -- decisions -----------------------------------------------------------------------
    def learning_rate(self) -> float:
        return self.lrs.current()

    def apply(self, decisions: list[Decision]) -> bool:
        """Apply decisions in order; return True when one of them stops training."""
        stop = False
        for d in decisions:
            if isinstance(d, StopTraining):
                stop = True
                if d.reason == "preempted":  # after the emergency backup
                    self.result.preempted = True
            elif isinstance(d, SetLearningRate):  # with a schedule: rescales it (see LearningRates)
                self.lrs.set(d.value)
            elif isinstance(d, SnapshotWeights):
                self.snapshots.keep(d.key, self.model)
            elif isinstance(d, RestoreWeights):
                self.snapshots.restore(d.key, self.model)
            elif isinstance(d, Backup):
                self.saver.backup(d, self.position)
            elif isinstance(d, SaveModel):
                self.saver.save_model(d, self.model, self.optimizer, self.position)
            elif isinstance(d, WriteHistograms):  # rank 0, file written in the background
                self.saver.write_histograms(d, self.model)
            elif isinstance(d, SkipBatches):
                self.skip = {(int(e), int(b)) for e, b in d.batches}
            elif isinstance(d, SyncEvery):  # the callbacks' batch sync interval changed (save_freq="auto")
                self.batch_sync_every = d.steps
            elif isinstance(d, Rollback):
                self.saver.flush()
                self.saver.load(d.folder).apply()
                if d.lr_factor:
                    self.lrs.scale(d.lr_factor)
                raise _RolledBack(d.folder)
        return stop

    def _sync(self, kind: ReportKind, epoch: int = 0, step: int = -1, boundary: bool = False, **kw: Any) -> bool:
        """Report at a sync point and apply the decisions every rank gets there.

        ``boundary``: the state is at a step boundary while the rank waits here (a peer that dies
        meanwhile keeps every survivor waiting: see :mod:`~orchestrator.loop.live`); it stays one
        until the coordinator answers, and the decisions change it only after that.
        """
        report = Report(kind=kind, epoch=epoch, step=step, learning_rate=self.learning_rate(),
                        steps_per_epoch=self.steps_per_epoch, global_step=self.position.global_step, **kw)
        if boundary and not self.live.marked:
            self.live.mark(self.position)
        decisions = self.link.sync(report)
        self.live.unmark()  # the decisions may change the state
        return self.apply(decisions)

    # -- loop ----------------------------------------------------------------------------
    def run(self) -> LoopResult:
        try:
            return self._run()
        finally:  # never left to the garbage collector (see model_side.release_reducer)
            release_reducer(getattr(self, "ddp", None))

    def _run(self) -> LoopResult:
        self._build()
        self.link.heartbeat()  # the hang watchdog watches this rank from now on
        if self.resume_from:  # a clear error before loading state that would mean other samples
            check_layout(self.spec.resume_layout, self.layout, self.resume_from)
        resized = self.spec.resume_world_size not in (None, self.world_size)
        if resized and self.stream is not None:
            raise ResumeMismatch(  # not retried: every attempt on this world size would meet it
                f"cannot resume the state of {self.spec.resume_world_size} workers on {self.world_size}: an "
                "iterable dataset (or a Ray Dataset) keeps a stream position per rank; elastic num_workers=(min, max) "
                "needs a map-style training dataset")
        if self.live_restore is not None:
            pending = self.saver.load_states(*self.live_restore, where="the survivors' memory", derived=DERIVED)
        elif self.resume_from:
            pending = self._load_backup(self.resume_from)
        else:
            pending = PendingRestore()
        try:
            stop = self._sync(ReportKind.TRAIN_BEGIN, layout=self.layout)
            pending.apply()
            epoch, first_batch = self.position.next_batch(self.steps_per_epoch)
            while not stop and epoch < self.epochs:
                try:
                    stop, epoch, first_batch = self._epoch(epoch, first_batch)
                except _RolledBack:  # every rank reloaded the same backup: continue from its position
                    stop = False
                    epoch, first_batch = self.position.next_batch(self.steps_per_epoch)
                if self.result.preempted:
                    return self._finish()  # the emergency backup holds this step; nothing more runs
            self._sync(ReportKind.TRAIN_END, max(epoch - 1, 0))
        finally:
            self.saver.flush()
            shutdown_workers(self.train_loader, self.validation.loader)  # loader_workers' processes end here
            if self.stream is not None:
                self.stream.close()
        return self._finish()

    def _epoch(self, epoch: int, first_batch: int) -> tuple[bool, int, int]:
        """One epoch from ``first_batch``: (stop, next epoch, next first batch)."""
        stop = False
        if first_batch == 0 and self.position.phase != "begin":  # "begin": a live recovery at the epoch's start
            stop = self._sync(ReportKind.EPOCH_BEGIN, epoch, boundary=True)  # resumed here, it runs again
            self.result.learning_rates.append(self.learning_rate())
            self.metric_sums.reset()
            self.position.begin_epoch(epoch)
        stopped_step = None if stop else self._train_epoch(epoch, first_batch)
        if stop or stopped_step is not None or self.result.preempted or self.lrs.steps_at_epoch_end:
            self.live.unmark()  # the epoch's end changes the shared state (or the epoch did not end normally)
        # else the mark of the epoch's end (its last step done) holds through validation and the
        # epoch-end sync point: they change only this rank's own state, copied at the mark; a
        # recovery from it validates the epoch and reports its end again
        if self.result.preempted:
            return True, epoch, first_batch
        if stopped_step is not None:
            self.result.stopped_at = (epoch, stopped_step)
        # Training goes on after this epoch unless a decision (the same on every rank) stopped it; a
        # stopping run finishes instead of honouring a preemption notice (its stop would not survive a resume).
        going_on = not stop and stopped_step is None
        due = validation_due(epoch, self.config.validation_freq)  # Keras's validation_freq
        val, abandoned = None, False
        if due:
            with self.precision.autocast():  # validation runs in the training's precision, as in Lightning
                val, abandoned = self.validation.run(self.model, self.val_step, watch=going_on)
        if abandoned:  # the position still says "epoch trained, not validated"
            self._preempt(epoch, self.position.batch)
            return True, epoch, first_batch
        self.lrs.end_epoch()  # an "epoch" schedule steps once the epoch is validated (its backup holds it)
        last_step = self.position.batch if self.stream is not None else self._window(epoch).steps - 1
        self.position.end_epoch(epoch, last_step)
        self.result.epochs_run += 1  # before the sync: a backup decided there holds the finished epoch
        notice = going_on and epoch + 1 < self.epochs and self.preemption.is_set()
        if notice:
            self.saver.flush()  # a pending backup of this same step commits first (never rewritten)
        report_stop = self._sync(ReportKind.EPOCH_END, epoch, train=self.metric_sums.train.phase_sums(), val=val,
                                 preempted=notice)  # unmarks once answered
        return stop or stopped_step is not None or report_stop, epoch + 1, 0

    def _preempt(self, epoch: int, step: int) -> None:
        """Every rank saw the notice at this point: the coordinator decides an emergency backup and a stop."""
        self.saver.flush()  # a pending backup of this same step commits first (never rewritten)
        self._sync(ReportKind.BATCH_END, epoch, step, train=self.metric_sums.train.phase_sums(), preempted=True)
        self.result.preempted = True

    def _load_backup(self, folder: str) -> PendingRestore:
        """Load a committed backup; one of another world size (``strategy="fsdp"``) restarts its epoch
        (see :mod:`~orchestrator.loop.regroup`); an elastic run's continues where it was (see
        :mod:`~orchestrator.loop.elastic`)."""
        if not self.fsdp:
            return self.saver.load(folder, written_by=self.spec.resume_world_size)
        saved = (self.spec.resume_layout or {}).get("world_size", self.world_size)
        if saved == self.world_size:
            return self.saver.load(folder)
        check_regroup(self.components, folder, saved, self.world_size)
        pending = self.saver.load(folder, own_rank=0)  # position and counters: the same on every rank
        regrouped(self.position, self.metric_sums, self.result)
        return PendingRestore([item for item in pending.items if item[0] is not self.components["rng"]])

    def _finish(self) -> LoopResult:
        if self.fsdp:  # every rank takes part in the gather; rank 0 gets the full weights on CPU
            from orchestrator.loop.fsdp import full_model_state

            state = full_model_state(self.model)
            self.result.state_dict = state if self.rank == 0 else None
        elif self.rank == 0:
            self.result.state_dict = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        return self.result

    def _train_epoch(self, epoch: int, first_batch: int = 0) -> int | None:
        """Run one epoch from ``first_batch``; return the step at which a decision stopped training."""
        self.ddp.train()
        k = self.accumulate  # a step is an optimizer step of k micro-batches
        if self.stream is not None:  # (step, micro-batches, this rank's last): see iterable.TrainStream
            groups = self.stream.steps(first_batch, k, self.config.steps_per_epoch)
        else:  # global offsets into the pass's permutation: the same on any (elastic) world size
            window, samples = self._window(epoch), self.config.batch_size * k * self.world_size  # per step
            self.train_sampler.set_offsets(window.data_pass, offset=(window.first + first_batch) * samples,
                                           stop=(window.first + window.steps) * samples)
            groups = ((step, group, False) for step, group in micro_batch_groups(self.train_loader, first_batch, k))
        sums, groups, live = self.metric_sums, iter(groups), self.live
        while True:
            live.mark(self.position)  # a step boundary: reseeds, and a survivor's state can be copied from here
            item = next(groups, None)
            if item is None:
                break
            step, micro_batches, last = item
            live.started()
            if (epoch, step) in self.skip:  # produced a non-finite loss before a rollback
                live.unmark()
                self.position.advance(epoch, step)
                if self.stream is not None and self.stream.skipped(last):  # every rank ran out with it
                    break
                continue
            signals = self.optim_step.run(micro_batches, out_of_data=last)
            if self.stream is not None:
                self.stream.trained(signals.out_of_data)  # before any backup of this step
            nonfinite, loss_sum, n_sum, preempted = signals.nonfinite, signals.loss_sum, signals.count, signals.preempted
            self.result.steps_run += 1
            self.result.scaler_skips += int(signals.scaler_skipped)
            self.position.advance(epoch, step)
            sums.see(loss_sum, n_sum)
            self.pulse.progress(epoch, step, sums.running_loss())
            if preempted > 0:  # every rank sees it at this same step
                self._preempt(epoch, step)
                return step
            periodic = self.batch_sync_every is not None and self.position.global_step % self.batch_sync_every == 0
            if nonfinite > 0:
                self.saver.flush()  # pending backups commit first, so a rollback sees the newest one
            if nonfinite > 0 or periodic:  # a periodic sync point is a step boundary; a NaN's is not (never skipped)
                if self._sync(ReportKind.BATCH_END, epoch, step, boundary=nonfinite == 0 and not signals.out_of_data,
                              train=sums.train.phase_sums(), nonfinite=nonfinite > 0, epoch_ends=signals.out_of_data):
                    return step
            if signals.out_of_data:  # some rank's shard ran out: every rank ends the epoch at this step
                break
        return None

    def _window(self, epoch: int) -> Window:
        """The steps of the data that ``epoch`` trains on (``steps_per_epoch``: see :func:`epoch_window`)."""
        return epoch_window(epoch, self.steps_per_pass, self.config.steps_per_epoch)
