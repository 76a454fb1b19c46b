"""The public front: :class:`Trainer` and ``fit``."""

from __future__ import annotations

import os
import posixpath
import warnings
from typing import Any, Callable, Iterable, Mapping

import ray

from orchestrator.callbacks import BackupAndRestore, Callback, History, ProgbarLogger
from orchestrator.callbacks.callback_list import CallbackList
from orchestrator.control.controller import run_fit
from orchestrator.control.specs import BackupPolicy, FaultPolicy, FitSpec
from orchestrator.core.config import (
    LoopConfig, ScalingConfig, validate_epochs, validate_flag, validate_int, validate_seconds, validate_verbose)
from orchestrator.core.metrics import metric_directions
from orchestrator.loop.compiled import check_compile
from orchestrator.loop.final_model import FINAL_MODEL, load_final_model, save_final_model
from orchestrator.loop.optim_step import check_scheduler_factory
from orchestrator.storage.fs import StorageSpec


def _checked_callbacks(callbacks: Iterable[Callback] | None, params: Mapping[str, Any]) -> list[Callback]:
    """The callbacks as a list, each validated against the run's params (monitors, directions)."""
    checked = list(callbacks or [])
    for i, cb in enumerate(checked):
        if not isinstance(cb, Callback):
            raise ValueError(f"callbacks[{i}] must be an orchestrator.callbacks.Callback, got {type(cb).__name__}")
    for cb in checked:
        cb.validate(dict(params))
    backups = [cb for cb in checked if isinstance(cb, BackupAndRestore)]
    if len(backups) > 1:
        raise ValueError("callbacks: pass at most one BackupAndRestore")
    if backups and not _inside_run(backups[0].backup_dir):
        raise ValueError("BackupAndRestore(backup_dir=...) must be a path inside the run directory (relative, "
                         f"without '..'), got {backups[0].backup_dir!r}: backups belong to their run, which "
                         "deletes its own step folders; set Trainer(storage=..., run_name=...) to move the run")
    return checked


def _inside_run(path: str) -> bool:
    norm = posixpath.normpath(path.replace("\\", "/"))
    return "://" not in path and not posixpath.isabs(norm) and not os.path.isabs(path) \
        and norm != ".." and not norm.startswith("../")


def _describe_compile(value: Any) -> Any:
    """``compile=`` for run.json: a callable backend by its name."""
    if isinstance(value, Mapping):
        return {k: getattr(v, "__qualname__", type(v).__name__) if callable(v) else v for k, v in value.items()}
    return value


