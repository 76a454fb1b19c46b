"""TensorBoard event files through fsspec: records, their framing and the files of one writer.

TensorBoard reads every ``events.out.tfevents.*`` file of a run folder in name order. Object stores
have no append, so a writer here never grows a file: each flush is a new, small, complete file whose
name sorts after every earlier one (:class:`EventFiles`). Every file starts with the
``file_version`` record (``brain.Event:2``), as TensorBoard's own writers do; records are
TensorBoard's ``Event`` protos (``tensorboard.compat.proto``) in the TFRecord framing (length,
masked CRC-32C of the length, data, masked CRC-32C of the data) that tensorboard's ``RecordWriter``
produces. Scalars use ``simple_value``; histograms ``HistogramProto``.

tensorboard is an optional dependency (``pip install "orchestrator[tensorboard]"``): it is imported on
first use, and :func:`require_tensorboard` says what to install when it is missing. No torch, no ray.

Example:

```python
files = EventFiles(storage, "logs", owner="digits")
files.write("train", 1, [scalar_event(0, time.time(), {"epoch_loss": 0.7})])
sorted(files.existing(["train"]).values())    # [1]
```
"""

from __future__ import annotations

import importlib
import io
import posixpath
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

#: The prefix TensorBoard recognises (it looks for "tfevents" in the name).
EVENT_FILE_PREFIX = "events.out.tfevents."
#: The file version TensorBoard's own writers record first in every file.
FILE_VERSION = "brain.Event:2"
#: Digits of the write index in a file name: names sort in write order.
INDEX_DIGITS = 10
INSTALL_HINT = 'pip install "orchestrator[tensorboard]"'


def require_tensorboard(what: str = "TensorBoard") -> None:
    """Raise ImportError naming the extra to install when tensorboard cannot be imported."""
    try:
        for module in ("tensorboard.compat.proto.event_pb2", "tensorboard.compat.proto.summary_pb2"):
            importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{what} needs the tensorboard package, which is not installed ({exc}); "
                          f"run `{INSTALL_HINT}`") from None


def _protos() -> tuple[Any, Any]:
    require_tensorboard()
    from tensorboard.compat.proto import event_pb2, summary_pb2

    return event_pb2, summary_pb2


@dataclass(frozen=True)
class Histogram:
    """One histogram, as TensorBoard's ``HistogramProto`` holds it.

    Args:
        min: The smallest value.
        max: The largest value.
        num: How many values.
        sum: Their sum.
        sum_squares: The sum of their squares.
        bucket_limit: Each bucket's upper edge, ascending (the first bucket starts at ``min``).
        bucket: How many values each bucket holds.
    """

    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    bucket_limit: tuple[float, ...]
    bucket: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.bucket_limit) != len(self.bucket):
            raise ValueError(f"a histogram needs one count per bucket limit, got {len(self.bucket)} counts "
                             f"for {len(self.bucket_limit)} limits")


def file_version_event(wall_time: float) -> bytes:
    """The first record of every event file."""
    event_pb2, _ = _protos()
    return event_pb2.Event(wall_time=wall_time, file_version=FILE_VERSION).SerializeToString()


def scalar_event(step: int, wall_time: float, values: Mapping[str, float]) -> bytes:
    """One ``Event`` holding a scalar (``simple_value``) per tag, at ``step``."""
    event_pb2, summary_pb2 = _protos()
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                                         for tag, value in values.items()])
    return event_pb2.Event(wall_time=wall_time, step=int(step), summary=summary).SerializeToString()


def histogram_event(step: int, wall_time: float, histograms: Mapping[str, Histogram]) -> bytes:
    """One ``Event`` holding a histogram (``histo``) per tag, at ``step``."""
    event_pb2, summary_pb2 = _protos()
    values = []
    for tag, h in histograms.items():
        proto = summary_pb2.HistogramProto(min=h.min, max=h.max, num=h.num, sum=h.sum, sum_squares=h.sum_squares,
                                           bucket_limit=list(h.bucket_limit), bucket=list(h.bucket))
        values.append(summary_pb2.Summary.Value(tag=tag, histo=proto))
    return event_pb2.Event(wall_time=wall_time, step=int(step),
                           summary=summary_pb2.Summary(value=values)).SerializeToString()


