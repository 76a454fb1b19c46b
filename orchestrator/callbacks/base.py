"""The Callback base class and the read-only view of training that callbacks see.

Callbacks run once for the whole cluster, on the coordinator, on cluster-wide logs (or on the
driver for display-only callbacks such as :class:`ProgbarLogger`). A hook *returns* its
decisions (see :mod:`orchestrator.decisions`); it never reaches into the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from orchestrator.decisions import Decision


@dataclass(frozen=True)
class BackupCost:
    """What the latest committed backup cost, as the coordinator measured it.

    Args:
        step: The backup's global step.
        stall_s: The longest any rank's training stood still for it (waiting for the previous
            persist, copying to CPU).
        persist_s: Seconds from the coordinator's decision to the commit of its manifest.

    Example:
        >>> BackupCost(step=50, stall_s=0.01, persist_s=0.2).stall_s
        0.01
    """

    step: int
    stall_s: float
    persist_s: float


@dataclass
class TrainingView:
    """What a callback may read about the run. The coordinator keeps it current.

    Attributes:
        learning_rate: The learning rate that the optimizer uses now (param group 0).
        epoch: The current 0-based epoch.
        step: The 0-based batch index within the epoch at the latest sync.
        global_step: Optimizer steps taken since the run began.
        world_size: Number of ranks.
        last_backup: What the newest backup committed by this attempt cost, or None.
        failures: Failed attempts of this run that the driver restarted after, before this attempt.
    """

    learning_rate: float = 0.0
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    world_size: int = 1
    last_backup: BackupCost | None = None
    failures: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Callback:
    """Base class for callbacks; subclass it and override the hooks you need.

    Hooks follow Keras 3's names and order in ``fit``: ``on_train_begin``, then per epoch
    ``on_epoch_begin``, batch hooks, ``on_test_begin``/``on_test_end`` around validation,
    ``on_epoch_end``, and finally ``on_train_end``. ``logs`` hold cluster-wide aggregated values.

    Batch hooks (``on_train_batch_begin``/``on_train_batch_end``) cost a round trip to the
    coordinator, so they are called only at sync points: every ``batch_sync_every`` steps (set
    it on your subclass; ``None`` means never) and whenever a rank sees a non-finite loss.

    A hook returns ``None``, one :class:`~orchestrator.decisions.Decision` or a list of them.

    What the orchestrator needs to know about a callback is declared as class attributes, read
    as such (never probed): ``runs_on``, ``batch_sync_every`` and ``survives_rollback``.

    Attributes:
        params: Keras-style run parameters (``epochs``, ``steps``, ``verbose``, ``metrics``).
        trainer: A :class:`TrainingView` with the current learning rate, epoch and step.

    Example:
        >>> from orchestrator.decisions import StopTraining
        >>> class StopAtAccuracy(Callback):
        ...     def on_epoch_end(self, epoch, logs=None):
        ...         if (logs or {}).get("val_accuracy", 0.0) >= 0.99:
        ...             return StopTraining(reason="target_reached", source="StopAtAccuracy")
    """

    #: Where the callback runs: "coordinator" (decides) or "driver" (display only; its
    #: return values are ignored).
    runs_on: ClassVar[str] = "coordinator"
    #: Steps between batch-hook calls; None = batch hooks only on non-finite-loss events.
    batch_sync_every: int | None = None
    #: When the coordinator rolls training back to a committed backup (a ``Rollback`` decision),
    #: every callback reloads its state from that backup, except those that set this to True:
    #: they keep their current state (e.g. ``RollbackOnNaN`` keeps counting its rollbacks).
    survives_rollback: ClassVar[bool] = False
    #: Index of the callback in the :class:`~orchestrator.callbacks.CallbackList` that runs it (the
    #: user's callbacks in order), set by that list; None outside one. It is the same in every
    #: attempt of a run, so callbacks use it to name what they keep (``EarlyStopping.weights_key``).
    position: int | None = None

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.trainer: TrainingView = TrainingView()
        self.storage: Any = None

    # -- wiring --------------------------------------------------------------------------
    def set_storage(self, storage: Any) -> None:
        """Give the callback the run's storage (a :class:`~orchestrator.storage.fs.RunStorage`).

        The coordinator calls it before ``on_train_begin`` of every attempt; callbacks that write
        files (CSVLogger, TensorBoard) write through it, so a relative path lands under the run
        directory and any fsspec URL works. ``None`` when the run has no storage (unit tests).
        """
        self.storage = storage

    def set_params(self, params: dict[str, Any]) -> None:
        self.params = params

    def set_trainer(self, view: TrainingView) -> None:
        self.trainer = view

    def validate(self, params: dict[str, Any]) -> None:
        """Check arguments against the run before any worker starts; raise ValueError if wrong."""

    # -- state (for backups) -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    # -- hooks (Keras 3 names) -----------------------------------------------------------
    def on_train_begin(self, logs: dict | None = None) -> Decision | list[Decision] | None:
        return None

    def on_train_end(self, logs: dict | None = None) -> Decision | list[Decision] | None:
        return None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> Decision | list[Decision] | None:
        return None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> Decision | list[Decision] | None:
        return None

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> Decision | list[Decision] | None:
        return self.on_batch_begin(batch, logs)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> Decision | list[Decision] | None:
        return self.on_batch_end(batch, logs)

    def on_test_begin(self, logs: dict | None = None) -> Decision | list[Decision] | None:
        return None

    def on_test_end(self, logs: dict | None = None) -> Decision | list[Decision] | None:
        return None

    # Keras's legacy aliases: the default on_train_batch_* hooks call these.
    def on_batch_begin(self, batch: int, logs: dict | None = None) -> Decision | list[Decision] | None:
        return None

    def on_batch_end(self, batch: int, logs: dict | None = None) -> Decision | list[Decision] | None:
        return None

    @property
    def name(self) -> str:
        return type(self).__name__
