"""The run lease's storage backends: compare-and-swap on ``<run>/lease.json``, one per kind of store.

This module owns how a lease file is read with a version and replaced only if unchanged:
:class:`_LocalBackend` (an exclusive ``fcntl.flock`` on ``lease.json.lock`` plus a lock per path
inside the process, for local and network-mounted directories), :class:`_S3Backend` (conditional
PUTs, ``If-None-Match: *`` / ``If-Match: <etag>``, with :func:`_is_conflict` telling a lost
precondition from an error) and :class:`_BestEffortBackend` (read-compare-write under the
in-process lock, for any other fsspec protocol); :func:`_backend` picks one for a storage. The
lease protocol built on them (tokens, expiry, fencing) lives in :mod:`orchestrator.storage.lease`.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from orchestrator.storage.atomic import _atomic_local_write
from orchestrator.storage.fs import RunStorage

try:  # POSIX; elsewhere local leases are exclusive within one process only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

# Logged under the lease module's name, as before the backends had a module of their own.
log = logging.getLogger("orchestrator.storage.lease")

#: The lease's file name inside the run directory.
LEASE_FILE = "lease.json"
_S3_PROTOCOLS = frozenset({"s3", "s3a"})
_CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})


# ----------------------------------------------------------------------------------------------
# Backends: read with a version, create if absent, replace if unchanged


_UNKNOWN = object()  # a write that won without telling the new version

_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _process_lock(key: str) -> threading.Lock:
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(key, threading.Lock())


class _Backend:
    """Compare-and-swap on one file. ``read`` returns ``(data or None, version)``; the writes return
    the new version if they won, ``None`` if the file exists / changed since ``version``, and
    :data:`_UNKNOWN` if they won but cannot tell the new version (read it back)."""

    def __init__(self, storage: RunStorage) -> None:
        self.storage = storage
        self.path = storage.path(LEASE_FILE)

    def read(self) -> tuple[bytes | None, Any]:
        raise NotImplementedError

    def create(self, data: bytes) -> Any:
        raise NotImplementedError

    def replace(self, data: bytes, version: Any) -> Any:
        raise NotImplementedError


class _LocalBackend(_Backend):
    """A local or network-mounted directory: flock on ``lease.json.lock`` (plus an in-process lock)."""

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with _process_lock(os.path.realpath(self.path)):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            if fcntl is None:  # pragma: no cover - Windows
                yield
                return
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # drops the flock

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read(self) -> tuple[bytes | None, Any]:
        data = self._read()
        return data, data

    def create(self, data: bytes) -> Any:
        with self._locked():
            if self._read() is not None:
                return None
            _atomic_local_write(self.path, data)
            return data

    def replace(self, data: bytes, version: Any) -> Any:
        with self._locked():
            if version is None or self._read() != version:
                return None
            _atomic_local_write(self.path, data)
            return data


class _S3Backend(_Backend):
    """S3 (s3fs): conditional PUTs; the ETag of a GET is the version."""

    def read(self) -> tuple[bytes | None, Any]:
        from fsspec.asyn import sync

        fs = self.storage.fs
        bucket, key, _ = fs.split_path(self.path)

        async def get() -> tuple[bytes, str]:
            resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            body = resp["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return data, resp["ETag"]

        try:
            return self.storage._retry("read", self.path, lambda: sync(fs.loop, get))
        except FileNotFoundError:
            return None, None

    def _put(self, data: bytes, **condition: Any) -> Any:
        def put() -> Any:
            try:
                out = self.storage.fs.pipe_file(self.path, data, **condition)
            except Exception as exc:  # noqa: BLE001 - a lost precondition is an answer, not an error
                if _is_conflict(exc):
                    return None
                raise
            etag = out.get("ETag") if isinstance(out, Mapping) else None
            return etag or _UNKNOWN

        return self.storage._retry("write", self.path, put)

    def create(self, data: bytes) -> Any:
        return self._put(data, mode="create")

    def replace(self, data: bytes, version: Any) -> Any:
        if version is None:
            return None
        return self._put(data, IfMatch=version)


class _BestEffortBackend(_Backend):
    """Any other fsspec filesystem: read-compare-write under an in-process lock (not atomic across hosts)."""

    def _key(self) -> str:
        return f"{self.storage.protocols[0]}://{self.path}"

    def read(self) -> tuple[bytes | None, Any]:
        try:
            data = self.storage.read_bytes(LEASE_FILE)
        except FileNotFoundError:
            data = None
        return data, data

    def create(self, data: bytes) -> Any:
        with _process_lock(self._key()):
            if self.read()[0] is not None:
                return None
            self.storage.write_bytes(LEASE_FILE, data)
            return data

    def replace(self, data: bytes, version: Any) -> Any:
        with _process_lock(self._key()):
            if version is None or self.read()[0] != version:
                return None
            self.storage.write_bytes(LEASE_FILE, data)
            return data


def _is_conflict(exc: BaseException) -> bool:
    """An S3 precondition failure (412 PreconditionFailed, 409 ConditionalRequestConflict) or an
    ``If-Match`` on an object that no longer exists: another writer won."""
    if isinstance(exc, (FileExistsError, FileNotFoundError)):
        return True
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, Mapping):
            code = str((response.get("Error") or {}).get("Code", ""))
            status = str((response.get("ResponseMetadata") or {}).get("HTTPStatusCode", ""))
            if code in _CONFLICT_CODES or status in ("409", "412"):
                return True
        e = e.__cause__ or e.__context__
    return False


_warned_best_effort: set[str] = set()


def _backend(storage: RunStorage) -> _Backend:
    if storage.is_local:
        return _LocalBackend(storage)
    if set(storage.protocols) & _S3_PROTOCOLS and hasattr(storage.fs, "_call_s3"):
        return _S3Backend(storage)
    proto = storage.protocols[0]
    if proto not in _warned_best_effort and proto != "memory":
        _warned_best_effort.add(proto)
        log.warning("the run lease on %s:// is exclusive within one process only (no conditional "
                    "writes for this protocol); do not run two drivers on one run", proto)
    return _BestEffortBackend(storage)
