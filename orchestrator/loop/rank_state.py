"""What a rank's training state is made of: named :class:`Stateful` components.

A rank's state is a mapping ``{name: Component}``. Each :class:`Component` wraps an object with
``state_dict()`` / ``load_state_dict(state)`` (a torch module or optimizer as they are, or one of
the small holders below) and says where it is saved and when it is restored. The saver
(:mod:`orchestrator.loop.saver`) iterates over the mapping; adding state is one more entry in
:func:`rank_components`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

import torch

from orchestrator.core.metrics import PhaseSums
from orchestrator.loop.specs import LoopResult
from orchestrator.loop.state_io import capture_rng, restore_rng


@runtime_checkable
class Stateful(Protocol):
    """Anything that can hand out its state and take it back (torch modules and optimizers do)."""

    def state_dict(self) -> Any:
        """The state: tensors, containers of them and plain Python values (``weights_only``-loadable)."""

    def load_state_dict(self, state: Any, /) -> Any:
        """Take back a state returned by :meth:`state_dict` (possibly of another instance)."""


@dataclass(frozen=True)
class Component:
    """One named piece of a rank's state, and how it is saved and restored.

    Args:
        stateful: The object whose ``state_dict()`` is saved and ``load_state_dict()`` restores it.
        shared: Identical on every rank: rank 0 alone saves it (into the step folder's shared file)
            and every rank loads it. Defaults to ``False``: every rank saves its own (its rank file).
        restore_last: Restored after every other component, only when the loaded backup's pending
            part is applied (right before the next batch runs). Defaults to ``False``.
        finite: A backup whose copy of this state holds a non-finite float is refused (never
            committed). Defaults to ``False``.
        sharded: Every rank holds only its shards (DTensors) of it (``strategy="fsdp"``): every rank
            saves its shards through torch.distributed.checkpoint (the step folder's ``sharded/``)
            and loads them resharded (see :mod:`~orchestrator.loop.sharded_state`). Defaults to ``False``.

    Example:
        >>> components = {"model": Component(torch.nn.Linear(2, 1), shared=True, finite=True),
        ...               "rng": Component(RngStreams(), restore_last=True)}
    """

    stateful: Stateful
    shared: bool = False
    restore_last: bool = False
    finite: bool = False
    sharded: bool = False


Components = Mapping[str, Component]


@dataclass
class Position:
    """Where a rank is: the last completed batch of ``epoch`` (phase ``"batch"``), the end of
    ``epoch`` (``"epoch_end"``), ``epoch`` begun (its epoch-begin sync point handled) with no batch
    done yet (``"begin"``), or nothing done yet (``"start"``).

    Example:
        >>> pos = Position()
        >>> pos.advance(0, 0)
        >>> pos.next_batch(steps_per_epoch=4), pos.global_step
        ((0, 1), 1)
    """

    epoch: int = 0
    batch: int = -1
    global_step: int = 0
    phase: str = "start"

    def next_batch(self, steps_per_epoch: int) -> tuple[int, int]:
        """(epoch, batch) to run next."""
        if self.phase == "start":
            return 0, 0
        if self.phase == "epoch_end":
            return self.epoch + 1, 0
        return self.epoch, self.batch + 1  # "begin": batch is -1

    def begin_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` began: its epoch-begin sync point ran (a resume here does not run it again)."""
        self.epoch, self.batch, self.phase = epoch, -1, "begin"

    def advance(self, epoch: int, batch: int) -> None:
        """Batch ``batch`` of ``epoch`` is done (run or skipped): one more global step."""
        self.epoch, self.batch, self.global_step, self.phase = epoch, batch, self.global_step + 1, "batch"

    def end_epoch(self, epoch: int, last_batch: int) -> None:
        """Epoch ``epoch`` (batches up to ``last_batch``) is done, validation included."""
        self.epoch, self.batch, self.phase = epoch, last_batch, "epoch_end"

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "global_step": self.global_step, "phase": self.phase}

    def load_state_dict(self, state: Mapping[str, Any], /) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.global_step, self.phase = int(state["global_step"]), str(state["phase"])


class Accumulator:
    """Sums of ``value * n`` for the loss and every metric, in float64: a tensor on the device, or on
    a CPU rank Python floats (:meth:`add_values`, the same IEEE double sums) turned into that tensor
    only when :attr:`totals` is read (a snapshot, a backup).

    Args:
        device: Where a loaded state's sums go. Defaults to ``None``: where they were saved from (CPU).

    Example:
        >>> acc = Accumulator()
        >>> _ = acc.add(torch.tensor(2.0), {"mae": torch.tensor(1.0)}, n=3)
        >>> acc.phase_sums()
        PhaseSums(totals={'loss': 6.0, 'mae': 3.0}, count=3)
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.names: list[str] = []
        self._tensor: torch.Tensor | None = None  # the sums as a tensor, when it holds the newest
        self._floats: list[float] | None = None  # the sums as Python floats (add_values), when they are the newest
        self.count = 0

    @property
    def totals(self) -> torch.Tensor | None:
        """The sums (float64; ``None`` before the first batch). Never changed in place afterwards: a
        ``state_dict()`` handed out stays a snapshot (see live.py)."""
        if self._tensor is None and self._floats is not None:
            self._tensor = torch.tensor(self._floats, dtype=torch.float64)
        return self._tensor

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """Add one batch; return the batch's ``loss * n`` (float64, on the device)."""
        weighted = torch.stack([loss, *(v.detach().to(loss.device) for v in metrics.values())]).double() * n
        totals = self.totals
        if totals is None:
            self.names, self._tensor = ["loss", *metrics], weighted
        else:  # a new tensor, never an in-place add (see totals)
            self._tensor = totals + weighted
        self._floats = None
        self.count += n
        return weighted[0]

    def add_values(self, values: list[float], metric_names: list[str], n: int) -> list[float]:
        """Add one batch given as Python floats ``[loss, *metrics]`` (a CPU loop reads them without a
        device sync); return ``value * n`` for each, the same float64 numbers :meth:`add` computes."""
        weighted = [v * n for v in values]
        sums = self._values()
        if sums is None:
            self.names, self._floats = ["loss", *metric_names], list(weighted)
        else:
            self._floats = [a + b for a, b in zip(sums, weighted)]
        self._tensor = None
        self.count += n
        return weighted

    def clear(self) -> None:
        self.names, self._tensor, self._floats, self.count = [], None, None, 0

    def phase_sums(self) -> PhaseSums:
        """The sums as Python floats (one device sync)."""
        return PhaseSums(totals=dict(zip(self.names, self._values() or [])), count=self.count)

    def _values(self) -> list[float] | None:
        """The sums as Python floats (``None`` before the first batch)."""
        if self._floats is not None:
            return self._floats
        return self._tensor.tolist() if self._tensor is not None else None

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "totals": self.totals, "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any], /) -> None:
        totals = state["totals"]
        self.names, self.count = list(state["names"]), int(state["count"])
        self._tensor = totals.to(self.device) if totals is not None and self.device is not None else totals
        self._floats = None


class MetricSums:
    """The epoch so far: this rank's exact training sums, and the cluster-wide running loss
    (sum and count, for progress reports only).

    Args:
        device: Where the training sums live.

    Example:
        >>> sums = MetricSums(torch.device("cpu"))
        >>> sums.see(loss_sum=6.0, count=3.0)
        >>> sums.running_loss()
        2.0
    """

    def __init__(self, device: torch.device) -> None:
        self.train = Accumulator(device)
        self.seen_loss = 0.0
        self.seen_count = 0.0

    def reset(self) -> None:
        """A new epoch begins."""
        self.train.clear()
        self.seen_loss = self.seen_count = 0.0

    def see(self, loss_sum: float, count: float) -> None:
        self.seen_loss += loss_sum
        self.seen_count += count

    def running_loss(self) -> float:
        return self.seen_loss / max(self.seen_count, 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train.state_dict(), "seen": [self.seen_loss, self.seen_count]}

    def load_state_dict(self, state: Mapping[str, Any], /) -> None:
        self.train.load_state_dict(state["train"])
        self.seen_loss, self.seen_count = (float(v) for v in state["seen"])


@dataclass
class Snapshots:
    """CPU copies of the model's weights kept under a key (``SnapshotWeights`` / ``RestoreWeights``).

    Example:
        >>> model, snapshots = torch.nn.Linear(2, 1), Snapshots()
        >>> snapshots.keep("best", model)
        >>> snapshots.restore("best", model)
    """

    kept: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def keep(self, key: str, model: torch.nn.Module) -> None:
        self.kept[key] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def restore(self, key: str, model: torch.nn.Module) -> None:
        if key not in self.kept:
            raise RuntimeError(f"no weights were kept under {key!r} to restore")
        model.load_state_dict(self.kept[key])

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.kept

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]], /) -> None:
        self.kept = {key: dict(weights) for key, weights in state.items()}


