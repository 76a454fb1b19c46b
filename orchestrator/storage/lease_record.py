"""Who holds a run lease and what ``<run>/lease.json`` holds: :class:`Owner` and :class:`LeaseRecord`.

This module owns the lease's values: an :class:`Owner` (a driver process: its Ray job id, host,
pid, start time and a unique id) and the :class:`LeaseRecord` written to ``lease.json`` (token,
owner, acquired / renewed times, ``ttl_s``, released flag and the nonce that tells one write from
another), with their JSON form and the expiry rule. The protocol that writes them (acquire, renew,
release, fencing) lives in :mod:`orchestrator.storage.lease`.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping


def _ray_job_id() -> str | None:
    """The Ray job submission id (``ray job submit`` / RayJob) or Ray's job id, if this is a Ray driver."""
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if config:
        try:
            submission = json.loads(config).get("metadata", {}).get("job_submission_id")
        except (ValueError, AttributeError):
            submission = None
        if submission:
            return str(submission)
    return os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID") or None


@dataclass(frozen=True)
class Owner:
    """Who holds a lease: a driver process.

    Args:
        job_id: The Ray job (submission) id, if any. Defaults to ``None``.
        host: The host name. Defaults to ``socket.gethostname()``.
        pid: The process id. Defaults to ``os.getpid()``.
        started: When this owner started (Unix seconds). Defaults to now.
        id: A unique id of this owner (two owners in one process differ). Defaults to a new uuid.
    """

    job_id: str | None = None
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def current(cls, job_id: str | None = None) -> "Owner":
        """This process; ``job_id`` defaults to the Ray job submission id from the environment, if any."""
        return cls(job_id=job_id if job_id is not None else _ray_job_id())

    def describe(self) -> str:
        job = f"job {self.job_id}" if self.job_id else "a driver with no job id"
        return f"{job} on host {self.host}, pid {self.pid}"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Owner":
        return cls(job_id=data.get("job_id"), host=str(data.get("host", "?")), pid=int(data.get("pid", -1)),
                   started=float(data.get("started", 0.0)), id=str(data.get("id", "")))


@dataclass(frozen=True)
class LeaseRecord:
    """The content of ``lease.json``."""

    token: int
    owner: Owner
    acquired: float
    renewed: float
    ttl_s: float
    released: bool = False
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex)  # tells our write from any other

    def expired(self, now: float | None = None) -> bool:
        """Released, or not renewed for more than ``ttl_s`` seconds (by ``now``, default the local clock)."""
        now = time.time() if now is None else now
        return self.released or now - self.renewed > self.ttl_s

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LeaseRecord":
        d = json.loads(data.decode())
        return cls(token=int(d["token"]), owner=Owner.from_dict(d.get("owner") or {}),
                   acquired=float(d.get("acquired", d.get("renewed", 0.0))), renewed=float(d["renewed"]),
                   ttl_s=float(d["ttl_s"]), released=bool(d.get("released", False)),
                   nonce=str(d.get("nonce", "")))
