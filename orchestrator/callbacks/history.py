"""Record every epoch's logs (Keras 3 ``History``); ``Trainer.fit`` returns one."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from orchestrator.callbacks.base import Callback


class History(Callback):
    """Callback that records events into a ``History`` object.

    ``Trainer.fit`` always adds one and returns it. It runs on the driver and receives the
    cluster-wide logs of every epoch.

    Attributes:
        history: Per-epoch lists of logged values keyed like Keras (``loss``, ``val_loss``,
            ``<metric>``, ``val_<metric>``, ``learning_rate``).
        epoch: The 0-based epochs that were run.
        model: The trained ``torch.nn.Module`` on the driver, on CPU; set by ``fit`` when it
            returns (``None`` before that).

    Example:
        >>> history = History()
        >>> history.on_train_begin()
        >>> history.on_epoch_end(0, {"loss": 0.5, "val_loss": 0.6})
        >>> history.history, history.epoch
        ({'loss': [0.5], 'val_loss': [0.6]}, [0])
    """

    runs_on: ClassVar[str] = "driver"

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[Any]] = {}
        self.epoch: list[int] = []
        self.model: Any = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        # As in Keras 3, ``epoch`` restarts with each fit while ``history`` keeps growing when
        # the same instance is reused.
        self.epoch = []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(value)

    def state_dict(self) -> dict[str, Any]:
        return {"history": copy.deepcopy(self.history), "epoch": list(self.epoch)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = copy.deepcopy(state.get("history", {}))
        self.epoch = list(state.get("epoch", []))
