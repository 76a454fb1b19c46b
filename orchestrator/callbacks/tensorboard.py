"""Write TensorBoard event files (Keras 3 ``TensorBoard``) once for the cluster, through fsspec."""

from __future__ import annotations

import numbers
import os
import posixpath
import time
import warnings
from typing import Any, ClassVar

from orchestrator.callbacks.base import Callback
from orchestrator.decisions import WriteHistograms
from orchestrator.storage.tb_events import EventFiles, require_tensorboard, scalar_event

#: The run folders under ``log_dir``, as Keras names them.
TRAIN, VALIDATION = "train", "validation"
RUNS = (TRAIN, VALIDATION)


class TensorBoard(Callback):
    """Write the cluster-wide losses and metrics as TensorBoard event files.

    Runs once for the whole cluster, on the coordinator, on aggregated logs, and writes through the
    run's storage: a relative ``log_dir`` lands under ``<run>/logs/`` (the default ``"logs"`` is
    ``<run>/logs/`` itself; a leading ``logs/`` is not doubled), an fsspec URL (``s3://...``) on the
    run's filesystem is written as is. Point TensorBoard at it: ``tensorboard --logdir <run>/logs``
    (TensorBoard reads ``s3://`` too).

    What is written follows Keras 3.15, with its tag names:

    - At each epoch end, step = the 0-based epoch: in ``<log_dir>/train/``, ``epoch_<name>`` for
      every training log (``epoch_loss``, ``epoch_accuracy``, ``epoch_learning_rate``, ...); in
      ``<log_dir>/validation/``, ``epoch_<name>`` for every ``val_<name>`` log (prefix stripped).
    - After each validation, in ``validation/``: ``evaluation_<name>_vs_iterations`` at step = the
      optimizer steps taken so far, as Keras writes them from ``on_test_end``.
    - With an integer ``update_freq`` (or ``"batch"``, i.e. 1): ``batch_<name>`` in ``train/`` every
      ``update_freq`` optimizer steps (counted from the start of training, 1-based as Keras counts
      them), tagged by that step count; the values are the cluster-wide running averages of the
      epoch so far, as Keras logs them. The callback sets ``batch_sync_every = update_freq``, so
      batch hooks run exactly there.
    - ``write_steps_per_second``: ``epoch_steps_per_second`` (steps of the epoch over the time from
      its start to its end on the coordinator) and, with batch logging, ``batch_steps_per_second``
      (steps since the previous batch write over the time between them).
    - ``histogram_freq``: every ``histogram_freq`` epochs (epochs 0, f, 2f, ...), a histogram of each
      model parameter in ``train/``, tagged ``<parameter name>/histogram``, step = epoch. Only the
      ranks hold the weights: the callback returns a
      :class:`~orchestrator.decisions.WriteHistograms` decision naming the file, and rank 0
      computes the histograms (30 equal buckets over [min, max], with torch, on the device) and
      writes the file in a background thread; training waits only for the computation.

    Files: object stores have no append, so each flush writes a new small event file
    (``events.out.tfevents.<index>.<run_name>``) whose name sorts after every earlier one; batch
    values are flushed at epoch ends and at least every ``flush_interval_s`` seconds.

    Resumes and rollbacks: the callback's state (saved in every backup) lists the files written
    up to that backup and the values not yet flushed. After a restore (a worker failure, a
    resubmission or a ``RollbackOnNaN`` rollback) the files this run wrote after that backup are
    deleted before anything new is written, and the replayed epochs and steps are written again,
    so each tag holds exactly one value per step, the replay's, for any reader that loads the
    files afresh. A TensorBoard already watching shows the replay's values too when it reads
    through its default (Rust) data server (local and ``gs://`` log dirs), which replaces a tag's
    values from a step on when a later file goes back to that step; its Python loader (``s3://``
    log dirs, ``--load_fast=false``) keeps what it had read until TensorBoard is restarted.
    TensorBoard's ``SessionLog.START`` purge is not used: it drops every tag from a step on, which
    would delete valid values in a run folder that mixes epoch and global-step units, as Keras's
    ``train/`` (``epoch_*`` and ``batch_*``) and ``validation/`` do.

    Not supported: ``write_images``, ``profile_batch`` and ``embeddings_freq`` other than off raise
    ValueError (images and embeddings of the weights are not written; profiling is TensorFlow/JAX
    only in Keras too). ``write_graph`` is accepted and ignored, as in Keras 3 ("Not supported at
    this time"), so the default construction works.

    Args:
        log_dir: Where to write: a path (relative: under ``<run>/logs/``) or an fsspec URL on the
            run's filesystem. It should not be shared with another TensorBoard callback of the same
            run. Defaults to ``"logs"``.
        histogram_freq: Epochs between weight histograms; ``0`` for none. Defaults to ``0``.
        write_graph: Accepted for Keras compatibility and ignored. Defaults to ``True``.
        write_images: Must be ``False``. Defaults to ``False``.
        write_steps_per_second: Also log steps per second (see above). Defaults to ``False``.
        update_freq: ``"epoch"``, ``"batch"`` (= 1) or an integer ``>= 1``: steps between batch
            writes. Defaults to ``"epoch"``.
        profile_batch: Must be ``0`` (profiling is TensorFlow/JAX only in Keras too). Defaults to ``0``.
        embeddings_freq: Must be ``0``. Defaults to ``0``.
        embeddings_metadata: Must be ``None``. Defaults to ``None``.

    Raises:
        ImportError: tensorboard is not installed (``pip install "orchestrator[tensorboard]"``).
        ValueError: an argument is out of range or not supported, naming it.

    Example:
        >>> board = TensorBoard(update_freq=50, write_steps_per_second=True)
        >>> board.batch_sync_every
        50
        >>> # Trainer(..., callbacks=[board]).fit(epochs=10) writes <run>/logs/train/ and
        >>> # <run>/logs/validation/; then: tensorboard --logdir <storage>/<run_name>/logs
    """

    #: Longest time batch values wait in memory before they are written (they are also written at
    #: every epoch end and at the end of training).
    flush_interval_s: ClassVar[float] = 10.0

    def __init__(self, log_dir: str | os.PathLike = "logs", histogram_freq: int = 0, write_graph: bool = True,
                 write_images: bool = False, write_steps_per_second: bool = False, update_freq: int | str = "epoch",
                 profile_batch: int = 0, embeddings_freq: int = 0, embeddings_metadata: Any = None) -> None:
        super().__init__()
        require_tensorboard("callbacks.TensorBoard")
        self.log_dir = _checked_log_dir(log_dir)
        self.histogram_freq = _non_negative_int("histogram_freq", histogram_freq)
        self.write_graph = _flag("write_graph", write_graph)
        self.write_images = _flag("write_images", write_images)
        if self.write_images:
            raise ValueError("TensorBoard(write_images=True) is not supported: the weights live on the ranks, not "
                             "where this callback runs; use write_images=False")
        self.write_steps_per_second = _flag("write_steps_per_second", write_steps_per_second)
        self.update_freq: int | str = _checked_update_freq(update_freq)
        self.batch_sync_every = None if self.update_freq == "epoch" else int(self.update_freq)
        if profile_batch:
            raise ValueError(f"TensorBoard(profile_batch={profile_batch!r}) is not supported: profiling is not "
                             "available with torch (Keras raises too); use profile_batch=0")
        self.profile_batch = 0
        if _non_negative_int("embeddings_freq", embeddings_freq):
            raise ValueError(f"TensorBoard(embeddings_freq={embeddings_freq!r}) is not supported: embeddings are "
                             "not written by this callback; use embeddings_freq=0")
        self.embeddings_freq = 0
        if embeddings_metadata is not None:
            raise ValueError("TensorBoard(embeddings_metadata=...) is not supported (embeddings are not written); "
                             "leave it None")
        self.embeddings_metadata = None
        self._reset()

    # -- per-attempt state ---------------------------------------------------------------
    def _reset(self) -> None:
        self._files: list[list[int]] = []  # [first, last] index ranges of this run's valid files
        self._pending: list[dict[str, Any]] = []  # values not yet in a file, in write order
        self._session = False  # whether this attempt (or this replay) has cleaned up and numbered its files
        self._next = 1
        self._events: EventFiles | None = None
        now = time.monotonic()
        self._last_flush = now
        self._epoch_start = (now, self.trainer.global_step)
        self._last_batch = (now, self.trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"files": [list(r) for r in self._files], "pending": [dict(p) for p in self._pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the files and values of a backup; the next hook deletes the files written after it."""
        self._files = [[int(a), int(b)] for a, b in state.get("files", [])]
        self._pending = [dict(p) for p in state.get("pending", [])]
        self._session = False
        now = time.monotonic()
        self._epoch_start = self._last_batch = (now, self.trainer.global_step)

    # -- hooks -------------------------------------------------------------------------------
    def on_train_begin(self, logs: dict | None = None) -> None:
        self._reset()
        self._event_files()  # a clear error now if log_dir is on another filesystem

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._open_session()
        self._epoch_start = (time.monotonic(), self.trainer.global_step)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.update_freq == "epoch":
            return
        step = self.trainer.global_step
        if step <= 0 or step % int(self.update_freq):
            return  # a sync point another callback (or a non-finite loss) asked for
        self._open_session()
        values = {f"batch_{k}": v for k, v in _numbers(logs).items()}
        now = time.monotonic()
        if self.write_steps_per_second:
            values["batch_steps_per_second"] = _rate(step - self._last_batch[1], now - self._last_batch[0])
        self._last_batch = (now, step)
        self._add(TRAIN, step, values)
        if now - self._last_flush >= self.flush_interval_s:
            self._flush()

    def on_test_end(self, logs: dict | None = None) -> None:
        self._open_session()
        values = {f"evaluation_{k}_vs_iterations": v for k, v in _numbers(logs).items()}
        self._add(VALIDATION, self.trainer.global_step, values)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> WriteHistograms | None:
        self._open_session()
        values = _numbers(logs)
        train = {f"epoch_{k}": v for k, v in values.items() if not k.startswith("val_")}
        if self.write_steps_per_second:
            started, first_step = self._epoch_start
            train["epoch_steps_per_second"] = _rate(self.trainer.global_step - first_step,
                                                    time.monotonic() - started)
        self._add(TRAIN, epoch, train)
        self._add(VALIDATION, epoch, {f"epoch_{k[len('val_'):]}": v for k, v in values.items()
                                      if k.startswith("val_")})
        self._flush()
        if self.histogram_freq and epoch % self.histogram_freq == 0:  # a file of its own, after the scalars
            path = self._event_files().path(TRAIN, self._allocate())
            return WriteHistograms(filepath=path, step=epoch, source=self.name)
        return None

    def on_train_end(self, logs: dict | None = None) -> None:
        self._open_session()
        self._flush()

    # -- files -----------------------------------------------------------------------------
    def _event_files(self) -> EventFiles:
        if self._events is None:
            if self.storage is None:
                raise RuntimeError("TensorBoard writes through the run's storage, and this run has none; "
                                   "give Trainer a storage (any fsspec URL)")
            self._events = EventFiles(self.storage, _under_logs(self.log_dir), owner=self.storage.spec.run_name)
            self._events.url()  # ValueError: another filesystem, or escapes the run directory
        return self._events

    def _open_session(self) -> None:
        """Once per attempt and after each rollback: delete this run's files that no saved state
        knows of (written after the backup being resumed, or by an attempt that never backed up),
        and number new files after every existing one."""
        if self._session:
            return
        events = self._event_files()
        try:
            found = events.existing(RUNS)
        except OSError as exc:
            warnings.warn(f"TensorBoard could not list {events.url()}: {exc}; files written after the backup "
                          "being resumed may still show", RuntimeWarning, stacklevel=2)
            found = {}
        orphans = sorted(p for p, i in found.items() if not any(a <= i <= b for a, b in self._files))
        if orphans:
            try:
                events.remove(orphans)
            except OSError as exc:
                warnings.warn(f"TensorBoard could not delete {len(orphans)} stale event files under {events.url()} "
                              f"({exc}); TensorBoard may show values of steps replayed since", RuntimeWarning,
                              stacklevel=2)
        self._next = max([*found.values(), *(b for _, b in self._files), 0]) + 1
        self._session = True

    def _add(self, run: str, step: int, values: dict[str, float]) -> None:
        if values:
            self._pending.append({"run": run, "step": int(step), "time": time.time(), "values": values})

    def _flush(self) -> None:
        """Write the pending values, one new file per run folder; on failure keep them for the next flush."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        events = self._event_files()
        for run in RUNS:
            records = [p for p in self._pending if p["run"] == run]
            if not records:
                continue
            index = self._allocate()
            try:
                events.write(run, index, [scalar_event(p["step"], p["time"], p["values"]) for p in records],
                             wall_time=records[0]["time"])
            except OSError as exc:
                warnings.warn(f"TensorBoard could not write {events.url(run)} ({exc}); its values are kept and "
                              "written with the next flush", RuntimeWarning, stacklevel=2)
                continue
            self._pending = [p for p in self._pending if p["run"] != run]

    def _allocate(self) -> int:
        """The next file index; the ranges in the state (saved with each backup) record it."""
        index, self._next = self._next, self._next + 1
        if self._files and self._files[-1][1] == index - 1:
            self._files[-1][1] = index
        else:
            self._files.append([index, index])
        return index


# -- argument checks ---------------------------------------------------------------------------

def _checked_log_dir(log_dir: Any) -> str:
    if not isinstance(log_dir, (str, os.PathLike)):
        raise ValueError(f"TensorBoard(log_dir=...) must be a path or an fsspec URL string, got "
                         f"{type(log_dir).__name__}")
    path = os.fspath(log_dir)
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"TensorBoard(log_dir={log_dir!r}) must be a non-empty path or fsspec URL")
    if "://" not in path and not os.path.isabs(path):
        norm = _under_logs(path)
        if norm != "logs" and not norm.startswith("logs/"):
            raise ValueError(f"TensorBoard(log_dir={path!r}) leaves <run>/logs/; relative paths land under "
                             "<run>/logs/ (use an absolute path or URL for another place)")
    return path


def _under_logs(path: str) -> str:
    """Relative log dirs under ``logs/`` (``"logs"`` itself not doubled); URLs and absolute paths as given."""
    if "://" in path or os.path.isabs(path):
        return path
    norm = posixpath.normpath(path.replace("\\", "/"))
    return norm if norm == "logs" or norm.startswith("logs/") else posixpath.normpath(posixpath.join("logs", norm))


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"TensorBoard({name}={value!r}) must be an integer >= 0")
    return int(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"TensorBoard({name}={value!r}) must be True or False")
    return value


def _checked_update_freq(value: Any) -> int | str:
    if value == "batch":
        return 1
    if value == "epoch":
        return "epoch"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"TensorBoard(update_freq={value!r}) must be 'epoch', 'batch' or an integer >= 1 "
                         "(optimizer steps between batch writes)")
    return int(value)


def _numbers(logs: dict | None) -> dict[str, float]:
    return {str(k): float(v) for k, v in (logs or {}).items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool)}


def _rate(steps: int, seconds: float) -> float:
    return steps / seconds if seconds > 0 else 0.0

