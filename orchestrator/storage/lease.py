"""The run lease: one owner per run directory, with a fencing token.

``<run>/lease.json`` says who owns the run::

    {"token": 3, "owner": {"id", "job_id", "host", "pid", "started"}, "acquired": t, "renewed": t,
     "ttl_s": 60.0, "released": false, "nonce": "..."}

- Every change of the file is a compare-and-swap against the version last read, so two writers
  can never both win: on S3 a conditional PUT (``If-None-Match: *`` to create, ``If-Match: <etag>``
  to replace; HTTP 412/409 means another writer won); on a local (or NFS) directory an exclusive
  ``fcntl.flock`` on ``lease.json.lock`` around read-compare-replace, plus a lock per path inside
  the process; the lock is dropped by the kernel when its holder dies, so a killed driver never
  leaves a stale lock behind. Other fsspec protocols get the same read-compare-write under the
  in-process lock only: exclusive within one process (``memory://``), best effort across hosts.
  The backends live in :mod:`orchestrator.storage.lease_backends`.
- **Token.** Every acquisition (free, released, expired or taken over) writes ``token + 1``, so
  tokens strictly increase over the run's life; :meth:`RunLease.release` marks the file released
  and never deletes it (deleting would restart tokens at 1). Carry the token in manifests and events.
- **Expiry.** A lease not renewed for ``ttl_s`` seconds is expired: ``now - renewed > ttl_s`` on the
  reader's clock, or, while :meth:`RunLease.acquire` waits, the file unchanged for ``ttl_s``
  seconds of the reader's own monotonic clock (robust to a reader whose clock runs behind). Keep
  clocks NTP-synced and ``ttl_s`` well above their skew; a lease that expires too early is still
  safe, because of fencing.
- **Fencing.** A holder is the owner exactly while the token on storage is its own.
  :meth:`RunLease.renew` (a CAS on what it last wrote), :meth:`RunLease.check` and
  :func:`check_token` (for another process that knows only the storage and the token, e.g. the
  coordinator before it commits or purges) raise :class:`LeaseLost` naming the new owner otherwise.
  A check precedes the write it guards by one storage round trip; the check narrows, but cannot
  close, that window on stores that cannot verify the token inside the write itself.

Example:

```python
lease = RunLease.acquire(storage, Owner.current(), ttl_s=60, wait_s=0)  # LeaseHeld if owned
lease.start_renewing()                        # renew every ttl_s / 3 in a daemon thread
...
check_token(storage, lease.token)             # before a commit or a purge (any process)
lease.release()
```
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import replace
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.storage.fs import RunStorage
from orchestrator.storage.lease_backends import (  # noqa: F401 - the backends' names, re-exported
    LEASE_FILE, _UNKNOWN, _Backend, _backend, _BestEffortBackend, _is_conflict, _LocalBackend, _process_lock,
    _S3Backend)
from orchestrator.storage.lease_record import LeaseRecord, Owner, _ray_job_id  # noqa: F401 - re-exported

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Errors


class LeaseError(OrchestratorError):
    """Base class of the run lease's errors."""


class LeaseHeld(LeaseError):
    """Another live owner holds the run's lease.

    Attributes:
        url: The run directory (redacted display URL).
        holder: The :class:`LeaseRecord` found on storage.
    """

    def __init__(self, url: str, holder: "LeaseRecord", now: float | None = None) -> None:
        self.url = url
        self.holder = holder
        now = time.time() if now is None else now
        since = now - holder.renewed
        super().__init__(
            f"run {url} is owned by {holder.owner.describe()} (lease token {holder.token}, held for "
            f"{_fmt_age(now - holder.acquired)}, renewed {_fmt_age(since)} ago, expires in "
            f"{_fmt_age(max(0.0, holder.ttl_s - since))} unless renewed); wait for it to finish, or if "
            "that owner is gone, pass takeover=True (CLI: --takeover)")

    def __reduce__(self):
        return (LeaseHeld, (self.url, self.holder))


class LeaseLost(LeaseError):
    """The token ``token`` no longer owns the run: another owner took the lease, or it was released.

    Attributes:
        url: The run directory (redacted display URL).
        token: The token that lost.
        current: The :class:`LeaseRecord` now on storage, or ``None`` if there is none.
    """

    def __init__(self, url: str, token: int, current: "LeaseRecord | None", now: float | None = None) -> None:
        self.url = url
        self.token = token
        self.current = current
        now = time.time() if now is None else now
        if current is None:
            why = "the lease file is missing"
        elif current.token == token and current.released:
            why = "the lease was released"
        else:
            why = (f"it is now owned by {current.owner.describe()} with token {current.token}"
                   f"{' (released)' if current.released else ''}, taken {_fmt_age(now - current.acquired)} ago")
        super().__init__(f"lost the lease on run {url}: token {token} is no longer the owner ({why}); "
                         "this attempt must not commit, purge or write events any more")

    def __reduce__(self):
        return (LeaseLost, (self.url, self.token, self.current))