class RngStreams:
    """The process's Python, numpy, torch and CUDA random streams, as one component.

    Example:
        >>> streams = RngStreams()
        >>> saved = streams.state_dict()
        >>> first = torch.rand(1)
        >>> streams.load_state_dict(saved)
        >>> torch.equal(torch.rand(1), first)
        True
    """

    def state_dict(self) -> dict[str, Any]:
        return capture_rng()

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        restore_rng(state)


@dataclass
class ResultCounters:
    """The part of a rank's :class:`~orchestrator.loop.specs.LoopResult` that accumulates over the
    run (learning rate per epoch, epochs and steps run, where a decision stopped training).

    Example:
        >>> counters = ResultCounters(LoopResult(rank=0))
        >>> counters.load_state_dict({"learning_rates": [0.1], "epochs_run": 1, "steps_run": 5,
        ...                           "stopped_at": None})
        >>> counters.result.epochs_run
        1
    """

    result: LoopResult

    def state_dict(self) -> dict[str, Any]:
        r = self.result
        return {"learning_rates": list(r.learning_rates), "epochs_run": r.epochs_run, "steps_run": r.steps_run,
                "stopped_at": r.stopped_at, "scaler_skips": r.scaler_skips}

    def load_state_dict(self, state: Mapping[str, Any], /) -> None:
        r = self.result
        r.learning_rates = [float(v) for v in state["learning_rates"]]
        r.epochs_run, r.steps_run = int(state["epochs_run"]), int(state["steps_run"])
        r.scaler_skips = int(state.get("scaler_skips", 0))
        stopped = state["stopped_at"]
        r.stopped_at = (int(stopped[0]), int(stopped[1])) if stopped else None


