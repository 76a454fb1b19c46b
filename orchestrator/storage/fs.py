"""fsspec I/O for the run directory ``<storage>/<run_name>/``.

Everything the orchestrator persists (run.json, events.jsonl, backups, checkpoints, logs) goes
through a :class:`RunStorage`, opened from a picklable :class:`StorageSpec` on the driver and on
every worker. Any fsspec URL works (``s3://``, ``gs://``, ``memory://``, ...); a plain path or a
``file://`` URL is a local directory. :class:`StorageSpec` lives in :mod:`orchestrator.storage.spec`
and the atomic-write helpers in :mod:`orchestrator.storage.atomic` (both importable from here).

- Paths given to a :class:`RunStorage` are relative to the run directory, or absolute URLs of the
  same filesystem. ``..`` may not escape the run directory.
- Writes go straight to the final object on object stores (they have no rename; the commit
  protocol writes a manifest last) and through a temporary file plus an atomic rename locally.
- Transient errors (network, timeouts, throttling) are retried with exponential backoff; a
  missing file, a permission problem or a bad argument is raised at once.
- Nothing produced here (error messages, log lines, run.json, events) contains the values of
  ``storage_options`` or ``user:password@`` parts of URLs: see :func:`redact`.

Example:

```python
spec = StorageSpec("s3://bucket/runs", "digits", {"client_kwargs": {"endpoint_url": url}})
storage = check_access(spec)            # clear errors before any worker starts
storage.write_json("state/meta.json", {"step": 3})
```
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Callable, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from orchestrator.core.redaction import json_default, redact
from orchestrator.storage.atomic import _abandon, _atomic_local_write
from orchestrator.storage.errors import (
    access_error, chain_cause, credentials_hint, describe, is_credentials_error, is_transient, storage_error)
from orchestrator.storage.spec import (  # noqa: F401 - StorageSpec and its helpers, re-exported
    _BACKEND_PACKAGES, _S3_DEFAULT_CONFIG, DEFAULT_STORAGE, StorageSpec, _package_from_message, _protocol_of)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Protocols whose "directories" are key prefixes: no makedirs, no rename, no append.
OBJECT_STORE_PROTOCOLS = frozenset(
    {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "r2", "oci", "cos", "tos", "obs"}
)


# ----------------------------------------------------------------------------------------------
# RunStorage


def _reopen(spec: StorageSpec, retries: int, backoff_s: float) -> "RunStorage":
    return spec.open(retries=retries, backoff_s=backoff_s)


class RunStorage:
    """The run directory ``<url>/<run_name>/`` on one fsspec filesystem.

    Every method takes a ``path`` relative to the run directory, or an absolute URL (local: an
    absolute path) on the same filesystem; see :meth:`resolve`.

    Args:
        spec: The :class:`StorageSpec` it was opened from.
        fs: The fsspec filesystem.
        root: The run directory as a path of ``fs`` (no protocol).
        retries: Extra attempts after the first for transient errors. Defaults to ``4``.
        backoff_s: First wait between attempts; doubles each time. Defaults to ``0.5``.
    """

    def __init__(self, spec: StorageSpec, fs: fsspec.AbstractFileSystem, root: str, *,
                 retries: int = 4, backoff_s: float = 0.5) -> None:
        self.spec = spec
        self.fs = fs
        self.root = root
        self.retries = retries
        self.backoff_s = backoff_s
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        self.protocols: tuple[str, ...] = tuple(protocols)

    def __reduce__(self):
        return (_reopen, (self.spec, self.retries, self.backoff_s))

    def __repr__(self) -> str:
        return f"RunStorage({self.url()!r})"

    # -- paths ------------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def is_object_store(self) -> bool:
        return bool(set(self.protocols) & OBJECT_STORE_PROTOCOLS)

    def _redact(self, text: Any) -> str:
        return redact(text, self.spec.options)

    def _to_url(self, fs_path: str) -> str:
        return fs_path if self.is_local else self.fs.unstrip_protocol(fs_path)

    def url(self, *parts: str) -> str:
        """Display URL (redacted) of a path inside the run directory; ``url()`` is the run directory.

        Local runs give a plain absolute path.
        """
        return self._redact(self._to_url(self.path(*parts)))

    def path(self, *parts: str) -> str:
        """The ``fs`` path (no protocol) of ``parts`` joined under the run directory (``..`` may not escape)."""
        rel = posixpath.join(*parts) if parts else ""
        return self._join(rel)

    def _join(self, rel: str) -> str:
        rel = rel.replace("\\", "/") if os.sep == "\\" else rel
        norm = posixpath.normpath(rel) if rel else "."
        if norm.startswith("/") or norm == ".." or norm.startswith("../"):
            raise ValueError(self._redact(
                f"path {rel!r} escapes the run directory {self.url()}; use a path inside it"))
        return self.root if norm == "." else posixpath.join(self.root, norm)

    def resolve(self, path: str) -> str:
        """Where ``path`` points, as a URL usable with this storage (local: an absolute path).

        A relative path is joined under the run directory; an absolute URL (or, for local
        storage, an absolute path) stays as is but must be on the same filesystem.

        Raises:
            ValueError: ``path`` escapes the run directory with ``..``, or is on another filesystem.
        """
        if not isinstance(path, str):
            path = os.fspath(path)
        proto = _protocol_of(path)
        if proto is None and os.path.isabs(path):
            proto = "file"
        if proto is None:
            return self._to_url(self._join(path))
        if proto not in self.protocols:
            raise ValueError(self._redact(
                f"{path!r} is on protocol {proto!r} but the run's storage {self.url()} is "
                f"{self.protocols[0]!r}; use a path relative to the run directory or a "
                f"{self.protocols[0]}:// URL"))
        return path

    def _fs_path(self, path: str) -> str:
        return self.fs._strip_protocol(self.resolve(path))

    # -- retries ----------------------------------------------------------------------------

    def _retry(self, what: str, fs_path: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying transient errors; any error raised is redacted and names the URL.

        Missing or rejected credentials raise ``PermissionError``; a transient error that persists
        raises ``OSError`` after the last attempt; anything else keeps its type (see
        :func:`~orchestrator.storage.errors.storage_error`). The original error is chained only
        when its printed form holds no value of ``storage_options``.
        """
        attempts = max(0, int(self.retries)) + 1
        options = self.spec.options
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below
                url = self._redact(self._to_url(fs_path))
                if is_credentials_error(exc) or (isinstance(exc, PermissionError) and self.is_object_store):
                    error: BaseException = PermissionError(self._redact(
                        f"{what} {url}: no credentials / access denied: {credentials_hint(self.spec.protocol)} "
                        f"({describe(exc)})"))
                    error.errno = getattr(exc, "errno", None)
                elif not is_transient(exc):
                    error = storage_error(exc, what, url, options)
                elif attempt == attempts:
                    error = OSError(self._redact(f"{what} {url} failed after {attempts} attempts: {describe(exc)}"))
                else:
                    delay = self.backoff_s * 2 ** (attempt - 1)
                    log.warning("%s", self._redact(
                        f"{what} {url} failed ({describe(exc)}); retry {attempt}/{attempts - 1} in {delay:.2f}s"))
                    time.sleep(delay)
                    continue
                if error is exc:
                    raise
                error.__cause__ = chain_cause(exc, options)
                raise error
        raise AssertionError("unreachable")

    # -- file operations --------------------------------------------------------------------

    def makedirs(self, path: str = "") -> None:
        """Create a directory (and parents). A no-op on object stores, which have no directories."""
        if self.is_object_store:
            return
        p = self._fs_path(path)
        self._retry("makedirs", p, lambda: self.fs.makedirs(p, exist_ok=True))

    def _make_parent(self, fs_path: str) -> None:
        """Create the parent directory of ``fs_path`` where the filesystem has directories."""
        parent = posixpath.dirname(fs_path)
        if not self.is_object_store and parent and parent != fs_path:
            self.fs.makedirs(parent, exist_ok=True)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file. Locally atomic (temporary file + rename); on object stores one PUT."""
        p = self._fs_path(path)
        data = bytes(data)
        if self.is_local:
            self._retry("write", p, lambda: _atomic_local_write(p, data))
            return

        def put() -> None:
            self._make_parent(p)
            self.fs.pipe_file(p, data)

        self._retry("write", p, put)

    def write_stream(self, path: str, fill: Callable[[BinaryIO], None]) -> None:
        """Write a file by calling ``fill(file)``, without holding it in memory.

        Locally the file appears atomically (temporary file, fsync, rename). Elsewhere it is streamed
        through ``fs.open`` (a multipart upload on object stores, once it passes one block); if
        ``fill`` or the final upload fails, the file is discarded and its multipart upload aborted
        (s3fs ``discard()``), so no half-written object appears and no upload is left in progress.
        An upload that a SIGKILL interrupts stays in progress: see docs/storage.md for the
        bucket's lifecycle rule. A transient failure retries the whole write, calling ``fill`` again.
        """
        p = self._fs_path(path)
        if self.is_local:
            self._retry("write", p, lambda: _atomic_local_write(p, fill))
            return

        def put() -> None:
            self._make_parent(p)
            f = self.fs.open(p, "wb")
            try:
                fill(f)
                f.close()  # uploads the last part and completes the multipart upload
            except BaseException:
                _abandon(f, self._redact(self._to_url(p)))
                raise

        self._retry("write", p, put)

    def read_bytes(self, path: str) -> bytes:
        """Read a whole file. Raises ``FileNotFoundError`` if it does not exist."""
        p = self._fs_path(path)
        return self._retry("read", p, lambda: self.fs.cat_file(p))

    def read_many(self, paths: list[str], *, max_workers: int = 16) -> dict[str, bytes | None]:
        """Read several whole files, concurrently; a file that does not exist maps to ``None``.

        Args:
            paths: Paths as for :meth:`read_bytes`.
            max_workers: Reads in flight at once. Defaults to ``16``.

        Raises:
            OSError, PermissionError, ...: as :meth:`read_bytes`, for the first path that failed.
        """
        def one(path: str) -> bytes | None:
            try:
                return self.read_bytes(path)
            except FileNotFoundError:
                return None

        if len(paths) <= 1:
            return {path: one(path) for path in paths}
        with ThreadPoolExecutor(max_workers=min(max_workers, len(paths)),
                                thread_name_prefix="orchestrator-read") as pool:
            return dict(zip(paths, pool.map(one, paths)))

    def exists(self, path: str = "") -> bool:
        p = self._fs_path(path)

        def check() -> bool:
            self.fs.invalidate_cache(posixpath.dirname(p))
            return bool(self.fs.exists(p))

        return self._retry("exists", p, check)

    def listdir(self, path: str = "") -> list[str]:
        """Names (not paths) of the entries of a directory, sorted; ``[]`` if it does not exist."""
        p = self._fs_path(path)

        def ls() -> list[str]:
            self.fs.invalidate_cache(p)
            try:
                entries = self.fs.ls(p, detail=False)
            except (FileNotFoundError, NotADirectoryError):
                return []
            stripped = p.rstrip("/")
            names = {posixpath.basename(self.fs._strip_protocol(e).rstrip("/")) for e in entries
                     if self.fs._strip_protocol(e).rstrip("/") != stripped}
            return sorted(n for n in names if n)

        return self._retry("list", p, ls)

    def rm(self, path: str, recursive: bool = False) -> None:
        """Delete a file (or a tree with ``recursive=True``); a missing one is logged, not raised."""
        p = self._fs_path(path)
        try:
            self._retry("delete", p, lambda: self.fs.rm(p, recursive=recursive))
        except FileNotFoundError:
            log.info("%s", self._redact(f"delete {self._to_url(p)}: already gone"))

    def rm_files(self, paths: list[str]) -> None:
        """Delete several files in one call where the filesystem can (S3: one request per 1000 keys).

        Missing files are ignored.

        Args:
            paths: Paths as for :meth:`rm`.
        """
        fs_paths = [self._fs_path(path) for path in paths]
        if not fs_paths:
            return
        if self.is_local:
            for p in fs_paths:
                self.rm(p)
            return
        try:
            self._retry("delete", fs_paths[0], lambda: self.fs.rm(fs_paths))
        except FileNotFoundError:
            log.info("%s", self._redact(f"delete {self._to_url(fs_paths[0])} and others: already gone"))

    def size(self, path: str) -> int:
        p = self._fs_path(path)
        return int(self._retry("size", p, lambda: self.fs.size(p)))

    def write_json(self, path: str, obj: Any, *, indent: int | None = 2) -> None:
        text = json.dumps(obj, indent=indent, default=json_default)
        self.write_bytes(path, (text + "\n").encode())

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path).decode())

    # -- access check -----------------------------------------------------------------------

    def check_access(self) -> None:
        """Create the run directory and write, read back and delete a probe file, once (no retries).

        Run it on the driver before any worker starts.

        Raises:
            ConnectionError: The endpoint cannot be reached.
            FileNotFoundError: The bucket does not exist.
            PermissionError: Missing or rejected credentials, or a local directory that is not writable.
            OSError: Anything else, with the URL and the original error.
        """
        probe = posixpath.join(self.root, f".access-probe-{uuid.uuid4().hex}")
        payload = b"orchestrator access probe\n"
        try:
            if not self.is_object_store:
                self.fs.makedirs(self.root, exist_ok=True)
            if self.is_local:
                _atomic_local_write(probe, payload)
            else:
                self.fs.pipe_file(probe, payload)
            got = self.fs.cat_file(probe)
            if got != payload:
                raise OSError(f"read back {len(got)} bytes, wrote {len(payload)}")
            self.fs.rm(probe)
        except Exception as exc:  # noqa: BLE001 - mapped to a clear built-in error
            error = access_error(self, exc)
            error.__cause__ = chain_cause(exc, self.spec.options)
            raise error


def check_access(spec: StorageSpec) -> RunStorage:
    """Open ``spec`` and run :meth:`RunStorage.check_access`; returns the storage.

    Raises:
        ValueError: Unknown protocol or missing fsspec backend (names the package to install).
        ConnectionError, FileNotFoundError, PermissionError, OSError: see ``RunStorage.check_access``.
    """
    storage = spec.open()
    storage.check_access()
    return storage
