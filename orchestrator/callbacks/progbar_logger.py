"""Print training progress on the driver (Keras 3 ``ProgbarLogger``)."""

from __future__ import annotations

import sys
import time
from typing import Any, ClassVar, TextIO

from orchestrator.callbacks.base import Callback


def format_value(value: Any) -> str:
    """Keras's progress-bar number format: 4 decimals, scientific notation for tiny values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4f}" if abs(value) > 1e-3 else f"{value:.4e}"


def format_logs(logs: dict | None) -> str:
    return " - ".join(f"{key}: {format_value(value)}" for key, value in (logs or {}).items())


class ProgbarLogger(Callback):
    """Callback that prints metrics on the driver.

    Reads ``params["verbose"]`` at each call: ``0`` prints nothing; on an interactive terminal
    ``"auto"`` or ``1`` draws a ``tqdm`` bar per epoch, updated from the progress reports the
    driver forwards (rank 0's running loss, about once a second): steps done of the epoch's steps,
    elapsed time and ETA, steps/s and the running loss, then the epoch's logs at its end::

        Epoch 3/20:  45%|████▌     | 45/100 [00:04<00:05, 10.2step/s, loss: 0.1234]

    Otherwise (``2``, or output that is not a terminal, such as a log file or ``ray job logs``)
    it prints exactly one line per epoch, and nothing per batch::

        Epoch 3/20 - 1.2s - loss: 0.1234 - val_loss: 0.2345 - learning_rate: 0.1000

    After a restart the attempt's ``on_train_begin`` closes the bar of the failed attempt, and a
    resume mid-epoch opens the bar at the restored step (``trainer.extra["initial_step"]`` steps of
    ``trainer.epoch`` done, set by the driver), so it shows the steps really done.

    Args:
        stream: Where to write. ``None`` means ``sys.stdout`` as it is at call time (Keras's
            ``ProgbarLogger`` takes no arguments; this one is for redirection and tests).
            Defaults to ``None``.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> logger = ProgbarLogger(stream=out)
        >>> logger.set_params({"epochs": 2, "steps": 10, "verbose": "auto"})
        >>> logger.on_epoch_end(0, {"loss": 0.5})
        >>> out.getvalue().split(" - ")[0]
        'Epoch 1/2'
    """

    runs_on: ClassVar[str] = "driver"

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream
        self._bar: Any = None
        self._epoch = 0
        self._epoch_start = self._now()

    def _now(self) -> float:
        """When the reported event happened on the cluster (the driver sets it), else now."""
        return float(self.trainer.extra.get("event_time", time.time()))

    # -- configuration, read at call time ------------------------------------------------------
    @property
    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stdout

    def _mode(self) -> str:
        """``"off"``, ``"bar"`` (interactive tqdm) or ``"line"`` (one line per epoch)."""
        verbose = self.params.get("verbose", "auto")
        if verbose == 0:
            return "off"
        isatty = getattr(self._out, "isatty", None)
        if verbose in ("auto", 1) and callable(isatty) and isatty():
            return "bar"
        return "line"

    # -- hooks -----------------------------------------------------------------------------------
    def on_train_begin(self, logs: dict | None = None) -> None:
        self._close_bar()  # a restart: the failed attempt's bar ends where it was
        self._epoch, self._epoch_start = self.trainer.epoch, self._now()
        initial = int(self.trainer.extra.get("initial_step", 0) or 0)
        if initial > 0 and self._mode() == "bar":  # resumed mid-epoch: the bar starts at the restored step
            self._open_bar(self._epoch, initial=initial)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._close_bar()
        self._epoch, self._epoch_start = epoch, self._now()
        if self._mode() == "bar":
            self._open_bar(epoch)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self._mode() != "bar":
            return
        if self._bar is None:
            self._open_bar(self._epoch)
        self._advance(batch + 1, logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        mode = self._mode()
        if mode == "bar":
            if self._bar is None:
                self._open_bar(epoch)
            self._advance(self._bar.total or self._bar.n, logs)
            self._close_bar()
        elif mode == "line":
            epochs = self.params.get("epochs")
            parts = [f"Epoch {epoch + 1}/{epochs}" if epochs else f"Epoch {epoch + 1}",
                     f"{self._now() - self._epoch_start:.1f}s"]
            if logs:
                parts.append(format_logs(logs))
            print(" - ".join(parts), file=self._out, flush=True)
        self._epoch, self._epoch_start = epoch + 1, self._now()

    def on_train_end(self, logs: dict | None = None) -> None:
        self._close_bar()

    # -- tqdm --------------------------------------------------------------------------------------
    def _open_bar(self, epoch: int, initial: int = 0) -> None:
        from tqdm import tqdm  # imported only when a terminal is there to draw on

        epochs = self.params.get("epochs")
        # tqdm's default format shows n/total, elapsed<ETA and steps/s; the running loss goes in the postfix
        self._bar = tqdm(total=self.params.get("steps") or None, file=self._out, unit="step", initial=initial,
                         desc=f"Epoch {epoch + 1}/{epochs}" if epochs else f"Epoch {epoch + 1}",
                         dynamic_ncols=True, leave=True)

    def _advance(self, done: int, logs: dict | None) -> None:
        if done > self._bar.n:
            self._bar.update(done - self._bar.n)
        if logs:
            self._bar.set_postfix_str(format_logs(logs), refresh=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