def frame(records: Iterable[bytes]) -> bytes:
    """The records in TensorBoard's TFRecord framing, as one file's bytes."""
    require_tensorboard()
    from tensorboard.summary.writer.record_writer import RecordWriter  # its CRC-32C; imported once, on first use

    buffer = io.BytesIO()
    writer = RecordWriter(buffer)
    for record in records:
        writer.write(record)
    return buffer.getvalue()


def event_file_name(index: int, owner: str) -> str:
    """``events.out.tfevents.<index, zero-padded>.<owner>``: names of one owner sort in write order.

    Example:
        >>> event_file_name(7, "digits")
        'events.out.tfevents.0000000007.digits'
    """
    if not isinstance(index, int) or index < 0 or index >= 10 ** INDEX_DIGITS:
        raise ValueError(f"an event file index must be an int in [0, 10**{INDEX_DIGITS}), got {index!r}")
    return f"{EVENT_FILE_PREFIX}{index:0{INDEX_DIGITS}d}.{owner}"


def event_file_index(name: str, owner: str) -> int | None:
    """The write index of one of ``owner``'s event files, or None for any other name.

    Example:
        >>> event_file_index("events.out.tfevents.0000000007.digits", "digits"), event_file_index("x", "digits")
        (7, None)
    """
    match = re.fullmatch(re.escape(EVENT_FILE_PREFIX) + rf"(\d{{{INDEX_DIGITS}}})\.(.+)", name)
    if match is None or match.group(2) != owner:
        return None
    return int(match.group(1))


class EventFiles:
    """One writer's event files under a log directory: ``<log_dir>/<run folder>/events.out.tfevents.*``.

    Every file is written whole (one PUT on object stores; locally a temporary file and a rename)
    and never appended to. Only names that carry this writer's ``owner`` count as its files, so
    several writers may share a log directory without touching each other's files.

    Args:
        storage: The run's :class:`~orchestrator.storage.fs.RunStorage`.
        log_dir: Path relative to the run directory, or a URL / absolute path on the same filesystem.
        owner: The last part of every file name (letters, digits, ``.``, ``_``, ``-``), e.g. the run name.
    """

    def __init__(self, storage: Any, log_dir: str, owner: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", owner or ""):
            raise ValueError(f"an event file owner must be letters, digits, '.', '_' or '-', got {owner!r}")
        self.storage = storage
        self.log_dir = log_dir
        self.owner = owner

    def path(self, run: str, index: int) -> str:
        """Where file ``index`` of run folder ``run`` goes (for :meth:`RunStorage.write_bytes`)."""
        return posixpath.join(self.log_dir, run, event_file_name(index, self.owner))

    def url(self, run: str = "") -> str:
        """Display URL (redacted) of the log directory, or of one of its run folders, for messages.

        Raises:
            ValueError: the log directory escapes the run directory or is on another filesystem.
        """
        return self.storage._redact(self.storage.resolve(posixpath.join(self.log_dir, run) if run else self.log_dir))

    def write(self, run: str, index: int, events: Sequence[bytes], wall_time: float | None = None) -> str:
        """Write a new file holding the file version record (at ``wall_time``, default now) and
        ``events``; return its path."""
        path = self.path(run, index)
        stamp = time.time() if wall_time is None else wall_time
        self.storage.write_bytes(path, frame([file_version_event(stamp), *events]))
        return path

    def existing(self, runs: Iterable[str]) -> dict[str, int]:
        """This writer's files in the given run folders: ``{path: index}``."""
        found: dict[str, int] = {}
        for run in runs:
            folder = posixpath.join(self.log_dir, run)
            for name in self.storage.listdir(folder):
                index = event_file_index(name, self.owner)
                if index is not None:
                    found[posixpath.join(folder, name)] = index
        return found

    def remove(self, paths: Sequence[str]) -> None:
        """Delete files (missing ones are ignored)."""
        if paths:
            self.storage.rm_files(list(paths))
