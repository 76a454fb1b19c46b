"""Write each epoch's cluster-wide logs to a CSV file (Keras 3 ``CSVLogger``), continuous across restarts."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import posixpath
import warnings
from collections.abc import Iterable
from typing import Any

from orchestrator.callbacks.base import Callback

#: Where a relative ``filename`` lands, under the run directory.
LOGS_DIR = "logs"


class CSVLogger(Callback):
    """Write one CSV row per epoch with the cluster-wide logs.

    Runs once for the whole cluster, on the coordinator, on the aggregated logs. The format is
    Keras 3.15's: the first column is ``epoch`` (0-based), then the keys of the first epoch's
    logs, sorted; the header is fixed at the first epoch written, a key missing from a later
    epoch's logs is written as ``NA`` and a key that appears later is ignored. As in Keras 3.15,
    when the first epoch's logs hold no ``val_`` key, a ``val_<key>`` column is added for every
    key (it reads ``NA`` until validation runs, e.g. with ``validation_freq > 1``). Values are
    written as Keras writes them: strings as is, iterables as ``"[a, b]"``, numbers with
    ``str()``; rows end with ``\\r\\n`` (the ``csv`` module's excel dialect).

    Where the file goes: a relative ``filename`` lands under ``<run>/logs/``; an absolute
    fsspec URL (``s3://bucket/x.csv``, ``file:///tmp/x.csv``) or an absolute local path is used
    as is, on the run's filesystem and with its ``storage_options``. Without a run storage (unit
    tests) ``filename`` is written as given, with fsspec.

    Object stores cannot append, so the rows live in the callback's state (one short line per
    epoch, saved in every backup) and the whole file is rewritten at each epoch end (locally
    through a temporary file and a rename, on object stores with one PUT). So the file is
    continuous across failures: after a restart from a backup, a resubmission or a rollback
    (``RollbackOnNaN``) it holds each epoch once, in order, with the logs of the run that
    counted; rows of replayed epochs replace the earlier ones. A write that fails warns and is
    retried at the next epoch end (training goes on).

    ``append=True`` keeps what the file held when the *run* began and writes this run's rows
    after it (the header only if the file was empty). A later attempt of the same run (a restart
    without a backup, a resubmission with the same ``run_name``) must not take the failed
    attempt's rows for earlier content: the first attempt saves the file's content at its start
    beside it in the run directory (``<run>/logs/.csv_logger-<hash>.base``) and every later
    attempt of the run starts from that copy. A new run (another ``run_name``) appends to the
    file as it finds it.

    Args:
        filename: Path or fsspec URL of the CSV file, e.g. ``"training.csv"`` (written to
            ``<run>/logs/training.csv``).
        separator: The one character that separates the values of a row. Defaults to ``","``.
        append: ``True``: keep the file's content and add this run's rows after it (useful when
            continuing training in a new run). ``False``: overwrite the file. Defaults to ``False``.

    Example:
        >>> logger = CSVLogger("training.csv", separator=";")
        >>> # Trainer(..., callbacks=[logger]).fit(epochs=10) writes <run>/logs/training.csv:
        >>> # epoch;learning_rate;loss;val_loss
        >>> # 0;0.1;0.693...;0.690...
    """

    def __init__(self, filename: str | os.PathLike, separator: str = ",", append: bool = False) -> None:
        super().__init__()
        filename = os.fspath(filename) if isinstance(filename, os.PathLike) else filename
        if not isinstance(filename, str) or not filename.strip():
            raise ValueError(f"CSVLogger: filename must be a non-empty path or URL, e.g. 'training.csv', "
                             f"got {filename!r}")
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"CSVLogger: separator must be one character (the csv module writes one "
                             f"delimiter), e.g. ',' or ';' or '\\t', got {separator!r}")
        if separator in ('"', "\r", "\n"):
            raise ValueError(f"CSVLogger: separator {separator!r} cannot separate CSV values (it quotes or "
                             "ends rows); use ',' or ';' or '\\t'")
        if not isinstance(append, bool):
            raise ValueError(f"CSVLogger: append must be True or False, got {append!r}")
        self.filename = filename
        self.sep = separator
        self.append = append
        self.target = _target(filename)
        #: The columns after ``epoch``, fixed at the first epoch written; None before it.
        self.keys: list[str] | None = None
        #: This run's rows, ``(epoch, line)`` in epoch order; each line is formatted and terminated.
        self.rows: list[tuple[int, str]] = []
        self._base = b""  # what the file held when the run began (append=True), written before our rows
        self._open = False  # between on_train_begin and on_train_end
        self._dirty = False  # the file does not hold what the state says yet

    # -- state (saved in backups) ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"keys": None if self.keys is None else list(self.keys),
                "rows": [[epoch, line] for epoch, line in self.rows]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the rows of a backup (a resume or a rollback) and, during training, rewrite the file."""
        keys = state.get("keys")
        self.keys = None if keys is None else [str(k) for k in keys]
        self.rows = [(int(epoch), str(line)) for epoch, line in state.get("rows", [])]
        self._dirty = True
        if self._open:
            self._flush()

    # -- hooks -----------------------------------------------------------------------------
    def on_train_begin(self, logs: dict | None = None) -> None:
        self.keys, self.rows = None, []
        if self.storage is not None:
            try:  # a URL on another filesystem than the run's fails now, naming both
                self.storage.resolve(self.target)
            except ValueError as exc:
                raise ValueError(f"CSVLogger: filename cannot be written: {exc}") from None
        self._base = self._read_base() if self.append else b""
        self._open, self._dirty = True, True  # written at the next hook (a resume's state comes first)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self._dirty:
            self._flush()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        if self.keys is None:
            self.keys = sorted(logs)
            if self.keys and not any(k.startswith("val_") for k in self.keys):
                self.keys.extend(f"val_{k}" for k in list(self.keys))  # Keras 3.15
        row = {"epoch": epoch, **{k: _format(logs.get(k, "NA")) for k in self.keys}}
        line = self._render(lambda writer: writer.writerow(row))
        self.rows = [r for r in self.rows if r[0] < epoch] + [(epoch, line)]  # a replayed epoch replaces its row
        self._flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._dirty:
            self._flush()
        self._open = False

    # -- the file --------------------------------------------------------------------------
    def content(self) -> bytes:
        """The file as the state says it should be: the earlier content, the header, this run's rows."""
        parts = [self._base]
        if self._base and not self._base.endswith(b"\n"):
            parts.append(b"\r\n")  # Keras would glue our first row to the last line
        if self.keys is not None:
            if not self._base:  # Keras writes the header unless it appends to a non-empty file
                parts.append(self._render(lambda writer: writer.writeheader()).encode())
            parts.extend(line.encode() for _, line in self.rows)
        return b"".join(parts)

    def _render(self, write: Any) -> str:
        out = io.StringIO()
        dialect = type("CSVLoggerDialect", (csv.excel,), {"delimiter": self.sep})
        write(csv.DictWriter(out, fieldnames=["epoch", *(self.keys or [])], dialect=dialect))
        return out.getvalue()

    def _flush(self) -> None:
        try:
            self._write(self.target, self.content())
        except OSError as exc:
            self._dirty = True
            warnings.warn(f"CSVLogger could not write {self.filename!r} ({type(exc).__name__}: {exc}); it is "
                          "written whole again at the next epoch end", stacklevel=2)
            return
        self._dirty = False

    def _base_copy(self) -> str:
        digest = hashlib.sha256(self.target.encode()).hexdigest()[:16]
        return f"{LOGS_DIR}/.csv_logger-{digest}.base"

    def _read_base(self) -> bytes:
        """What the file held when the run began: saved by the run's first attempt, read by later ones."""
        if self.storage is None:
            return self._read(self.target) or b""
        copy = self._base_copy()
        saved = self._read(copy)
        if saved is not None:
            return saved
        base = self._read(self.target) or b""
        self.storage.write_bytes(copy, base)
        return base

    def _read(self, path: str) -> bytes | None:
        try:
            if self.storage is not None:
                return self.storage.read_bytes(path)
            import fsspec  # only without a run storage (unit tests)

            fs, fs_path = fsspec.core.url_to_fs(path)
            return fs.cat_file(fs_path)
        except FileNotFoundError:
            return None

    def _write(self, path: str, data: bytes) -> None:
        if self.storage is not None:
            self.storage.write_bytes(path, data)
            return
        import fsspec

        fs, fs_path = fsspec.core.url_to_fs(path)
        parent = posixpath.dirname(fs_path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(fs_path, data)


def _target(filename: str) -> str:
    """Where ``filename`` is written: URLs and absolute paths as is, relative paths under ``logs/``."""
    if "://" in filename or os.path.isabs(filename):
        return filename
    rel = posixpath.normpath(f"{LOGS_DIR}/{filename.replace(os.sep, '/')}")
    if rel == ".." or rel.startswith("../") or rel in (".", LOGS_DIR):
        raise ValueError(f"CSVLogger: filename {filename!r} must name a file inside the run directory "
                         "(relative paths land under <run>/logs/); use an absolute URL for another place")
    return rel


def _format(value: Any) -> Any:
    """A value as Keras's CSVLogger writes it: strings as is, iterables as '"[a, b]"', the rest with str()."""
    if isinstance(value, str):
        return value
    if isinstance(value, Iterable) and getattr(value, "ndim", None) != 0:
        return f'"[{", ".join(map(str, value))}]"'
    return value
