"""The run directory's bookkeeping files: ``events.jsonl``, ``run.json`` and visibility markers.

Example:

```python
storage = check_access(StorageSpec("s3://bucket/runs", "digits"))
write_run_json(storage, {"epochs": 3}, world_size=2)
EventLog(storage, attempt=bump_attempt(storage)).append(EventType.STARTED, epoch=0)
```
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
import uuid
from importlib import metadata
from typing import Any, Mapping

from orchestrator.core.events import EventType, event_type, undeclared_fields
from orchestrator.core.redaction import json_default, public_config, redact, redact_values
from orchestrator.storage.fs import RunStorage, StorageSpec

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
EVENTS_JSONL = "events.jsonl"

_RESERVED_EVENT_KEYS = ("time", "attempt", "epoch", "step", "type")


class EventLog:
    """``events.jsonl`` in the run directory: one JSON object a line.

    Each line has ``time`` (Unix seconds), ``attempt``, ``epoch``, ``step``, ``type`` and the
    event's own fields; string values are redacted. Locally lines are appended to the file; on
    other filesystems (object stores have no append) the lines are kept in memory, starting
    from the existing file so a resumed run continues it, and the whole object is rewritten on
    each :meth:`flush`. Use one EventLog per run at a time (the driver).

    Args:
        storage: The run's storage.
        attempt: The attempt number written on every line (see :func:`bump_attempt`).
        autoflush: Flush after every :meth:`append`. Defaults to ``True``.
    """

    def __init__(self, storage: RunStorage, attempt: int, *, autoflush: bool = True) -> None:
        self.storage = storage
        self.attempt = attempt
        self.autoflush = autoflush
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._append_mode = storage.is_local
        self._lines: list[str] = []
        if not self._append_mode:
            try:
                text = storage.read_bytes(EVENTS_JSONL).decode("utf-8", "replace")
            except FileNotFoundError:
                text = ""
            self._lines = [line for line in text.splitlines() if line.strip()]

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
        """Write pending lines (append locally; rewrite the whole object elsewhere)."""
        with self._lock:
            if not self._pending:
                return
            pending, self._pending = self._pending, []
            try:
                if self._append_mode:
                    path = self.storage._fs_path(EVENTS_JSONL)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "a", encoding="utf-8") as f:
                        f.write("".join(line + "\n" for line in pending))
                        f.flush()
                else:
                    lines = self._lines + pending
                    self.storage.write_bytes(EVENTS_JSONL, "".join(l + "\n" for l in lines).encode())
                    self._lines = lines
            except BaseException:
                self._pending = pending + self._pending
                raise


def read_events(storage: RunStorage) -> list[dict]:
    """All events of the run, oldest first; ``[]`` if there are none. A torn last line is skipped."""
    try:
        text = storage.read_bytes(EVENTS_JSONL).decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    events = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s", storage._redact(f"{storage.url(EVENTS_JSONL)} line {number} is not JSON; skipped"))
    return events


# ----------------------------------------------------------------------------------------------
# run.json


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of python and the main packages (via package metadata; imports nothing)."""
    return {"python": platform.python_version(), **{d: _version(d) for d in ("orchestrator", "torch", "ray", "fsspec")}}


def _read_run_json(storage: RunStorage) -> dict:
    try:
        data = storage.read_json(RUN_JSON)
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def _write_run_json_dict(storage: RunStorage, data: dict) -> dict:
    options = storage.spec.options
    text = redact(json.dumps(redact_values(data, options), indent=2, default=json_default), options)
    storage.write_bytes(RUN_JSON, (text + "\n").encode())
    return json.loads(text)


def write_run_json(storage: RunStorage, config: Mapping[str, Any], *, world_size: int | None = None) -> dict:
    """Write ``run.json``: the config snapshot, versions, world size; keeps the ``attempts`` counter.

    Credentials never appear: a ``storage_options`` entry of ``config`` is replaced by its keys,
    every string is redacted, and the final JSON text is redacted again.

    Args:
        storage: The run's storage.
        config: A JSON-able snapshot of the run's configuration (callables become their names).
        world_size: Number of workers. Defaults to ``config["world_size"]`` or ``config["num_workers"]``.

    Returns:
        The dict written (after redaction).
    """
    previous = _read_run_json(storage)
    snapshot = dict(config)
    if "storage_options" in snapshot:
        snapshot["storage_options"] = public_config(snapshot["storage_options"] or {})
    data = {
        "run_name": storage.spec.run_name,
        "storage": storage.url(),
        "storage_options_keys": public_config(storage.spec.options),
        "config": snapshot,
        "versions": versions(),
        "world_size": world_size if world_size is not None else snapshot.get("world_size", snapshot.get("num_workers")),
        "attempts": int(previous.get("attempts", 0) or 0),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return _write_run_json_dict(storage, data)


def bump_attempt(storage: RunStorage) -> int:
    """Increment ``attempts`` in run.json (creating it if needed) and return the new attempt number (1 first)."""
    data = _read_run_json(storage)
    data["attempts"] = int(data.get("attempts", 0) or 0) + 1
    _write_run_json_dict(storage, data)
    return data["attempts"]


# ----------------------------------------------------------------------------------------------
# Is a local run directory visible from every worker?


def write_marker(storage: RunStorage) -> str:
    """Write ``.marker-<uuid>`` in the run directory and return its name (for :func:`can_read_marker`)."""
    name = f".marker-{uuid.uuid4().hex}"
    storage.write_bytes(name, name.encode())
    return name


def can_read_marker(spec: StorageSpec, name: str) -> bool:
    """On a worker: whether the marker written by the driver is visible here."""
    try:
        storage = spec.open(retries=0)
        return storage.read_bytes(name) == name.encode()
    except Exception:  # noqa: BLE001 - any failure means "not visible"
        return False


def update_run_json(storage: RunStorage, **fields: Any) -> dict:
    """Set top-level fields of run.json (e.g. ``status``), keeping the rest."""
    data = _read_run_json(storage)
    data.update(fields)
    return _write_run_json_dict(storage, data)


def run_status(storage: RunStorage) -> str | None:
    """The ``status`` recorded in run.json (``running``, ``finished``, ``failed``, ``preempted``), if any."""
    return _read_run_json(storage).get("status")
