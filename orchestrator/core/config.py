"""Validated configuration values and the checks of ``Trainer`` and ``fit`` arguments.

Every check raises ValueError naming the argument and saying what to change. The dataclasses
validate themselves on construction; the ``validate_*`` functions (in :mod:`orchestrator.core.fields`,
re-exported here) check one argument and return it normalised. ``StorageSpec`` checks its run name with :func:`validate_run_name`; metric names are
checked by :func:`orchestrator.core.metrics.normalise_metrics`. What needs a higher layer (callback
instances, picklability) is checked by :class:`orchestrator.Trainer` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from orchestrator.core.fields import (  # noqa: F401 - re-exported: the checks of single arguments
    COMPILE_OPTIONS, VERBOSE, _is_int, _require, compile_options, validate_epochs, validate_flag, validate_int,
    validate_ray_data_columns, validate_run_name, validate_seconds, validate_validation_freq, validate_verbose,
    validation_due)
from orchestrator.core.metrics import MetricFn, normalise_metrics

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
LR_SCHEDULER_INTERVALS = ("step", "epoch")
#: ``strategy=``: how the ranks hold the model (a full replica each, or shards of it).
STRATEGIES = ("ddp", "fsdp")


def validate_num_workers(value: Any) -> tuple[int, int]:
    """``(min, max)`` of an elastic ``num_workers`` if some world size from ``min`` to ``max`` keeps the global batch.

    On ``w`` ranks the global batch of ``max`` ranks is kept by running ``max / w`` times the
    micro-batches per step, so ``w`` must divide ``max``; ``min < max`` needs at least one such ``w``
    below ``max``.

    Example:
        >>> validate_num_workers((1, 2))
        (1, 2)
    """
    _require(isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value),
             f"num_workers must be an integer >= 1 or (min, max) for an elastic run, got {value!r}")
    low, high = value
    _require(low >= 1, f"num_workers=(min, max): min must be >= 1, got {value!r}")
    _require(low <= high, f"num_workers=(min, max): min must be <= max, got {value!r}")
    _require(low == high or any(high % w == 0 for w in range(low, high)),
             f"num_workers=(min, max): no world size from {low} to {high - 1} divides max={high}, so fewer "
             f"workers could not keep the global batch (batch_size x accumulate_grad_batches x {high}); "
             f"choose a min at or below a divisor of {high}, got {value!r}")
    return int(low), int(high)


def elastic_accumulation(accumulate_grad_batches: int, max_workers: int, world_size: int) -> int:
    """Micro-batches per optimizer step on ``world_size`` ranks that keep the global batch of ``max_workers``.

    Example:
        >>> elastic_accumulation(1, max_workers=4, world_size=2)
        2
    """
    if max_workers % world_size:
        raise ValueError(f"world size {world_size} does not divide max workers {max_workers}: "
                         "the global batch could not be kept")
    return accumulate_grad_batches * (max_workers // world_size)


@dataclass(frozen=True)
class ScalingConfig:
    """How many workers and what each one holds.

    Args:
        num_workers: Number of data-parallel ranks, or ``(min, max)`` for an elastic run: it starts
            ``max`` ranks and, when a lost rank cannot be replaced, goes on with fewer (at least
            ``min``), growing back to ``max`` when the resources return. The global batch stays
            ``batch_size * accumulate_grad_batches * max``: on ``w`` ranks (``w`` divides ``max``, see
            :meth:`world_sizes`) each rank runs ``accumulate_grad_batches * max / w`` micro-batches of
            ``batch_size`` per step (:func:`elastic_accumulation`). Stored normalised: ``num_workers``
            is then ``max`` and ``min_workers`` is ``min`` (None: not elastic). Defaults to ``1``.
        use_gpu: Give each worker one GPU and use NCCL. Defaults to ``False``.
        resources_per_worker: Ray resources per worker. Defaults to ``{"CPU": 1}`` (plus
            ``{"GPU": 1}`` with ``use_gpu``).
        placement_strategy: Ray placement-group strategy. Defaults to ``"PACK"``.
        threads_per_worker: torch intra-op threads per worker. Defaults to the worker's CPUs.
        reuse_workers: After a fit that finished, keep its idle workers (torch imported) for the
            next fit of the same shape in this driver (CPU workers, a Ray cluster the driver did not
            start itself; at most a minute). Defaults to ``True``.

    Example:
        >>> ScalingConfig(num_workers=2, resources_per_worker={"CPU": 2}).threads_per_worker
        2
        >>> ScalingConfig(num_workers=(1, 4)).world_sizes()
        [4, 2, 1]
    """

    num_workers: int | tuple[int, int] = 1
    use_gpu: bool = False
    resources_per_worker: Mapping[str, float] | None = None
    placement_strategy: str = "PACK"
    threads_per_worker: int | None = None
    reuse_workers: bool = True
    min_workers: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_workers, (tuple, list)):
            low, high = validate_num_workers(self.num_workers)
            object.__setattr__(self, "num_workers", high)
            object.__setattr__(self, "min_workers", low)
        validate_int("num_workers", self.num_workers, 1)
        if self.min_workers is not None:
            validate_num_workers((self.min_workers, self.num_workers))
        validate_flag("reuse_workers", self.reuse_workers)
        validate_flag("use_gpu", self.use_gpu)
        _require(self.placement_strategy in PLACEMENT_STRATEGIES,
                 f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got {self.placement_strategy!r}")
        if self.resources_per_worker is not None:
            _require(isinstance(self.resources_per_worker, Mapping)
                     and all(isinstance(v, (int, float)) and v >= 0 for v in self.resources_per_worker.values()),
                     "resources_per_worker must map resource names to non-negative numbers, "
                     f"got {self.resources_per_worker!r}")
        if self.threads_per_worker is not None:
            validate_int("threads_per_worker", self.threads_per_worker, 1)
        else:  # the worker's CPUs
            object.__setattr__(self, "threads_per_worker", max(1, int(self.worker_resources().get("CPU", 1))))

    @property
    def elastic(self) -> bool:
        """Whether the world size may change (``num_workers=(min, max)``)."""
        return self.min_workers is not None

    def world_sizes(self) -> list[int]:
        """The world sizes a run may use, largest first: ``max`` and every ``w >= min`` that divides it."""
        low = self.num_workers if self.min_workers is None else self.min_workers
        return [w for w in range(self.num_workers, low - 1, -1) if self.num_workers % w == 0]

    def worker_resources(self) -> dict[str, float]:
        """The Ray resources one worker asks for."""
        res = dict(self.resources_per_worker or {"CPU": 1})
        if self.use_gpu:
            res.setdefault("GPU", 1)
        return res


@dataclass(frozen=True)
class LoopConfig:
    """What every worker needs to build and run its training loop (all factories picklable).

    Args:
        model: ``() -> torch.nn.Module``.
        optimizer: ``(params) -> torch.optim.Optimizer``.
        loss: ``(outputs, targets) -> scalar tensor`` (batch mean); unused with ``train_step``.
        data: ``() -> (train_dataset, val_dataset or None)``, map-style or iterable datasets. Required.
        metrics: Built-in names (``["accuracy"]``) or ``name -> built-in name or fn(outputs, targets)``,
            stored as :func:`~orchestrator.core.metrics.normalise_metrics` returns it; names the logs
            already use (``loss``, ``val_*``, ...) are refused, see
            :func:`~orchestrator.core.metrics.check_metric_name`. Defaults to none.
        batch_size: Per-worker batch size.
        val_batch_size: Per-worker validation batch size. Defaults to ``batch_size``.
        train_step / val_step: Optional custom steps, see :mod:`orchestrator.loop.steps`.
        clip_grad_norm: Clip the global gradient norm to this value. Defaults to ``None``.
        seed: Seed for model init, shuffling and RNGs. Defaults to ``0``.
        progress_interval_s: Seconds between progress updates sent to the driver. Defaults to ``1``.
        precision: One of :data:`PRECISIONS` (Lightning's names). Defaults to ``"32-true"``.
        accumulate_grad_batches: Micro-batches per optimizer step. Defaults to ``1``.
        lr_scheduler: ``(optimizer) -> torch.optim.lr_scheduler.LRScheduler``. Defaults to ``None``.
        lr_scheduler_interval: Step the scheduler every ``"step"`` (optimizer step) or ``"epoch"``.
            Defaults to ``"epoch"`` (as Lightning).
        loader_workers: DataLoader worker processes per rank (persistent, prefetching); ``0`` loads in
            the training process. Defaults to ``0``.
        steps_per_epoch: Batches per epoch (Keras's ``fit`` semantics, see
            :func:`~orchestrator.loop.data.epoch_window`). Defaults to ``None``: one pass over the shard.
        validation_steps: Validation batches per rank and validation. Defaults to ``None``: the whole shard.
        validation_freq: Validate every ``n`` epochs (an int), or after the listed 1-based epochs. Defaults to ``1``.
        compile: Compile the model with ``torch.compile`` on every rank: ``True``, or a dict of its keyword
            arguments (:data:`COMPILE_OPTIONS`, e.g. ``{"mode": "max-autotune"}`` or ``{"backend": "eager"}``);
            see :func:`compile_options`. Defaults to ``False``.
        ray_data_columns: For ``ray.data.Dataset`` input, the ``(features, label)`` columns whose tensors
            make the ``(inputs, targets)`` batch; ``None`` gives ``train_step`` the dict of columns. See
            :func:`validate_ray_data_columns`. Defaults to ``None``.
        ray_data_shuffle_buffer: Rows of the local shuffle buffer each rank draws its Ray Dataset batches
            from, reseeded per data pass from (seed, rank, pass). Defaults to ``None`` (the dataset's order).
        strategy: ``"ddp"`` (a full replica per rank, DistributedDataParallel) or ``"fsdp"`` (FSDP2's
            ``fully_shard``: parameters, gradients and optimizer state sharded over the ranks; backups
            sharded through torch.distributed.checkpoint). See :func:`validate_strategy`. Defaults to ``"ddp"``.
        fsdp_wrap: With ``"fsdp"``, which submodules get their own ``fully_shard`` before the root:
            a callable ``module -> bool`` or a tuple of module classes. Defaults to ``None``
            (transformer layers and large submodules, see :mod:`orchestrator.loop.fsdp`).

    Example:
        >>> config = LoopConfig(model=build_model, optimizer=make_sgd, data=load_data,
        ...                     loss=cross_entropy, metrics=["acc"])  # doctest: +SKIP
        >>> config.metrics  # doctest: +SKIP
        {'acc': 'accuracy'}
    """

    model: Callable[[], Any]
    optimizer: Callable[[Any], Any]
    data: Callable[[], Any] | None
    loss: Callable[..., Any] | None = None
    metrics: Mapping[str, str | MetricFn] = field(default_factory=dict)
    batch_size: int = 32
    val_batch_size: int | None = None
    train_step: Callable[..., Any] | None = None
    val_step: Callable[..., Any] | None = None
    clip_grad_norm: float | None = None
    seed: int = 0
    progress_interval_s: float = 1.0
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    lr_scheduler: Callable[[Any], Any] | None = None
    lr_scheduler_interval: str = "epoch"
    loader_workers: int = 0
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    validation_freq: int | list[int] = 1
    compile: bool | Mapping[str, Any] = False
    ray_data_columns: tuple[str, str] | None = None
    ray_data_shuffle_buffer: int | None = None
    strategy: str = "ddp"
    fsdp_wrap: Callable[[Any], bool] | tuple[type, ...] | None = None

    def __post_init__(self) -> None:
        _require(self.data is not None,
                 "data is required: pass data=fn returning (train_dataset, val_dataset or None)")
        for name in ("model", "optimizer", "data"):
            _require(callable(getattr(self, name)),
                     f"{name} must be a callable that builds the {name} on each worker, "
                     f"got {getattr(self, name)!r}")
        _require(self.loss is not None or self.train_step is not None,
                 "loss is required unless you pass train_step=fn that computes the loss itself")
        for name in ("loss", "train_step", "val_step"):
            value = getattr(self, name)
            _require(value is None or callable(value), f"{name} must be callable, got {value!r}")
        object.__setattr__(self, "metrics", normalise_metrics(self.metrics))
        validate_int("batch_size", self.batch_size, 1, "samples per worker per step")
        if self.val_batch_size is not None:
            validate_int("val_batch_size", self.val_batch_size, 1, "samples per worker per step")
        _require(self.clip_grad_norm is None or (isinstance(self.clip_grad_norm, (int, float))
                                                 and not isinstance(self.clip_grad_norm, bool)
                                                 and self.clip_grad_norm > 0),
                 f"clip_grad_norm must be a positive number or None, got {self.clip_grad_norm!r}")
        _require(_is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        validate_seconds("progress_interval_s", self.progress_interval_s)
        _require(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        validate_int("accumulate_grad_batches", self.accumulate_grad_batches, 1, "micro-batches per optimizer step")
        _require(self.lr_scheduler is None or callable(self.lr_scheduler),
                 "lr_scheduler must be None or a callable (optimizer) -> torch.optim.lr_scheduler.LRScheduler, "
                 f"got {self.lr_scheduler!r}")
        _require(self.lr_scheduler_interval in LR_SCHEDULER_INTERVALS,
                 f"lr_scheduler_interval must be one of {LR_SCHEDULER_INTERVALS}, got {self.lr_scheduler_interval!r}")
        validate_int("loader_workers", self.loader_workers, 0, "DataLoader worker processes per rank")
        for name in ("steps_per_epoch", "validation_steps"):
            if getattr(self, name) is not None:
                validate_int(name, getattr(self, name), 1, "batches per rank, or None")
        object.__setattr__(self, "validation_freq", validate_validation_freq(self.validation_freq))
        compile_options(self.compile)  # validates
        object.__setattr__(self, "ray_data_columns", validate_ray_data_columns(self.ray_data_columns))
        if self.ray_data_shuffle_buffer is not None:
            validate_int("ray_data_shuffle_buffer", self.ray_data_shuffle_buffer, 1, "rows per rank, or None")
        object.__setattr__(self, "fsdp_wrap", validate_strategy(self.strategy, self.fsdp_wrap))
        check_fsdp_options(self.strategy, self.precision, self.compile)


def validate_strategy(strategy: Any, fsdp_wrap: Any = None) -> Any:
    """Check ``strategy=`` and ``fsdp_wrap=``; return ``fsdp_wrap`` normalised (a list of classes
    becomes a tuple).

    Example:
        >>> validate_strategy("fsdp", [dict]) == (dict,)
        True
    """
    _require(strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if fsdp_wrap is None:
        return None
    _require(strategy == "fsdp", f"fsdp_wrap is only used with strategy='fsdp' (strategy is {strategy!r}); "
             "remove fsdp_wrap or pass strategy='fsdp'")
    if isinstance(fsdp_wrap, (list, tuple)):
        _require(len(fsdp_wrap) > 0 and all(isinstance(c, type) for c in fsdp_wrap),
                 f"fsdp_wrap must be a callable (module) -> bool or a non-empty tuple of module classes, got {fsdp_wrap!r}")
        fsdp_wrap = tuple(fsdp_wrap)
    else:
        _require(callable(fsdp_wrap) and not isinstance(fsdp_wrap, type),
                 f"fsdp_wrap must be a callable (module) -> bool or a tuple of module classes, got {fsdp_wrap!r}")
    return fsdp_wrap


def check_fsdp_options(strategy: str, precision: str, compile: Any) -> None:
    """Raise ValueError when ``strategy="fsdp"`` is combined with what it does not support:
    ``precision="16-mixed"`` (a GradScaler would see only this rank's gradient shards, so ranks could
    disagree on skipping a step: ``"bf16-mixed"`` needs no scaling) and ``compile`` (sharded modules
    are not compiled yet).

    Example:
        >>> check_fsdp_options("ddp", "16-mixed", True)
    """
    if strategy != "fsdp":
        return
    _require(precision != "16-mixed",
             "precision='16-mixed' is not supported with strategy='fsdp': a GradScaler would see only this rank's "
             "gradient shards; use precision='bf16-mixed' (no loss scaling needed) or '32-true'")
    _require(compile_options(compile) is None,
             f"compile={compile!r} is not supported with strategy='fsdp' (sharded modules are not compiled yet); "
             "pass compile=False or strategy='ddp'")
