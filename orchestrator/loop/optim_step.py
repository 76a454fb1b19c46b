"""One optimizer step of a rank: its micro-batches, mixed precision, the update and the LR schedule.

- **Precision** (``precision=``, Lightning's names): ``"32-true"`` runs as written; ``"bf16-mixed"``
  and ``"16-mixed"`` run the step function under ``torch.autocast`` on the model's device type;
  ``"16-mixed"`` also scales the loss with a ``torch.amp.GradScaler`` (the ``scaler`` component of a
  backup). A step whose averaged gradients hold an inf/NaN is then the scaler's business: it skips
  the update and lowers the scale, the step is counted (``LoopResult.scaler_skips``) and the
  scale is logged as ``grad_scale``; it is not a NaN stop. A non-finite *loss* still is (as Keras's
  TerminateOnNaN looks at the loss). Without a scaler a non-finite averaged gradient is never applied
  and is reported like a non-finite loss.
- **Accumulation** (``accumulate_grad_batches=k``): an optimizer step runs ``k`` micro-batches (the
  epoch's last step runs what remains); all but the last run under DDP's ``no_sync``, so the step
  still has one gradient all-reduce, and the per-step signals (see
  :class:`~orchestrator.loop.signalled.SignalledModule`) accumulate over the micro-batches and
  ride it. Each micro-batch's loss is divided by the step's number of micro-batches: with full
  micro-batches of a batch-mean loss the gradient is that of the mean over the whole step, so
  ``batch_size=8, accumulate_grad_batches=4`` trains like ``batch_size=32``.
- **LR schedule** (:class:`LearningRates`): see its docstring for how a ``SetLearningRate`` composes.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from orchestrator.loop.data import drain
from orchestrator.loop.rank_state import MetricSums
from orchestrator.loop.steps import as_number, move_to, split_output

_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class Precision:
    """Autocast and (for ``"16-mixed"``) the gradient scaler of one rank.

    Example:
        >>> p = Precision("bf16-mixed", torch.device("cpu"))
        >>> with p.autocast():
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
        >>> p.scaler is None
        True
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        self.name = precision
        self.device_type = device.type
        self.dtype = _AUTOCAST.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None

    def autocast(self) -> Any:
        return nullcontext() if self.dtype is None else torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.scaler is None else self.scaler.scale(loss)


def build_scheduler(factory: Callable[[Any], Any] | None, optimizer: torch.optim.Optimizer) -> Any:
    """The user's scheduler for ``optimizer``, checked; ``None`` without a factory."""
    if factory is None:
        return None
    scheduler = factory(optimizer)
    refusal = _scheduler_refusal(scheduler, optimizer)
    if refusal is not None:
        raise TypeError(refusal)
    return scheduler


def _scheduler_refusal(scheduler: Any, optimizer: torch.optim.Optimizer) -> str | None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return ("lr_scheduler must not be torch's ReduceLROnPlateau (it needs a metric): use "
                "orchestrator.callbacks.ReduceLROnPlateau, which composes with a running schedule")
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        return f"lr_scheduler must return a torch.optim.lr_scheduler.LRScheduler, got {type(scheduler).__name__}"
    if scheduler.optimizer is not optimizer:
        return "lr_scheduler must schedule the optimizer it is given"
    return None