def rank_components(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, snapshots: Snapshots,
                    position: Position, metric_sums: MetricSums, result: LoopResult, scaler: Stateful | None = None,
                    lr_scheduler: Stateful | None = None) -> dict[str, Component]:
    """A training rank's state by name: what a backup saves and a resume or rollback loads.

    ``scaler`` (``precision="16-mixed"``'s GradScaler) and ``lr_scheduler`` are entries only when used;
    both are the same on every rank (they follow the all-reduced gradients and the step count).

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> components = rank_components(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                              snapshots=Snapshots(), position=Position(),
        ...                              metric_sums=MetricSums(torch.device("cpu")), result=LoopResult(rank=0))
        >>> [name for name, c in components.items() if c.shared]
        ['model', 'optimizer', 'snapshots']
    """
    optional = {"scaler": scaler, "lr_scheduler": lr_scheduler}
    return {
        "model": Component(model, shared=True, finite=True),
        "optimizer": Component(optimizer, shared=True),
        **{name: Component(value, shared=True) for name, value in optional.items() if value is not None},
        "snapshots": Component(snapshots, shared=True),
        "position": Component(position),
        "metric_sums": Component(metric_sums),
        "result": Component(ResultCounters(result)),
        "rng": Component(RngStreams(), restore_last=True),
    }

