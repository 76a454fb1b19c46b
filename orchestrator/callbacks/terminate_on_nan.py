"""Stop training when the loss becomes NaN or infinite (Keras 3 ``TerminateOnNaN``)."""

from __future__ import annotations

import math

from orchestrator.callbacks.base import Callback
from orchestrator.decisions import StopTraining


class TerminateOnNaN(Callback):
    """Terminate training when a NaN or infinite loss is encountered.

    A non-finite loss on *any* rank travels with that step's own collective, and the framework
    then calls the batch hooks at that step, so this callback needs no periodic batch sync
    (``batch_sync_every`` stays ``None``). By default it returns a
    :class:`~orchestrator.decisions.StopTraining` that every rank applies after the step, so the
    other callbacks' ``on_train_end`` still runs. With ``raise_error=True`` it raises instead,
    which fails the run without the usual end-of-training cleanup. The stop's ``terminated_on_nan``
    event in ``events.jsonl`` carries ``monitor`` (``"loss"``) and the non-finite ``value``.

    Args:
        raise_error: If ``False``, stop gracefully; if ``True``, raise :class:`RuntimeError` at
            once. Defaults to ``False``.

    Example:
        >>> guard = TerminateOnNaN()
        >>> guard.on_train_batch_end(7, {"loss": float("nan")})
        Batch 7: Invalid loss, terminating training
        StopTraining(reason='nan_detected', source='TerminateOnNaN', details={'monitor': 'loss', 'value': nan})
    """

    def __init__(self, raise_error: bool = False) -> None:
        super().__init__()
        self.raise_error = bool(raise_error)

    def on_batch_end(self, batch: int, logs: dict | None = None) -> StopTraining | None:
        """Check the loss at a synced step; ``batch`` is the 0-based index in the epoch.

        Raises:
            RuntimeError: If the loss is NaN or infinite and ``raise_error`` is True.
        """
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(loss):
            return None
        if self.raise_error:
            raise RuntimeError(
                f"NaN or Inf loss encountered at batch {batch}. "
                f"Loss value: {loss}. Terminating training immediately."
            )
        print(f"Batch {batch}: Invalid loss, terminating training")
        return StopTraining(reason="nan_detected", source="TerminateOnNaN", details={"monitor": "loss", "value": loss})

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> StopTraining | None:
        # Safety net: the epoch's aggregated loss is non-finite when any step's loss was.
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(loss):
            return None
        if self.raise_error:
            raise RuntimeError(
                f"NaN or Inf loss encountered at epoch {epoch}. "
                f"Loss value: {loss}. Terminating training immediately."
            )
        print(f"Epoch {epoch + 1}: Invalid loss, terminating training")
        return StopTraining(reason="nan_detected", source="TerminateOnNaN", details={"monitor": "loss", "value": loss})
