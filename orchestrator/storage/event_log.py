"""The run's event log, ``events.jsonl``: writing it (:class:`EventLog`) and reading it back.

This module owns the event log's format and storage: one redacted JSON object a line, appended
to ``events.jsonl`` where files can be appended to, and written as numbered immutable parts
under ``events/`` (merged ``MERGE_FAN_IN`` at a time, up to a sealed level) on object stores;
and the one reader every consumer uses, :func:`read_event_log` (with file and line of each
event, and the damaged lines it skipped) and :func:`read_events`. The event types and their
fields are those of :mod:`orchestrator.core.events`; run.json lives in
:mod:`orchestrator.storage.run_files`.

Example:

```python
EventLog(storage, attempt=bump_attempt(storage)).append(EventType.STARTED, epoch=0)
[e["type"] for e in read_events(storage)]
```
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator.core.events import EventType, event_type, undeclared_fields
from orchestrator.core.redaction import json_default, redact, redact_values
from orchestrator.storage.fs import RunStorage

# Logged under the run files' module name, as before the event log had a module of its own.
log = logging.getLogger("orchestrator.storage.run_files")

EVENTS_JSONL = "events.jsonl"
#: Where the event log lives on filesystems without append (object stores): numbered parts.
EVENT_PARTS_DIR = "events"
#: How many parts of one level are merged into one part of the next level.
MERGE_FAN_IN = 32
#: Parts of this level (``MERGE_FAN_IN ** 2`` flushes each) are never merged again.
SEALED_LEVEL = 2

_RESERVED_EVENT_KEYS = ("time", "attempt", "epoch", "step", "type", "owner")
_PART_NAME = re.compile(r"^(\d+)-(\d+)\.jsonl$")


@dataclass(frozen=True)
class _Part:
    """One immutable object of the event log: the lines of flushes ``first`` to ``last``."""

    first: int
    last: int

    @property
    def name(self) -> str:
        return f"{self.first:010d}-{self.last:010d}.jsonl"

    @property
    def path(self) -> str:
        return f"{EVENT_PARTS_DIR}/{self.name}"

    @property
    def level(self) -> int:
        """0 for one flush, k for ``MERGE_FAN_IN ** k`` flushes; anything else counts as sealed."""
        span, level = self.last - self.first + 1, 0
        while span > 1 and span % MERGE_FAN_IN == 0 and level < SEALED_LEVEL:
            span //= MERGE_FAN_IN
            level += 1
        return level if span == 1 else SEALED_LEVEL

    def covers(self, other: "_Part") -> bool:
        return self.first <= other.first and other.last <= self.last


def _list_parts(storage: RunStorage) -> tuple[list[_Part], list[_Part]]:
    """The parts of the event log in order, and those covered by a merged part (left by a crash)."""
    parts = []
    for name in storage.listdir(EVENT_PARTS_DIR):
        match = _PART_NAME.match(name)
        if match and int(match.group(1)) <= int(match.group(2)):
            parts.append(_Part(int(match.group(1)), int(match.group(2))))
    parts.sort(key=lambda p: (p.first, -p.last))
    live: list[_Part] = []
    covered: list[_Part] = []
    for part in parts:
        if live and live[-1].covers(part):
            covered.append(part)
        else:
            live.append(part)
    return live, covered


class EventLog:
    """``events.jsonl`` in the run directory: one JSON object a line.

    Each line has ``time`` (Unix seconds), ``attempt``, ``epoch``, ``step``, ``type`` and the
    event's own fields; string values are redacted. Where files can be appended to (local
    directories) each :meth:`flush` appends its lines to ``events.jsonl``.

    Object stores have no append, and rewriting one object on every event costs O(n²) bytes. There
    each flush writes one new immutable part, ``events/<first>-<last>.jsonl`` (numbered by flush);
    when ``MERGE_FAN_IN`` (32) parts of one level follow each other they are merged into one part
    of the next level and deleted; level-2 parts (1024 flushes) are never merged again. Every line
    is thus uploaded at most three times (O(n) bytes), at most 62 unmerged parts exist besides the
    level-2 ones, and the log keeps in memory only the pending lines and the unmerged parts of
    its own flushes (at most 31). A crash between a merge and the deletion of its inputs leaves
    parts that the merged one covers: readers skip them and the next EventLog deletes them.
    :func:`read_event_log` returns ``events.jsonl`` (written by older versions or locally) followed by the
    parts in order. Use one EventLog per run at a time (the driver).

    Args:
        storage: The run's storage.
        attempt: The attempt number written on every line (see :func:`bump_attempt`).
        autoflush: Flush after every :meth:`append`. Defaults to ``True``.
        token: The writer's run-lease token, written on every line as ``owner`` (which driver's
            attempt wrote it). Defaults to ``None`` (not written).
    """

    def __init__(self, storage: RunStorage, attempt: int, *, autoflush: bool = True,
                 token: int | None = None) -> None:
        self.storage = storage
        self.attempt = attempt
        self.token = token
        self.autoflush = autoflush
        self._lock = threading.Lock()
        self._pending: list[str] = []
        live, covered = _list_parts(storage)
        # Locally, append to events.jsonl unless the directory already holds parts (copied from
        # an object store): new lines must come after them.
        self._append_mode = storage.is_local and not live
        self._checked_newline = False
        # Parts after the last sealed one (levels below SEALED_LEVEL), oldest first.
        sealed = [i for i, p in enumerate(live) if p.level >= SEALED_LEVEL]
        self._open: list[_Part] = live[sealed[-1] + 1:] if sealed else list(live)
        self._next = live[-1].last + 1 if live else 1
        self._cache: dict[str, bytes] = {}  # level-0 parts written by this log, until merged
        if covered:  # left by a crash between a merge and its deletes
            try:
                storage.rm_files([p.path for p in covered])
            except Exception as exc:  # noqa: BLE001 - readers skip covered parts anyway
                log.warning("%s", storage._redact(f"could not delete parts covered by merged ones: {exc}"))

    def buffered_bytes(self) -> int:
        """Bytes of event lines this log holds in memory (pending lines and unmerged parts of its own)."""
        with self._lock:
            return sum(len(line) + 1 for line in self._pending) + sum(len(d) for d in self._cache.values())

    def append(self, kind: EventType | str, epoch: int | None = None, step: int | None = None,
               **fields: Any) -> dict:
        """Record one event; returns the dict written.

        Args:
            kind: The event's type: an :class:`~orchestrator.core.events.EventType` (its string
                value is accepted too).
            epoch: The 0-based epoch it belongs to, if any.
            step: The step it belongs to, if any.
            **fields: The event's own fields (see ``EventType.<X>.fields``). Fields named like a
                common key are dropped; undeclared ones are written but logged.

        Raises:
            ValueError: ``kind`` is not a type of the event vocabulary.
        """
        member = event_type(kind)
        if member is None:
            raise ValueError(f"unknown event type {kind!r}; the types are those of "
                             f"orchestrator.core.events.EventType: {', '.join(t.value for t in EventType)}")
        clash = sorted(k for k in fields if k in _RESERVED_EVENT_KEYS)
        if clash:
            log.warning("event %r: fields %s clash with the common keys and are dropped", member.value, clash)
        undeclared = undeclared_fields(member, fields)
        if undeclared:
            log.warning("event %r: fields %s are not declared in orchestrator.core.events", member.value, undeclared)
        record = {"time": round(time.time(), 3), "attempt": self.attempt, "epoch": epoch,
                  "step": step, "type": member.value}
        if self.token is not None:
            record["owner"] = self.token
        extra = {k: v for k, v in fields.items() if k not in _RESERVED_EVENT_KEYS}
        record.update(redact_values(extra, self.storage.spec.options))
        line = json.dumps(record, default=json_default)
        line = redact(line, self.storage.spec.options)
        with self._lock:
            self._pending.append(line)
        if self.autoflush:
            self.flush()
        return json.loads(line)

    def flush(self) -> None:
        """Write pending lines: append them locally; elsewhere write them as a new part (and merge parts)."""
        with self._lock:
            if not self._pending:
                return
            pending, self._pending = self._pending, []
            data = "".join(line + "\n" for line in pending).encode()
            try:
                if self._append_mode:
                    self._append_local(data)
                else:
                    self._write_part(data)
            except BaseException:
                self._pending = pending + self._pending
                raise
            if not self._append_mode:
                try:
                    self._merge()
                except Exception as exc:  # noqa: BLE001 - the lines are durable; merge at the next flush
                    log.warning("%s", self.storage._redact(
                        f"merging the event log's parts under {self.storage.url(EVENT_PARTS_DIR)} failed "
                        f"({type(exc).__name__}: {exc}); retried at the next flush"))

    def _append_local(self, data: bytes) -> None:
        path = self.storage._fs_path(EVENTS_JSONL)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "ab") as f:
            if not self._checked_newline:  # a line torn by a crash must not swallow the next one
                if f.tell() > 0:
                    with open(path, "rb") as r:
                        r.seek(-1, os.SEEK_END)
                        if r.read(1) != b"\n":
                            data = b"\n" + data
                self._checked_newline = True
            f.write(data)
            f.flush()

    def _write_part(self, data: bytes) -> None:
        part = _Part(self._next, self._next)
        self.storage.write_bytes(part.path, data)  # a retried flush rewrites the same part, with more lines
        self._next += 1
        self._open.append(part)
        self._cache[part.name] = data
        while len(self._cache) > 2 * MERGE_FAN_IN:  # merges keep failing: read those back later
            self._cache.pop(next(iter(self._cache)))

    def _merge(self) -> None:
        """Merge the oldest ``MERGE_FAN_IN`` consecutive unmerged parts of one level, while there are some."""
        while (start := self._mergeable()) is not None:
            run = self._open[start:start + MERGE_FAN_IN]
            missing = [p.path for p in run if p.name not in self._cache]
            fetched = self.storage.read_many(missing) if missing else {}
            chunks = []
            for p in run:
                data = self._cache.get(p.name, fetched.get(p.path))
                if data is None:
                    raise FileNotFoundError(f"{self.storage.url(p.path)} vanished before it was merged")
                chunks.append(data if data.endswith(b"\n") or not data else data + b"\n")
            merged = _Part(run[0].first, run[-1].last)
            self.storage.write_bytes(merged.path, b"".join(chunks))
            if merged.level >= SEALED_LEVEL:  # what came before a sealed part can merge with nothing
                dropped = self._open[:start + MERGE_FAN_IN]
                self._open = self._open[start + MERGE_FAN_IN:]
            else:
                dropped = run
                self._open[start:start + MERGE_FAN_IN] = [merged]
            for p in dropped:
                self._cache.pop(p.name, None)
            self.storage.rm_files([p.path for p in run])  # a leftover is covered by the merged part

    def _mergeable(self) -> int | None:
        """Where the oldest run of ``MERGE_FAN_IN`` consecutive parts of one level (below sealed) starts."""
        for start in range(len(self._open) - MERGE_FAN_IN + 1):
            run = self._open[start:start + MERGE_FAN_IN]
            level = run[0].level
            if level < SEALED_LEVEL and all(p.level == level for p in run) and all(
                    b.first == a.last + 1 for a, b in zip(run, run[1:])):
                return start
        return None


@dataclass(frozen=True)
class EventRecord:
    """One event as read back, with where it was read (for messages)."""

    source: str  #: the URL of the file (``events.jsonl`` or a part), redacted
    line: int  #: 1-based line number in that file
    event: dict


@dataclass
class EventLogContents:
    """What :func:`read_event_log` found: the events in order, and one line per damaged place."""

    records: list[EventRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def events(self) -> list[dict]:
        return [r.event for r in self.records]


def _parse_lines(source: str, data: bytes, out: EventLogContents, *, may_tear: bool) -> None:
    text = data.decode("utf-8", "replace")
    lines = text.split("\n")
    torn = may_tear and not text.endswith("\n") and bool(lines[-1].strip())
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            if torn and number == len(lines):  # the last write of a crashed (or still writing) run
                log.info("%s line %d is incomplete (a write in progress or cut off); skipped", source, number)
                continue
            out.problems.append(f"{source} line {number}: not JSON ({exc.msg} at column {exc.colno}); skipped")
            continue
        if not isinstance(event, dict):
            out.problems.append(f"{source} line {number}: not a JSON object (a {type(event).__name__}); skipped")
            continue
        out.records.append(EventRecord(source, number, event))


def read_event_log(storage: RunStorage) -> EventLogContents:
    """Every event of the run, oldest first, with file and line; the one function every reader uses.

    Reads ``events.jsonl`` then the parts under ``events/`` (see :class:`EventLog`). An incomplete
    last line of ``events.jsonl`` (a write cut off or in progress) is skipped silently; any other line
    that is not a JSON object is skipped and named in ``problems``.

    Raises:
        OSError, PermissionError: The storage cannot be read (redacted, naming the URL).
    """
    for _ in range(3):  # a part merged away between the listing and the read: list again
        live, _covered = _list_parts(storage)
        paths = [EVENTS_JSONL] + [p.path for p in live]
        contents = storage.read_many(paths)
        if all(contents[p.path] is not None for p in live):
            break
    else:
        raise FileNotFoundError(storage._redact(
            f"parts of the event log under {storage.url(EVENT_PARTS_DIR)} keep vanishing while being read; "
            "is another process merging them? Try again"))
    out = EventLogContents()
    for path in paths:
        data = contents[path]
        if data:
            _parse_lines(storage.url(path), data, out, may_tear=path == EVENTS_JSONL)
    return out


def read_events(storage: RunStorage) -> list[dict]:
    """All events of the run, oldest first; ``[]`` if there are none (see :func:`read_event_log`).

    A line that is not a JSON object is skipped with a warning naming the file and line.
    """
    found = read_event_log(storage)
    for problem in found.problems:
        log.warning("%s", storage._redact(problem))
    return found.events