def _describe_wrap(value: Any) -> Any:
    """``fsdp_wrap=`` for run.json: classes and callables by name."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return [c.__qualname__ for c in value]
    return getattr(value, "__qualname__", type(value).__name__)


def _check_picklable(name: str, value: Any) -> None:
    try:
        ray.cloudpickle.dumps(value)
    except Exception as exc:
        raise ValueError(
            f"{name} cannot be sent to the workers because it is not picklable ({type(exc).__name__}: "
            f"{exc}); define it at module level and capture no locks, open files or live connections"
        ) from exc


class Trainer:
    """Data-parallel training of a PyTorch model on a Ray cluster, Keras style.

    Args:
        model: ``() -> torch.nn.Module``, called on every worker.
        optimizer: ``(params) -> torch.optim.Optimizer``, called on every worker.
        loss: ``(outputs, targets) -> scalar tensor`` (the batch mean). Optional with ``train_step``.
        data: ``() -> (train_dataset, val_dataset or None)``, map-style or iterable datasets (see
            :mod:`orchestrator.loop.iterable`) or Ray Datasets (``ray.data.Dataset``, see
            :mod:`orchestrator.cluster.ray_data`), called on every worker.
        metrics: Built-in names (``"accuracy"`` or ``"acc"``, ``"mse"``, ``"mae"``; see
            :data:`orchestrator.core.metrics.BUILTIN_METRICS`), logged under the name given, or
            ``{"name": fn(outputs, targets)}`` returning the batch mean. Defaults to none.
        batch_size: Samples per worker per step. Defaults to ``32``.
        num_workers: Data-parallel ranks, or ``(min, max)`` for an elastic run: it starts ``max`` workers;
            when a lost worker cannot be replaced within ``placement_timeout_s`` it goes on with fewer
            (the largest ``w >= min`` that divides ``max`` and fits), from the survivors' state or the
            newest backup, and grows back to ``max`` at an epoch end once the resources return. The
            global batch stays ``batch_size * accumulate_grad_batches * max``: on ``w`` workers each runs
            ``accumulate_grad_batches * max / w`` micro-batches per step, so the schedule, the step count
            and the callbacks' decisions mean the same; every sample is trained once per epoch (see
            docs/elastic.md). Defaults to ``1``.
        use_gpu: One GPU per worker and NCCL. Defaults to ``False``.
        storage: fsspec URL of the run storage. Defaults to a local folder.
        storage_options: Passed to fsspec; never logged.
        run_name: Name of the run directory: 1-128 letters, digits, ``.``, ``_`` or ``-``, starting with a
            letter or digit. Defaults to ``"run"``.
        callbacks: ``orchestrator.callbacks`` instances. Defaults to none.
        max_failures: Restarts allowed after worker failures. Defaults to ``0``.
        seed: Seed for initial weights and shuffling. Defaults to ``0``.
        train_step: ``(model, batch) -> {"loss": tensor, "<metric>": tensor, "batch_size": int}``
            for batches that are not ``(inputs, targets)``.
        val_step: Like ``train_step`` for validation (no gradients). Defaults to ``train_step``.
        clip_grad_norm: Clip the total gradient norm to this value. Defaults to ``None``.
        val_batch_size: Per-worker validation batch size. Defaults to ``batch_size``.
        placement_strategy: ``"PACK"`` or ``"SPREAD"`` (or the STRICT_ forms). Defaults to ``"PACK"``.
        resources_per_worker: Ray resources per worker. Defaults to ``{"CPU": 1}``.
        threads_per_worker: torch intra-op threads per worker. Defaults to the worker's CPUs.
        hang_timeout_s: A rank that shows no sign of life (steps, validation batches, syncs) for this
            long, once it has built its model and data, is treated as failed and the group
            restarts. Defaults to ``1800``.
        preemption_grace_s: After SIGTERM or a drain of a node the run uses, how long the workers
            get to reach a step boundary and commit an emergency backup. Defaults to ``120``.
        placement_timeout_s: How long an attempt waits for the cluster to grant every worker's
            resources, e.g. for a replacement node after a drain left too few. The granted workers
            (and the coordinator) then get this long, but at least 120 s, to start their processes.
            Defaults to ``600``.
        warm_standbys: With ``max_failures > 0`` on CPU workers, keep one idle standby process per
            worker (torch imported, no resources of its own, in the worker's placement bundle) so
            that a restart after a failure skips the cold start. Defaults to ``True``.
        live_recovery: When a worker dies (SIGKILL, OOM kill, node loss), continue from the surviving
            workers' state in memory (at most the step in flight is redone) instead of the newest
            committed backup, which stays the fallback. Defaults to ``True``.
        reuse_workers: After a fit that finished, keep its idle CPU workers (torch imported) for up to
            a minute, so that the next fit of the same shape in this driver starts without new
            processes (about 4 s less on 2 cores); after a fit that failed on a worker, the workers
            that survived it (the rerun starts a new process for the failed rank only). Only on a
            Ray cluster the driver did not start (``fit`` shuts down a Ray it started itself), and not after a fit with
            ``loader_workers > 0`` (each such fit forks its loaders from fresh processes). Pass
            ``False`` when you edit a module of your code between two fits in one driver. Defaults to ``True``.
        precision: ``"32-true"``, ``"bf16-mixed"`` or ``"16-mixed"`` (autocast on the model's device;
            ``"16-mixed"`` adds a ``torch.amp.GradScaler``). Defaults to ``"32-true"``.
        accumulate_grad_batches: Micro-batches of ``batch_size`` per optimizer step (each micro-batch's
            loss is divided by the step's number of micro-batches). Defaults to ``1``.
        lr_scheduler: ``(optimizer) -> torch.optim.lr_scheduler.LRScheduler``, built on every worker (and
            once here on a dummy parameter: torch's ``ReduceLROnPlateau`` is refused, use
            ``callbacks.ReduceLROnPlateau``). Defaults to ``None``.
        lr_scheduler_interval: ``"step"`` (every optimizer step) or ``"epoch"``. Defaults to ``"epoch"``.
        loader_workers: DataLoader worker processes per rank (persistent, 2 batches prefetched each,
            pinned memory on GPU); a sample's random draws depend only on the seed, the rank and its
            place in the epoch, so resumes are exact. Defaults to ``0`` (load in the training process).
        steps_per_epoch: Batches per epoch, as Keras: the data iterator is not reset between epochs
            and an epoch that reaches the end of the data stops there. Defaults to ``None`` (one pass).
        validation_steps: Validation batches per rank each validation (the first ones). Defaults to ``None`` (all).
        validation_freq: Validate every ``n`` epochs, or after the listed 1-based epochs (``[1, 5, 10]``).
            Defaults to ``1``.
        compile: Compile the model with ``torch.compile`` on every worker (in place: backups, checkpoints,
            ``model.pt`` and ``History.model`` keep the plain module's keys). ``True``, or a dict of
            ``torch.compile`` keyword arguments (``backend``, ``mode``, ``fullgraph``, ``dynamic``,
            ``options``). The default backend needs a C++ compiler on CPU (Triton on GPU); without it
            ``Trainer(...)`` raises naming what is missing. Defaults to ``False``.
        ray_data_columns: With ``ray.data.Dataset`` input, the ``(features, label)`` column names whose
            tensors make each ``(inputs, targets)`` batch; ``None`` gives ``train_step``/``val_step`` the
            dict of columns. Defaults to ``None``.
        ray_data_shuffle_buffer: With ``ray.data.Dataset`` input, each rank draws its training batches
            from a local shuffle buffer of this many rows, reseeded every data pass from (seed, rank,
            pass), so a resume reshuffles exactly as before. Defaults to ``None`` (the dataset's order).
        strategy: ``"ddp"`` (every worker holds the whole model, DistributedDataParallel) or ``"fsdp"``
            (FSDP2 ``fully_shard``: parameters, gradients and optimizer state sharded over the workers;
            each worker writes only its shards of a backup, through torch.distributed.checkpoint, and
            a backup resumes on another number of workers). ``"fsdp"`` refuses ``precision="16-mixed"``
            and ``compile``. See docs/fsdp.md. Defaults to ``"ddp"``.
        fsdp_wrap: With ``"fsdp"``, which submodules get their own ``fully_shard`` (before the root):
            a callable ``module -> bool`` or a tuple of module classes (e.g. your transformer block).
            Defaults to ``None``: ``torch.nn.TransformerEncoderLayer``/``TransformerDecoderLayer`` and
            submodules holding at least 1/8 of the parameters (and 1M or more).

    Example:
        >>> trainer = Trainer(model=build_model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        ...                   loss=torch.nn.functional.cross_entropy, data=load_data,
        ...                   metrics=["accuracy"], num_workers=2,
        ...                   callbacks=[callbacks.EarlyStopping(patience=3)])  # doctest: +SKIP
        >>> history = trainer.fit(epochs=10)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Callable[[], Any],
        optimizer: Callable[[Any], Any],
        loss: Callable[..., Any] | None = None,
        data: Callable[[], Any] | None = None,
        metrics: Iterable[str] | Mapping[str, Any] | None = None,
        batch_size: int = 32,
        num_workers: int | tuple[int, int] = 1,
        use_gpu: bool = False,
        storage: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        run_name: str = "run",
        callbacks: Iterable[Callback] | None = None,
        max_failures: int = 0,
        seed: int = 0,
        train_step: Callable[..., Any] | None = None,
        val_step: Callable[..., Any] | None = None,
        clip_grad_norm: float | None = None,
        val_batch_size: int | None = None,
        placement_strategy: str = "PACK",
        resources_per_worker: Mapping[str, float] | None = None,
        threads_per_worker: int | None = None,
        hang_timeout_s: float = 1800.0,
        preemption_grace_s: float = 120.0,
        placement_timeout_s: float = 600.0,
        warm_standbys: bool = True,
        live_recovery: bool = True,
        reuse_workers: bool = True,
        precision: str = "32-true",
        accumulate_grad_batches: int = 1,
        lr_scheduler: Callable[[Any], Any] | None = None,
        lr_scheduler_interval: str = "epoch",
        loader_workers: int = 0,
        steps_per_epoch: int | None = None,
        validation_steps: int | None = None,
        validation_freq: int | list[int] = 1,
        compile: bool | Mapping[str, Any] = False,
        ray_data_columns: tuple[str, str] | None = None,
        ray_data_shuffle_buffer: int | None = None,
        strategy: str = "ddp",
        fsdp_wrap: Callable[[Any], bool] | tuple[type, ...] | None = None,
    ) -> None:
        self._init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.loop = LoopConfig(model=model, optimizer=optimizer, data=data, loss=loss, metrics=metrics,
                               batch_size=batch_size, val_batch_size=val_batch_size, train_step=train_step,
                               val_step=val_step, clip_grad_norm=clip_grad_norm, seed=seed, precision=precision,
                               accumulate_grad_batches=accumulate_grad_batches, lr_scheduler=lr_scheduler,
                               lr_scheduler_interval=lr_scheduler_interval, loader_workers=loader_workers,
                               steps_per_epoch=steps_per_epoch, validation_steps=validation_steps,
                               validation_freq=validation_freq, compile=compile,
                               ray_data_columns=ray_data_columns, ray_data_shuffle_buffer=ray_data_shuffle_buffer,
                               strategy=strategy, fsdp_wrap=fsdp_wrap)
        self.scaling = ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources_per_worker,
                                     placement_strategy=placement_strategy,
                                     threads_per_worker=threads_per_worker, reuse_workers=reuse_workers)
        if self.scaling.elastic and self.loop.strategy == "fsdp":
            raise ValueError(f"num_workers={num_workers!r} (elastic) is not supported with strategy='fsdp' yet: pass "
                             "a fixed num_workers (an fsdp backup still resumes on another number of workers)")
        try:  # what workers would only find out when they compile or build the schedule
            check_compile(self.loop.compile, "cuda" if use_gpu else "cpu")
        except RuntimeError as exc:
            raise ValueError(str(exc)) from None
        self.storage = StorageSpec(url=storage, run_name=run_name, options=storage_options).check_shared()
        self.faults = FaultPolicy(max_failures=validate_int("max_failures", max_failures, 0),
                                  hang_timeout_s=validate_seconds("hang_timeout_s", hang_timeout_s),
                                  preemption_grace_s=validate_seconds("preemption_grace_s", preemption_grace_s),
                                  placement_timeout_s=validate_seconds("placement_timeout_s", placement_timeout_s),
                                  warm_standbys=validate_flag("warm_standbys", warm_standbys),
                                  live_recovery=validate_flag("live_recovery", live_recovery))
        self._base_params = {"metrics": list(self.loop.metrics),
                             "metric_directions": metric_directions(self.loop.metrics),
                             "num_workers": num_workers, "batch_size": batch_size}
        self.callbacks = _checked_callbacks(callbacks, self._base_params)
        backups = [cb for cb in self.callbacks if isinstance(cb, BackupAndRestore)]
        self.backup = backups[0] if backups else None
        self._check_picklable()
        check_scheduler_factory(self.loop.optimizer, self.loop.lr_scheduler)

    @property
    def run_name(self) -> str:
        """The run directory's name under ``storage``."""
        return self.storage.run_name

    def _check_picklable(self) -> None:
        for name in ("model", "optimizer", "loss", "data", "train_step", "val_step", "lr_scheduler", "compile",
                     "fsdp_wrap"):
            if getattr(self.loop, name) is not None:
                _check_picklable(name, getattr(self.loop, name))
        for name, fn in self.loop.metrics.items():
            _check_picklable(f"metrics[{name!r}]", fn)
        for i, cb in enumerate(self.callbacks):
            if cb.runs_on == "coordinator":
                _check_picklable(f"callbacks[{i}] ({cb.name})", cb)

    def replace(self, **changes: Any) -> "Trainer":
        """A new Trainer with some constructor arguments changed (validated again).

        Example:
            >>> bigger = trainer.replace(num_workers=4, storage="s3://bucket/runs")  # doctest: +SKIP
        """
        unknown = set(changes) - set(self._init_kwargs)
        if unknown:
            raise ValueError(f"Trainer has no argument(s) {sorted(unknown)}")
        return Trainer(**{**self._init_kwargs, **changes})

    def fit(self, epochs: int = 1, verbose: str | int = "auto", takeover: bool = False) -> History:
        """Train for ``epochs`` epochs and return the :class:`History`.

        The same ``storage`` and ``run_name`` resume the run where it stopped (a crash, a
        preemption, a resubmission). A run that had **finished** is never trained again: ``fit``
        then returns its History (each epoch's logs from ``events.jsonl``) and its final weights
        (``<run>/model.pt``) without starting Ray, as ``orchestrator run`` exits 0 with "already
        finished". Pass another ``run_name`` to train a new run.

        One driver owns a run at a time (the run lease, ``<run>/lease.json``): a second ``fit`` on a
        run another driver is training waits a little longer than the lease's time to live (60 s),
        so a resubmission after a killed driver goes on, then raises ``LeaseHeld`` naming the owner.

        Args:
            epochs: Number of epochs. Defaults to ``1``.
            verbose: ``"auto"``/``1`` (a progress bar on a terminal, one line per epoch otherwise),
                ``2`` (one line per epoch) or ``0`` (silent). Defaults to ``"auto"``.
            takeover: Take the run over from a driver that still holds its lease, fencing it out
                (it can no longer commit, purge or record anything). Only for an operator who knows
                that driver is gone. Defaults to ``False``.
        """
        validate_epochs(epochs)
        validate_flag("takeover", takeover)
        validate_verbose(verbose)
        params = dict(self._base_params, epochs=epochs, verbose=verbose, steps=None)
        history = History()
        driver_cbs = [cb for cb in self.callbacks if cb.runs_on == "driver"]
        if verbose != 0 and not any(isinstance(cb, ProgbarLogger) for cb in driver_cbs):
            driver_cbs.insert(0, ProgbarLogger())
        driver_cbs.append(history)
        coordinator_cbs = [cb for cb in self.callbacks if cb.runs_on == "coordinator"]
        sync_every = CallbackList(coordinator_cbs).batch_sync_every()
        backups = BackupPolicy(folder=self.backup.backup_dir, keep=self.backup.keep,
                               delete_at_end=self.backup.delete_checkpoint) if self.backup else BackupPolicy()
        spec = FitSpec(loop=self.loop, scaling=self.scaling, epochs=epochs, storage=self.storage,
                       callbacks=coordinator_cbs, driver_callbacks=driver_cbs, params=params,
                       batch_sync_every=sync_every, backups=backups, faults=self.faults,
                       config_snapshot=self._config_snapshot(epochs), takeover=takeover)
        outcome = run_fit(spec, save_final=lambda storage, results: save_final_model(storage, results[0].state_dict))
        if outcome.already_finished:
            return self._finished_history(history, outcome.events, epochs)
        for cb, state in zip(coordinator_cbs, outcome.callback_states):
            cb.load_state_dict(state)
        history.model = self._build_final_model(outcome.results[0].state_dict)
        history.results = outcome.results
        history.events = outcome.events
        return history

    def _finished_history(self, history: History, events: list[dict[str, Any]], epochs: int) -> History:
        """The History of a run that had finished: each epoch's logs as last recorded, its final weights."""
        by_epoch: dict[int, dict[str, Any]] = {}
        for event in events:  # a replayed epoch (after a restore or a rollback) keeps its newest logs
            if event.get("type") == "epoch_end" and isinstance(event.get("logs"), dict):
                by_epoch[int(event.get("epoch", 0))] = event["logs"]
        history.on_train_begin()
        for epoch in sorted(by_epoch):
            history.on_epoch_end(epoch, dict(by_epoch[epoch]))
        storage = self.storage.open()
        warnings.warn(f"run {storage.url()} had already finished ({len(by_epoch)} epochs); fit(epochs={epochs}) "
                      "returns its result and does not train it again: pass another run_name to train a new run",
                      stacklevel=3)
        state = load_final_model(storage)
        if state is None:
            warnings.warn(f"run {storage.url()} had already finished but holds no {FINAL_MODEL} (written by an older "
                          "version); History.model is None", stacklevel=3)
        history.model = self._build_final_model(state) if state is not None else None
        history.results = []
        history.events = events
        return history

    def _config_snapshot(self, epochs: int) -> dict[str, Any]:
        """What run.json records: names and numbers, never storage_options values."""
        return {"run_name": self.run_name, "epochs": epochs, "num_workers": self.scaling.num_workers,
                "min_workers": self.scaling.min_workers,
                "use_gpu": self.scaling.use_gpu, "placement_strategy": self.scaling.placement_strategy,
                "batch_size": self.loop.batch_size, "seed": self.loop.seed, "metrics": list(self.loop.metrics),
                "clip_grad_norm": self.loop.clip_grad_norm, "max_failures": self.faults.max_failures,
                "precision": self.loop.precision, "accumulate_grad_batches": self.loop.accumulate_grad_batches,
                "lr_scheduler": getattr(self.loop.lr_scheduler, "__qualname__", None if self.loop.lr_scheduler is None
                                        else type(self.loop.lr_scheduler).__name__),
                "lr_scheduler_interval": self.loop.lr_scheduler_interval,
                "loader_workers": self.loop.loader_workers, "steps_per_epoch": self.loop.steps_per_epoch,
                "validation_steps": self.loop.validation_steps, "validation_freq": self.loop.validation_freq,
                "compile": _describe_compile(self.loop.compile),
                "ray_data_columns": list(self.loop.ray_data_columns) if self.loop.ray_data_columns else None,
                "ray_data_shuffle_buffer": self.loop.ray_data_shuffle_buffer,
                "strategy": self.loop.strategy, "fsdp_wrap": _describe_wrap(self.loop.fsdp_wrap),
                "callbacks": [cb.name for cb in self.callbacks]}

    def _build_final_model(self, state_dict: Mapping[str, Any] | None) -> Any:
        model = self.loop.model()
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model.cpu()