def check_scheduler_factory(optimizer_factory: Callable[[Any], Any], factory: Callable[[Any], Any] | None) -> None:
    """Refuse, before any worker starts, an ``lr_scheduler`` factory that returns torch's ReduceLROnPlateau
    or no LRScheduler: it is called on the user's optimizer built over one dummy parameter. A factory
    that cannot run on that dummy (it needs the real model's parameter groups, ...) is left to the
    rank's own check (:func:`build_scheduler`).

    Example:
        >>> check_scheduler_factory(lambda p: torch.optim.SGD(p, lr=0.1),
        ...                         lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2))
    """
    if factory is None:
        return
    dummy = [torch.nn.Parameter(torch.zeros(1))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            optimizer = optimizer_factory(dummy)
            if not isinstance(optimizer, torch.optim.Optimizer):
                return
            scheduler = factory(optimizer)
        except Exception:  # noqa: BLE001 - the dummy is not the real model: the rank checks again
            return
    refusal = _scheduler_refusal(scheduler, optimizer)
    if refusal is not None:
        raise ValueError(refusal)


class LearningRates:
    """The one place that changes the optimizer's learning rates: decisions and the schedule.

    Without a scheduler, ``set(value)`` sets every param group's rate to ``value`` (as before).
    With one, a ``SetLearningRate(value)`` decision (ReduceLROnPlateau, LearningRateScheduler, a
    user callback) **rescales the schedule**: with ``f = value / current rate`` (group 0), every
    group's rate, ``initial_lr`` and the scheduler's ``base_lrs`` are multiplied by ``f``, so the
    rate becomes ``value`` now and warm-up, cosine, step decay ... continue from the reduced level
    (exactly for schedules proportional to the base rate: LambdaLR, LinearLR, StepLR,
    CosineAnnealingLR with ``eta_min=0``, ...). When the current rate is 0 (e.g. a warm-up starting
    at 0) the base rates are set to ``value`` instead. A rollback's ``lr_factor`` scales the same way.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> lrs = LearningRates(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1)), "step")
        >>> lrs.set(0.5); lrs.end_step(); lrs.current()
        0.25
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any = None, interval: str = "epoch") -> None:
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.interval = interval

    def current(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set(self, value: float) -> None:
        value = float(value)
        if self.scheduler is None:
            for group in self.optimizer.param_groups:
                group["lr"] = value
            return
        now = self.current()
        if now > 0:
            self.scale(value / now)
        else:
            self.scheduler.base_lrs = [value for _ in self.scheduler.base_lrs]
            for group in self.optimizer.param_groups:
                group["initial_lr"] = value

    def scale(self, factor: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        if self.scheduler is not None:
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _step(self) -> None:
        if getattr(self.scheduler, "_step_count", 1) != 1:  # torch checks the order on a schedule's first step only
            self.scheduler.step()  # (a catch_warnings every step costs more than the rest of this method)
            return
        with warnings.catch_warnings():  # a first step the scaler (or the NaN guard) skipped is normal here
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.scheduler.step()

    def end_step(self) -> None:
        """An optimizer step ended (applied or skipped: the schedule counts optimizer-step boundaries)."""
        if self.scheduler is not None and self.interval == "step":
            self._step()

    @property
    def steps_at_epoch_end(self) -> bool:
        """Whether :meth:`end_epoch` changes the schedule (and the optimizer's rates)."""
        return self.scheduler is not None and self.interval == "epoch"

    def end_epoch(self) -> None:
        """An epoch's training and validation ended."""
        if self.scheduler is not None and self.interval == "epoch":
            self._step()


def micro_batch_groups(loader: Iterable[Any], first_step: int, k: int) -> Iterator[tuple[int, list[Any]]]:
    """``(step, micro-batches)``: ``k`` consecutive batches of ``loader`` per step (the last: what remains).
    Left before its end, the loader's iterator is drained (:func:`~orchestrator.loop.data.drain`), by
    the process that read it: a generator left in a reference cycle may be finalised by the garbage
    collector of a process forked later (a loader worker), which must not read the rank's queues.

    Example:
        >>> list(micro_batch_groups(range(5), first_step=3, k=2))
        [(3, [0, 1]), (4, [2, 3]), (5, [4])]
    """
    it, reader = iter(loader), os.getpid()
    try:
        for step in itertools.count(first_step):
            group = list(itertools.islice(it, k))
            if not group:
                return
            yield step, group
    finally:
        if os.getpid() == reader:
            drain(it)


@dataclass
class StepSignals:
    """What every rank knows after one optimizer step's all-reduce (the same on every rank)."""

    nonfinite: bool  # a non-finite loss, or (without a scaler) a non-finite averaged gradient: no update
    loss_sum: float
    count: float
    preempted: bool
    scaler_skipped: bool = False
    out_of_data: bool = False  # some rank's stream has no batch after this step: the epoch ends here


class OptimStep:
    """Runs optimizer steps: forward and backward of each micro-batch, one all-reduce, the update.

    Args:
        ddp: The module the step function is called with: the DDP-wrapped
            :class:`~orchestrator.loop.signalled.SignalledModule`, or the FSDP-sharded model.
        model: The user's model (its gradients are checked and clipped).
        signals: How the step's signals reach every rank (:class:`~orchestrator.loop.signalled.DdpSignals`
            or :class:`~orchestrator.loop.fsdp.ShardedSignals`) and how micro-batches skip the gradient sync.
        optimizer: The user's optimizer.
        precision: Autocast and scaler.
        lrs: The learning rates and schedule.
        sums: The epoch's metric sums (every micro-batch is added).
        world_size: Number of ranks.
        clip_grad_norm: Clip the (unscaled) gradient norm, or None.
        preemption: The preemption notice.
        train_step: ``(model, batch) -> output``.
        device: The rank's device.
    """

    def __init__(self, *, ddp: torch.nn.Module, model: torch.nn.Module, signals: Any, optimizer: torch.optim.Optimizer,
                 precision: Precision, lrs: LearningRates, sums: MetricSums, world_size: int,
                 clip_grad_norm: float | None, preemption: threading.Event, train_step: Callable[..., Any],
                 device: torch.device) -> None:
        self.ddp, self.signals, self.optimizer, self.precision, self.lrs = ddp, signals, optimizer, precision, lrs
        self.sums, self.world_size, self.clip, self.preemption = sums, world_size, clip_grad_norm, preemption
        self.train_step, self.device = train_step, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        #: Called once the step's all-reduce is done, before anything changes (see loop/live.py's unmark).
        self.before_update: Callable[[], None] | None = None

    def run(self, batches: list[Any], out_of_data: bool = False) -> StepSignals:
        """One optimizer step over ``batches`` (its micro-batches); ``out_of_data``: this rank has no
        batch after them (an iterable's shard ran out), which rides the step's all-reduce."""
        signals, scaler, count = self.signals, self.precision.scaler, len(batches)
        dtype, device = signals.dtype, signals.device
        on_cpu = device.type == "cpu"
        pending: Any = None  # the step's signal values so far: their sum rides the last micro-batch's backward
        for i, batch in enumerate(batches):
            last = i == count - 1
            with nullcontext() if last else signals.no_sync():  # one gradient sync per step
                if self.device.type != "cpu":  # a CPU rank's batches are where they will be used
                    batch = move_to(batch, self.device)
                with self.precision.autocast():
                    loss, metrics, n = split_output(self.train_step(self.ddp, batch), batch)
                if scaler is not None:
                    metrics["grad_scale"] = torch.as_tensor(scaler.get_scale(), dtype=torch.float32)
                notice = 1.0 if self.preemption.is_set() else 0.0
                if on_cpu:  # read as Python floats (no device to wait for): no tensor op at all
                    numbers = [as_number(loss), *map(as_number, metrics.values())]
                    weighted = self.sums.train.add_values(numbers, list(metrics), n)
                    row = [0.0 if math.isfinite(numbers[0]) else 1.0, weighted[0], float(n), notice, float(out_of_data)]
                    pending = row if pending is None else [a + b for a, b in zip(pending, row)]
                else:  # no device sync before the all-reduce
                    detached = loss.detach().float()
                    weighted_loss = self.sums.train.add(detached, {k: v.detach().float() for k, v in metrics.items()}, n)
                    values = torch.cat([
                        torch.stack([(~torch.isfinite(detached)).to(dtype), weighted_loss.to(dtype)]),
                        torch.tensor([float(n), notice, float(out_of_data)], dtype=dtype, device=device)])
                    pending = values if pending is None else pending + values
                scaled = self.precision.scale(loss.float() if count == 1 else loss.float() / count)
                if not last:  # the signal's gradient is a sum: the last micro-batch carries all of them
                    scaled.backward()
                    continue
                term = signals.term(torch.tensor(pending, dtype=dtype) if on_cpu else pending)
                # one backward pass from both roots (the term's gradient reaches only the signal)
                torch.autograd.backward([scaled] if term is None else [scaled, term])
        # the step's one device sync; the verdict on the gradients (`bad`) is the same on every rank
        # (DDP: identical gradients; FSDP: all-reduced flags)
        bad_loss, loss_sum, n_sum, preempted, ended, bad = signals.collect(self.params)
        if self.before_update is not None:
            self.before_update()
        nonfinite = bad_loss > 0 or (bad > 0 and scaler is None)
        skipped = False
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)  # never apply a non-finite update
        else:
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            if self.clip is not None and not bad:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            if scaler is not None:
                scaler.step(self.optimizer)  # skips the update when the gradients hold an inf/NaN
                scaler.update()  # and lowers the scale then
                skipped = bad > 0
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.lrs.end_step()
        return StepSignals(nonfinite=nonfinite, loss_sum=loss_sum, count=n_sum, preempted=preempted > 0,
                           scaler_skipped=skipped, out_of_data=ended > 0)


def steps_per_epoch(micro_batches: int, k: int) -> int:
    """Optimizer steps in an epoch of ``micro_batches`` batches.

    Example:
        >>> steps_per_epoch(5, 4)
        2
    """
    return math.ceil(micro_batches / k)
