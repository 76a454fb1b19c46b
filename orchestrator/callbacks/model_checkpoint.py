"""Save the model at some frequency (Keras 3 ``ModelCheckpoint``), deciding once for the cluster."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Any

from orchestrator.callbacks.monitor import MonitorCallback
from orchestrator.decisions import SaveModel

EXTENSIONS = (".pt", ".pth")


class ModelCheckpoint(MonitorCallback):
    """Save the model or its weights at some frequency.

    Runs once for the whole cluster on aggregated logs and *returns* a
    :class:`~orchestrator.decisions.SaveModel`; rank 0 writes the file with ``torch.save``. The
    file is a plain ``torch.save`` file, loadable with ``torch.load(path, weights_only=True)``.

    Semantics follow Keras 3.15:

    - ``filepath`` is formatted with ``epoch`` (1-based), the keys of ``logs`` and, for
      batch-level saves, ``batch`` (1-based within the epoch; not passed for epoch-level saves,
      and never when ``logs`` already holds a ``"batch"`` key). A placeholder that is neither
      raises ``KeyError('Failed to format this callback filepath: "<filepath>". Reason: <key>')``.
      The formatted path is returned as is: a relative path lands under ``<run>/checkpoints/``.
    - ``save_best_only=True`` saves only when the monitored value improves on the best so far
      (initially ``initial_value_threshold``; ``None`` means the first value always improves,
      even NaN or inf), compared in float32 as Keras does (see
      :class:`~orchestrator.callbacks.monitor.MonitorCallback`).
      When the monitored value is missing from the logs, Keras 3.15 warns
      ``"Can save best model only with <monitor> available."`` and **saves anyway**; so do we.
    - ``save_freq`` is ``"epoch"`` or a number of batches; the count runs across epoch
      boundaries (it is not reset at an epoch's start).

    Batch hooks run only at sync points (see :class:`~orchestrator.callbacks.Callback`), so
    ``on_train_batch_end`` is not called after every batch. With an integer ``save_freq`` the
    callback sets ``batch_sync_every = save_freq`` and counts the batches trained since its
    previous call from the ``(epoch, batch)`` of both calls and ``params["steps"]`` (batches per
    epoch): the tail of the earlier epoch, any whole epochs in between, and ``batch + 1`` of the
    current one (the first call counts from the start of training). When called after every
    batch this is exactly Keras's count; when the sync points fall every ``save_freq`` steps
    counted across epochs, the saves land on exactly the batches where Keras saves. Like Keras with
    ``steps_per_execution``, a save happens at the first call at which ``save_freq`` or more
    batches have accumulated, and the count restarts from zero there.

    Args:
        filepath: Path or fsspec URL of the file to write; must end with ``.pt`` or ``.pth``.
            May contain named formatting options, e.g. ``"{epoch:02d}-{val_loss:.2f}.pt"``.
            Without options, each save overwrites the same file.
        monitor: The metric name to monitor (prefix ``"val_"`` for validation metrics).
            Defaults to ``"val_loss"``.
        verbose: ``0`` is silent, ``1`` prints a message when the callback decides to save (or
            not to). Defaults to ``0``.
        save_best_only: Only save when the monitored quantity improves. Defaults to ``False``.
        save_weights_only: Save only the model's ``state_dict``; otherwise a dict with the model,
            the optimizer state, the epoch and the step. Defaults to ``False``.
        mode: One of ``{"auto", "min", "max"}``: whether an improvement is a lower or a higher
            value; ``"auto"`` infers it from the metric name (unknown metrics raise ValueError
            before training starts, as Keras raises at the first epoch end). Defaults to ``"auto"``.
        save_freq: ``"epoch"`` to save after each epoch, or an integer ``>= 1`` to save after that
            many batches. Defaults to ``"epoch"``.
        initial_value_threshold: Initial "best" value of the monitored quantity; with
            ``save_best_only`` nothing is saved until it is beaten. Defaults to ``None``.
        max_to_keep: Beyond Keras: how many of this callback's files to keep. With
            ``save_best_only`` the ``max_to_keep`` best by monitored value are kept, otherwise the
            most recent ones; the others are listed in the ``delete`` field of the
            :class:`~orchestrator.decisions.SaveModel` that makes them redundant. A file whose
            formatted name equals a kept one replaces it. ``None`` keeps every file.
            Defaults to ``None``.

    Example:
        >>> checkpoint = ModelCheckpoint("{epoch:02d}-{val_loss:.3f}.pt", save_best_only=True,
        ...                              max_to_keep=3)
        >>> # Trainer(..., callbacks=[checkpoint]).fit(epochs=20) keeps the three files with the
        >>> # lowest cluster-wide val_loss under <run>/checkpoints/.
    """

    def __init__(self, filepath: str | os.PathLike, monitor: str = "val_loss", verbose: int = 0,
                 save_best_only: bool = False, save_weights_only: bool = False, mode: str = "auto",
                 save_freq: str | int = "epoch", initial_value_threshold: float | None = None,
                 max_to_keep: int | None = None) -> None:
        super().__init__(monitor=monitor, mode=mode, baseline=initial_value_threshold)
        filepath = os.fspath(filepath) if isinstance(filepath, os.PathLike) else filepath
        if not isinstance(filepath, str) or not filepath.endswith(EXTENSIONS):
            raise ValueError(
                "ModelCheckpoint: the filepath provided must end in `.pt` or `.pth` (a file "
                "written with torch.save); change its extension, e.g. "
                f"'{_suggest(filepath)}'. Received: filepath={filepath}"
            )
        if save_freq != "epoch" and (
            not isinstance(save_freq, numbers.Integral) or isinstance(save_freq, bool) or save_freq < 1
        ):
            raise ValueError(
                f"Unrecognized save_freq: {save_freq}. Expected save_freq are 'epoch' or integer "
                "values (a number of batches >= 1)"
            )
        if max_to_keep is not None and (
            not isinstance(max_to_keep, numbers.Integral) or isinstance(max_to_keep, bool) or max_to_keep < 1
        ):
            raise ValueError(
                f"ModelCheckpoint: max_to_keep must be None (keep every file) or an integer >= 1, "
                f"got {max_to_keep!r}"
            )
        self.filepath = filepath
        self.verbose = verbose
        self.save_best_only = bool(save_best_only)
        self.save_weights_only = bool(save_weights_only)
        self.save_freq = save_freq if save_freq == "epoch" else int(save_freq)
        self.initial_value_threshold = initial_value_threshold
        self.max_to_keep = None if max_to_keep is None else int(max_to_keep)
        if self.save_freq != "epoch":
            self.batch_sync_every = self.save_freq
        self._batches_seen_since_last_saving = 0
        self._last_batch_seen: int | None = None
        self._last_epoch_seen: int | None = None
        self._current_epoch: int | None = None
        #: Files written by this callback that are still kept: [{"filepath", "value"}], oldest first.
        self.kept: list[dict[str, Any]] = []

    # -- hooks -----------------------------------------------------------------------------
    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._current_epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> SaveModel | None:
        epoch = self._current_epoch if self._current_epoch is not None else self.trainer.epoch
        if self._should_save_on_batch(epoch, batch):
            return self._save_model(epoch=epoch, batch=batch, logs=logs)
        return None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> SaveModel | None:
        if self.monitor_op is None:
            self._set_monitor_op()
        if self.save_freq == "epoch":
            return self._save_model(epoch=epoch, batch=None, logs=logs)
        return None

    # -- decisions -------------------------------------------------------------------------
    def _batches_since_last_call(self, epoch: int, batch: int) -> int:
        """Batches trained since the previous batch-hook call (Keras counts 1 per call)."""
        last_epoch, last_batch = self._last_epoch_seen, self._last_batch_seen
        if last_batch is None or last_epoch is None:
            last_epoch, last_batch = 0, -1  # no call yet: count from the start of training
        if epoch == last_epoch and batch > last_batch:
            return batch - last_batch
        if epoch > last_epoch:
            steps = int(self.params.get("steps") or 0)
            if steps > 0:  # the rest of the earlier epoch and any whole epochs in between
                return max(steps - 1 - last_batch, 0) + (epoch - last_epoch - 1) * steps + batch + 1
        # A new epoch with unknown length, or going back (a new fit): Keras's "new epoch" rule.
        return batch + 1

    def _should_save_on_batch(self, epoch: int, batch: int) -> bool:
        if self.save_freq == "epoch":
            return False
        self._batches_seen_since_last_saving += self._batches_since_last_call(epoch, batch)
        self._last_epoch_seen, self._last_batch_seen = epoch, batch
        if self._batches_seen_since_last_saving >= self.save_freq:
            self._batches_seen_since_last_saving = 0
            return True
        return False

    def _should_save_model(self, epoch: int, logs: dict, filepath: str) -> tuple[bool, float | None]:
        """Keras 3.15's ``_should_save_model``; also returns the monitored value used to rank."""
        if not self.save_best_only:
            if self.verbose > 0:
                print(f"Epoch {epoch + 1}: saving model to {filepath}")
            return True, _as_float(logs.get(self.monitor))
        current = logs.get(self.monitor)
        if current is None:
            warnings.warn(f"Can save best model only with {self.monitor} available.", stacklevel=4)
            return True, None
        if len(getattr(current, "shape", ()) or ()) > 0:
            warnings.warn(
                "Can save best model only when `monitor` is a scalar value. "
                f"Received: {current}. Falling back to `save_best_only=False`.",
                stacklevel=4,
            )
            return True, None
        if self.monitor_op is None:
            self._set_monitor_op()
        best_str = "None" if self.best is None else f"{self.best:.5f}"
        if self._is_improvement(current, self.best):
            if self.verbose > 0:
                print(f"Epoch {epoch + 1}: {self.monitor} improved from {best_str} to {current:.5f}, "
                      f"saving model to {filepath}")
            self.best = current
            return True, _as_float(current)
        if self.verbose > 0:
            print(f"Epoch {epoch + 1}: {self.monitor} did not improve from {best_str}")
        return False, None

    def _save_model(self, epoch: int, batch: int | None, logs: dict | None) -> SaveModel | None:
        logs = logs or {}
        filepath = self._get_file_path(epoch, batch, logs)
        save, value = self._should_save_model(epoch, logs, filepath)
        if not save:
            return None
        return SaveModel(filepath=filepath, weights_only=self.save_weights_only,
                         delete=self._keep(filepath, value), source="ModelCheckpoint")

    def _get_file_path(self, epoch: int, batch: int | None, logs: dict) -> str:
        try:
            if batch is None or "batch" in logs:
                return self.filepath.format(epoch=epoch + 1, **logs)
            return self.filepath.format(epoch=epoch + 1, batch=batch + 1, **logs)
        except KeyError as e:
            raise KeyError(f'Failed to format this callback filepath: "{self.filepath}". Reason: {e}') from None

    def _keep(self, filepath: str, value: float | None) -> tuple[str, ...]:
        """Record the new file; return the kept files that it makes redundant (max_to_keep)."""
        self.kept = [k for k in self.kept if k["filepath"] != filepath]  # same name: replaced
        self.kept.append({"filepath": filepath, "value": value})
        if self.max_to_keep is None or len(self.kept) <= self.max_to_keep:
            return ()
        others = self.kept[:-1]
        if self.save_best_only:
            # Worst first: files without a (comparable) value, then by value; older first on ties.
            order = sorted(range(len(others)), key=lambda i: (self._rank(others[i]["value"]), i))
        else:
            order = list(range(len(others)))  # oldest first
        drop = set(order[: len(self.kept) - self.max_to_keep])
        deleted = tuple(others[i]["filepath"] for i in sorted(drop))
        self.kept = [k for i, k in enumerate(others) if i not in drop] + [self.kept[-1]]
        return deleted

    def _rank(self, value: float | None) -> tuple[int, float]:
        """Sort key: smaller means worse (deleted first)."""
        if value is None or math.isnan(value):
            return (0, 0.0)
        if self.monitor_op is None:
            self._set_monitor_op()
        better_is_lower = self.monitor_op(0.0, 1.0)
        return (1, -value if better_is_lower else value)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "kept": [dict(k) for k in self.kept],
            "batches_seen_since_last_saving": self._batches_seen_since_last_saving,
            "last_epoch_seen": self._last_epoch_seen,
            "last_batch_seen": self._last_batch_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best", self.best)
        self.kept = [dict(k) for k in state.get("kept", self.kept)]
        self._batches_seen_since_last_saving = int(
            state.get("batches_seen_since_last_saving", self._batches_seen_since_last_saving))
        self._last_epoch_seen = state.get("last_epoch_seen", self._last_epoch_seen)
        self._last_batch_seen = state.get("last_batch_seen", self._last_batch_seen)


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _suggest(filepath: Any) -> str:
    if not isinstance(filepath, str):
        return "checkpoint.pt"
    for ext in (".weights.h5", ".keras", ".h5", ".ckpt", ".pkl"):
        if filepath.endswith(ext):
            return filepath[: -len(ext)] + ".pt"
    return filepath + ".pt"
