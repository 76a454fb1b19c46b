"""The run directory's bookkeeping files: ``run.json`` and visibility markers.

The event log, ``events.jsonl``, lives in :mod:`orchestrator.storage.event_log`; its names are
importable from here too.

Example:

```python
storage = check_access(StorageSpec("s3://bucket/runs", "digits"))
write_run_json(storage, {"epochs": 3}, world_size=2)
EventLog(storage, attempt=bump_attempt(storage)).append(EventType.STARTED, epoch=0)
```
"""

from __future__ import annotations

import json
import platform
import time
import uuid
from importlib import metadata
from typing import Any, Mapping

from orchestrator.core.redaction import json_default, public_config, redact, redact_values
from orchestrator.storage.event_log import (  # noqa: F401 - the event log's names, re-exported
    EVENT_PARTS_DIR, EVENTS_JSONL, MERGE_FAN_IN, SEALED_LEVEL, EventLog, EventLogContents, EventRecord, _list_parts,
    _parse_lines, _Part, read_event_log, read_events)
from orchestrator.storage.fs import RunStorage, StorageSpec

RUN_JSON = "run.json"


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