def _fmt_age(seconds: float) -> str:
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    if m < 60:
        return f"{m}m {s}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h {m}m"
    return f"{h // 24}d {h % 24}h"


def _parse(storage: RunStorage, data: bytes | None) -> LeaseRecord | None:
    if data is None:
        return None
    try:
        return LeaseRecord.from_bytes(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise LeaseError(f"the lease file {storage.url(LEASE_FILE)} is not valid ({exc}); "
                         "if no driver runs on this run, delete it") from exc


# ----------------------------------------------------------------------------------------------
# Public API


def read_lease(storage: RunStorage) -> LeaseRecord | None:
    """The lease on storage, or ``None`` if the run never had one."""
    return _parse(storage, _backend(storage).read()[0])


def check_token(storage: RunStorage, token: int) -> None:
    """Fencing: raise :class:`LeaseLost` unless ``token`` owns the run now (and has not released it).

    For any process that knows only the storage and the token (the coordinator, before it commits
    or purges a backup).
    """
    current = read_lease(storage)
    if current is None or current.token != token or current.released:
        raise LeaseLost(storage.url(), token, current)


class RunLease:
    """A held run lease; get one with :meth:`acquire`.

    Attributes:
        storage: The run's storage.
        owner: Who holds it.
        token: The fencing token (strictly increasing over the run's life).
        record: What this holder last wrote.
        lost: The :class:`LeaseLost` the renewing thread met, if any (then it stopped).
    """

    def __init__(self, storage: RunStorage, record: LeaseRecord, version: Any, backend: _Backend) -> None:
        self.storage = storage
        self.record = record
        self._version = version
        self._backend = backend
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: LeaseLost | None = None

    @property
    def token(self) -> int:
        return self.record.token

    @property
    def owner(self) -> Owner:
        return self.record.owner

    @property
    def ttl_s(self) -> float:
        return self.record.ttl_s

    def __repr__(self) -> str:
        return f"RunLease({self.storage.url()!r}, token={self.token}, owner={self.owner.describe()!r})"

    # -- acquire ------------------------------------------------------------------------------

    @classmethod
    def acquire(cls, storage: RunStorage, owner: Owner | None = None, *, ttl_s: float = 60.0,
                takeover: bool = False, wait_s: float = 0.0, poll_s: float = 1.0) -> "RunLease":
        """Take the run's lease with token ``previous + 1``.

        Args:
            storage: The run's storage.
            owner: Who takes it. Defaults to :meth:`Owner.current`.
            ttl_s: Seconds the lease stays valid without :meth:`renew`. Defaults to ``60.0``.
            takeover: Take the lease even from a live owner: the owner found at the first read
                (and any older one) is fenced out. A different owner that wins the lease in the
                meantime is respected like any live owner. Defaults to ``False``.
            wait_s: How long to wait for a live owner to release or expire. Defaults to ``0.0``.
            poll_s: Seconds between reads while waiting. Defaults to ``1.0``.

        Raises:
            LeaseHeld: A live owner still holds it after ``wait_s`` (names the run, the owner and its age).
            ValueError: A non-positive ``ttl_s`` or negative ``wait_s`` / ``poll_s``.
        """
        if not ttl_s > 0 or wait_s < 0 or poll_s < 0:
            raise ValueError(f"ttl_s must be > 0 and wait_s, poll_s >= 0; got ttl_s={ttl_s}, "
                             f"wait_s={wait_s}, poll_s={poll_s}")
        owner = owner or Owner.current()
        backend = _backend(storage)
        deadline = time.monotonic() + wait_s
        takeover_upto: int | None = None  # takeover fences out tokens up to the first one seen
        unchanged: tuple[str, float] | None = None  # (nonce, first seen on the monotonic clock)
        while True:
            data, version = backend.read()
            current = _parse(storage, data)
            now, mono = time.time(), time.monotonic()
            if takeover and takeover_upto is None:
                takeover_upto = current.token if current is not None else 0
            if current is not None and (unchanged is None or unchanged[0] != current.nonce):
                unchanged = (current.nonce, mono)
            free = (current is None or current.expired(now) or current.owner.id == owner.id
                    or (takeover_upto is not None and current.token <= takeover_upto)
                    or (unchanged is not None and mono - unchanged[1] > current.ttl_s))
            if free:
                record = LeaseRecord(token=(current.token if current else 0) + 1, owner=owner,
                                     acquired=now, renewed=now, ttl_s=float(ttl_s))
                payload = record.to_bytes()
                written = backend.create(payload) if current is None else backend.replace(payload, version)
                version = _confirm(backend, record, written)
                if version is not None:
                    if current is not None and not current.released and current.owner.id != owner.id:
                        log.warning("%s", f"took over the lease on run {storage.url()} from "
                                    f"{current.owner.describe()} (token {current.token} -> {record.token})")
                    return cls(storage, record, version, backend)
                continue  # another writer won the race: look again
            if mono >= deadline:
                raise LeaseHeld(storage.url(), current, now)
            time.sleep(max(0.0, min(poll_s, deadline - mono)))

    # -- holder's operations ------------------------------------------------------------------

    def renew(self) -> None:
        """Extend the lease by ``ttl_s`` from now (a compare-and-swap on what this holder last wrote).

        Raises:
            LeaseLost: Someone else took the lease (names the new owner), or it was released.
        """
        with self._lock:
            if self.record.released:
                raise LeaseLost(self.storage.url(), self.token, self.record)
            record = replace(self.record, renewed=time.time(), nonce=uuid.uuid4().hex)
            self._swap(record)

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this holder's token owns the run now (one read)."""
        check_token(self.storage, self.token)

    def release(self) -> bool:
        """Stop renewing and mark the lease released (token kept, so the next owner gets ``token + 1``).

        Never touches a lease someone else holds: returns ``False`` then (and if already released).
        """
        self.stop_renewing()
        with self._lock:
            if self.record.released:
                return False
            record = replace(self.record, released=True, renewed=time.time(), nonce=uuid.uuid4().hex)
            try:
                self._swap(record)
            except LeaseLost as exc:
                log.info("%s", f"not releasing the lease: {exc}")
                return False
            return True

    def _swap(self, record: LeaseRecord) -> None:
        for attempt in range(5):
            written = self._backend.replace(record.to_bytes(), self._version)
            version = _confirm(self._backend, record, written)
            if version is not None:
                self.record, self._version = record, version
                return
            data, now_version = self._backend.read()
            current = _parse(self.storage, data)
            if current is None or current.nonce != self.record.nonce:
                raise LeaseLost(self.storage.url(), self.token, current)
            # Our last write is still there: a concurrent conditional write that did not win
            # (S3 409 ConditionalRequestConflict). Try again.
            self._version = now_version
            time.sleep(0.05 * (attempt + 1))
        raise LeaseError(f"could not update the lease on run {self.storage.url()}: concurrent writers kept "
                         "conflicting")

    # -- renewing in the background -------------------------------------------------------------

    def start_renewing(self, interval_s: float | None = None) -> None:
        """Renew every ``interval_s`` (default ``ttl_s / 3``) in a daemon thread until :meth:`release`,
        :meth:`stop_renewing` or a :class:`LeaseLost` (kept in :attr:`lost`). Storage errors are
        logged and retried at the next tick."""
        if self._thread is not None:
            return
        interval = self.ttl_s / 3 if interval_s is None else float(interval_s)
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.renew()
                except LeaseLost as exc:
                    self.lost = exc
                    log.error("%s", exc)
                    return
                except Exception as exc:  # noqa: BLE001 - try again next tick; expiry decides
                    log.warning("%s", self.storage._redact(f"renewing the lease on {self.storage.url()} "
                                                          f"failed: {exc}"))

        self._thread = threading.Thread(target=loop, name=f"lease-renew-{self.token}", daemon=True)
        self._thread.start()

    def stop_renewing(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            if thread is not threading.current_thread():
                thread.join()

    def __enter__(self) -> "RunLease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _confirm(backend: _Backend, record: LeaseRecord, written: Any) -> Any:
    """The version of ``record`` on storage if our write won, else ``None``.

    A write that reported a conflict may have landed all the same (a retried PUT whose first try
    succeeded): then the file holds our nonce. A win is never second-guessed by reading back, as a
    later legitimate change (the next owner after a release) would make it look lost.
    """
    if written is not None and written is not _UNKNOWN:
        return written
    data, version = backend.read()
    if data is None:
        return None
    try:
        ours = LeaseRecord.from_bytes(data).nonce == record.nonce
    except (ValueError, KeyError, TypeError):
        ours = False
    return version if ours else None
