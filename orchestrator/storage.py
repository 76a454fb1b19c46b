"""fsspec I/O for the run directory ``<storage>/<run_name>/``.

Everything the orchestrator persists (run.json, events.jsonl, backups, checkpoints, logs) goes
through a :class:`RunStorage`, opened from a picklable :class:`StorageSpec` on the driver and on
every worker. Any fsspec URL works (``s3://``, ``gs://``, ``memory://``, ...); a plain path or a
``file://`` URL is a local directory.

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
EventLog(storage, attempt=bump_attempt(storage)).append("started", epoch=0)
```
"""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import posixpath
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Mapping, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Where runs go when ``storage`` is not given (expanded to an absolute path of the driver's home).
DEFAULT_STORAGE = "~/orchestrator_results"
RUN_JSON = "run.json"
EVENTS_JSONL = "events.jsonl"

# Protocols whose "directories" are key prefixes: no makedirs, no rename, no append.
OBJECT_STORE_PROTOCOLS = frozenset(
    {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "r2", "oci", "cos", "tos", "obs"}
)

# The pip package that provides each fsspec protocol (for "install X" messages).
_BACKEND_PACKAGES = {
    "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "abfs": "adlfs", "abfss": "adlfs",
    "az": "adlfs", "adl": "adlfs", "oss": "ossfs", "oci": "ocifs", "hf": "huggingface_hub",
    "sftp": "paramiko", "ssh": "paramiko", "smb": "smbprotocol", "webdav": "webdav4",
    "dropbox": "dropboxdrivefs", "gdrive": "gdrivefs", "http": "aiohttp", "https": "aiohttp",
    "hdfs": "pyarrow", "webhdfs": "requests", "dvc": "dvc", "lakefs": "lakefs-spec",
}

# Bounded client settings for S3 unless the user passes their own ``config_kwargs``: a dead
# endpoint fails in seconds, and our own retry loop (RunStorage.retries) does the patient part.
_S3_DEFAULT_CONFIG = {"connect_timeout": 5, "retries": {"max_attempts": 2}}

# Exceptions that never get better by retrying.
_PERMANENT_TYPES = (
    FileNotFoundError, PermissionError, ValueError, TypeError, KeyError, NotImplementedError,
    IsADirectoryError, NotADirectoryError, FileExistsError,
)
_PERMANENT_ERRNOS = frozenset(
    {errno.EINVAL, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
     errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EDQUOT, errno.EMSGSIZE}
)
# Exception classes (by name: this layer does not import botocore/google/azure) that mean
# "missing or rejected credentials".
_CREDENTIAL_ERRORS = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
     "UnauthorizedSSOTokenError", "TokenRetrievalError", "NoAuthTokenError", "InvalidConfigError",
     "ProfileNotFound", "DefaultCredentialsError", "RefreshError", "ClientAuthenticationError",
     "CredentialUnavailableError"}
)
# Exception classes (by name) that mean "could not reach the endpoint".
_CONNECTION_ERRORS = frozenset(
    {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError",
     "ProxyConnectionError", "HTTPClientError", "ClientConnectorError", "ClientConnectionError",
     "ServerDisconnectedError", "ServerTimeoutError", "ClientOSError", "FSTimeoutError",
     "ConnectionError", "ConnectTimeout", "ReadTimeout", "NewConnectionError", "MaxRetryError",
     "TransportError", "ServiceRequestError"}
)
# Third-party packages whose exceptions are I/O problems worth retrying (unless permanent above).
_IO_MODULES = frozenset(
    {"botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "http", "google", "azure",
     "fsspec", "s3fs", "gcsfs", "adlfs", "huggingface_hub"}
)


# ----------------------------------------------------------------------------------------------
# Redaction


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s'\"]+@")
_MIN_SECRET_LEN = 4  # shorter values ("s3", "v4", "aws") would shred messages, and are no secrets


def _secret_values(options: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(options, Mapping):
        for value in options.values():
            found |= _secret_values(value)
    elif isinstance(options, (list, tuple, set, frozenset)):
        for value in options:
            found |= _secret_values(value)
    elif isinstance(options, bytes):
        found |= _secret_values(options.decode("utf-8", "replace"))
    elif isinstance(options, str) and len(options) >= _MIN_SECRET_LEN:
        found.add(options)
        # An endpoint URL may also appear with its userinfo already stripped, or JSON-escaped.
        found.add(_USERINFO.sub(r"\g<scheme>", options))
        found.add(json.dumps(options)[1:-1])
    return {v for v in found if len(v) >= _MIN_SECRET_LEN}


def redact(text: Any, options: Mapping[str, Any] | None = None) -> str:
    """Return ``str(text)`` with every string value of ``options`` and URL userinfo replaced by ``***``.

    Args:
        text: The message, log line or JSON text to clean.
        options: The ``storage_options`` (searched recursively: keys, secrets, tokens, endpoint
            URLs, ...). Values shorter than 4 characters are left alone. Defaults to ``None``
            (only ``user:password@`` parts of URLs are removed).

    Example:
        >>> redact("s3://me:pw@host/b key=abcd1234", {"key": "abcd1234"})
        's3://***@host/b key=***'
    """
    out = str(text)
    for value in sorted(_secret_values(options or {}), key=len, reverse=True):
        out = out.replace(value, "***")
    return _USERINFO.sub(r"\g<scheme>***@", out)


def _redact_values(obj: Any, options: Mapping[str, Any] | None) -> Any:
    """Redact every string inside a JSON-like value (before serialising, so escaping cannot hide a secret)."""
    if isinstance(obj, str):
        return redact(obj, options)
    if isinstance(obj, Mapping):
        return {str(k): _redact_values(v, options) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_redact_values(v, options) for v in obj]
    return obj


def public_config(options: Mapping[str, Any] | None) -> list[str]:
    """The option keys (nested keys dotted, sorted) of ``storage_options``, never their values; for run.json."""
    keys: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif prefix:
            keys.append(prefix)

    walk("", options or {})
    return sorted(keys)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return obj.item()
        except Exception:  # noqa: BLE001 - fall back to text
            pass
    if callable(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    return repr(obj)


# ----------------------------------------------------------------------------------------------
# Error classification


def _type_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _is_credentials_error(exc: BaseException) -> bool:
    return bool(_type_names(exc) & _CREDENTIAL_ERRORS)


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return bool(_type_names(exc) & _CONNECTION_ERRORS) and not _is_credentials_error(exc)


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: network and server-side trouble, not missing files, permissions or bad arguments."""
    if isinstance(exc, _PERMANENT_TYPES) or _is_credentials_error(exc):
        return False
    if isinstance(exc, OSError):
        return exc.errno not in _PERMANENT_ERRNOS
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    modules = {cls.__module__.split(".")[0] for cls in type(exc).__mro__}
    return bool(modules & _IO_MODULES)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _protocol_of(url: str) -> str | None:
    head = url.split("::")[-1]
    return fsspec.core.split_protocol(head)[0]


# ----------------------------------------------------------------------------------------------
# StorageSpec


@dataclass(frozen=True)
class StorageSpec:
    """Where a run lives: ``<url>/<run_name>/``. Picklable; send it to workers and ``open()`` it there.

    Args:
        url: A local path, a ``file://`` URL or any fsspec URL (``s3://bucket/prefix``,
            ``gs://...``, ``memory://...``). Defaults to ``None``: ``~/orchestrator_results``,
            expanded to an absolute path on the driver (so workers on the same node write to the
            same place; for several nodes use a shared filesystem or an object store).
        run_name: The run directory's name; the same storage and run_name resume a run.
        options: ``storage_options`` passed to ``fsspec.core.url_to_fs(url, **options)``
            (credentials, ``client_kwargs={"endpoint_url": ...}``, ...). Never logged or stored:
            only its keys appear in run.json. For S3, ``config_kwargs`` defaults to
            ``{"connect_timeout": 5, "retries": {"max_attempts": 2}}`` so that a dead endpoint
            fails in seconds; pass your own ``config_kwargs`` to change that.
    """

    url: str | None = None
    run_name: str = "run"
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.url is not None and (not isinstance(self.url, str) or not self.url.strip()):
            raise ValueError(f"storage must be a path or an fsspec URL string, got {redact(repr(self.url))}")
        if (not isinstance(self.run_name, str) or not self.run_name or self.run_name in (".", "..")
                or "/" in self.run_name or "\\" in self.run_name):
            raise ValueError(f"run_name must be a non-empty name without '/', got {self.run_name!r}")
        if self.options is None:
            object.__setattr__(self, "options", {})
        if not isinstance(self.options, Mapping):
            raise ValueError(f"storage_options must be a dict, got {type(self.options).__name__}")
        object.__setattr__(self, "options", dict(self.options))
        url = self.url
        if url is None:
            url = os.path.abspath(os.path.expanduser(DEFAULT_STORAGE))
        elif url.startswith("file://"):
            url = os.path.abspath(os.path.expanduser(url[len("file://"):]))
        elif "://" not in url and "::" not in url:
            url = os.path.abspath(os.path.expanduser(url))
        if not url.endswith("://"):
            url = url.rstrip("/") or "/"
        object.__setattr__(self, "url", url)

    def __repr__(self) -> str:
        return (f"StorageSpec(url={redact(self.url, self.options)!r}, run_name={self.run_name!r}, "
                f"options=<keys {public_config(self.options)}>)")

    @property
    def protocol(self) -> str:
        """The URL's protocol (``"file"`` for local paths)."""
        return _protocol_of(self.url) or "file"

    def display_url(self) -> str:
        """The run directory's URL, redacted, for messages."""
        return redact(posixpath.join(self.url, self.run_name), self.options)

    def fs_options(self) -> dict[str, Any]:
        """The options actually passed to fsspec (the user's plus bounded S3 timeouts)."""
        opts = dict(self.options)
        if self.protocol in ("s3", "s3a") and "config_kwargs" not in opts:
            opts["config_kwargs"] = json.loads(json.dumps(_S3_DEFAULT_CONFIG))
        return opts

    def open(self, *, retries: int = 4, backoff_s: float = 0.5) -> "RunStorage":
        """Build the filesystem and return the run directory's :class:`RunStorage` (no I/O yet).

        Raises:
            ValueError: Unknown protocol, its fsspec backend is not installed, or bad options.
        """
        display = self.display_url()
        proto = self.protocol
        try:
            fs, root = fsspec.core.url_to_fs(self.url, **self.fs_options())
        except ImportError as exc:
            package = _BACKEND_PACKAGES.get(proto) or _package_from_message(str(exc)) or f"the fsspec backend for {proto!r}"
            raise ValueError(redact(
                f"storage {display}: protocol {proto!r} needs {package}, which is not installed "
                f"({exc}); run `pip install {package}` or choose another storage", self.options)) from None
        except ValueError as exc:
            raise ValueError(redact(
                f"storage {display}: unknown protocol {proto!r} ({exc}); use a local path or an fsspec "
                "URL such as s3://bucket/prefix, gs://bucket/prefix or memory://name", self.options)) from None
        except TypeError as exc:
            raise ValueError(redact(
                f"storage {display}: storage_options not accepted by the {proto!r} backend: {exc}",
                self.options)) from None
        return RunStorage(self, fs, posixpath.join(root.rstrip("/") or "/", self.run_name),
                          retries=retries, backoff_s=backoff_s)


def _package_from_message(message: str) -> str | None:
    match = re.search(r"install (?:the )?['\"`]?([A-Za-z0-9_.\-]+)", message)
    return match.group(1) if match else None


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
        attempts = max(0, int(self.retries)) + 1
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below
                url = self._redact(self._to_url(fs_path))
                if _is_credentials_error(exc):
                    raise PermissionError(self._redact(
                        f"{what} {url}: {_credentials_hint(self.spec)} ({_describe(exc)})")) from exc
                if not _is_transient(exc):
                    raise
                if attempt == attempts:
                    raise OSError(self._redact(
                        f"{what} {url} failed after {attempts} attempts: {_describe(exc)}")) from exc
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning("%s", self._redact(
                    f"{what} {url} failed ({_describe(exc)}); retry {attempt}/{attempts - 1} in {delay:.2f}s"))
                time.sleep(delay)
        raise AssertionError("unreachable")

    # -- file operations --------------------------------------------------------------------

    def makedirs(self, path: str = "") -> None:
        """Create a directory (and parents). A no-op on object stores, which have no directories."""
        if self.is_object_store:
            return
        p = self._fs_path(path)
        self._retry("makedirs", p, lambda: self.fs.makedirs(p, exist_ok=True))

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file. Locally atomic (temporary file + rename); on object stores one PUT."""
        p = self._fs_path(path)
        data = bytes(data)
        if self.is_local:
            self._retry("write", p, lambda: _atomic_local_write(p, data))
            return

        def put() -> None:
            if not self.is_object_store:
                parent = posixpath.dirname(p)
                if parent and parent != p:
                    self.fs.makedirs(parent, exist_ok=True)
            self.fs.pipe_file(p, data)

        self._retry("write", p, put)

    def read_bytes(self, path: str) -> bytes:
        """Read a whole file. Raises ``FileNotFoundError`` if it does not exist."""
        p = self._fs_path(path)
        return self._retry("read", p, lambda: self.fs.cat_file(p))

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

    def size(self, path: str) -> int:
        p = self._fs_path(path)
        return int(self._retry("size", p, lambda: self.fs.size(p)))

    def open(self, path: str, mode: str = "rb", **kwargs: Any):
        """A file object from ``fs.open`` (streaming; no temporary file, no retries)."""
        p = self._fs_path(path)
        if any(c in mode for c in "wax") and not self.is_object_store:
            self.fs.makedirs(posixpath.dirname(p), exist_ok=True)
        return self.fs.open(p, mode, **kwargs)

    def write_json(self, path: str, obj: Any, *, indent: int | None = 2) -> None:
        text = json.dumps(obj, indent=indent, default=_json_default)
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
            raise self._access_error(exc) from exc

    def _access_error(self, exc: BaseException) -> Exception:
        url = self.url()
        detail = self._redact(_describe(exc))
        if self.is_local and isinstance(exc, PermissionError):
            return PermissionError(self._redact(
                f"no write permission for the run directory {url} ({detail}); choose a writable "
                "directory with storage=... or fix the directory's permissions"))
        if isinstance(exc, PermissionError) or _is_credentials_error(exc):
            return PermissionError(self._redact(
                f"no credentials / access denied for {url}: {_credentials_hint(self.spec)} ({detail})"))
        if isinstance(exc, FileNotFoundError) and self.is_object_store:
            bucket = self.root.lstrip("/").split("/", 1)[0]
            return FileNotFoundError(self._redact(
                f"bucket {bucket!r} for {url} does not exist; create it or change storage ({detail})"))
        if _is_connection_error(exc):
            where = ("the endpoint in storage_options['client_kwargs']['endpoint_url']"
                     if isinstance(self.spec.options.get("client_kwargs"), Mapping)
                     and "endpoint_url" in self.spec.options["client_kwargs"] else "the storage endpoint")
            return ConnectionError(self._redact(
                f"cannot reach {where} for {url} ({detail}); check that it is up and reachable from "
                "this machine, or change storage / storage_options"))
        if isinstance(exc, (FileNotFoundError, NotADirectoryError, FileExistsError)):
            return type(exc)(self._redact(f"cannot create the run directory {url} ({detail}); change storage"))
        return OSError(self._redact(f"storage check failed for {url} ({detail})"))


def _credentials_hint(spec: StorageSpec) -> str:
    proto = spec.protocol
    if proto in ("s3", "s3a"):
        return ("pass storage_options={'key': ..., 'secret': ...} (or 'profile': ...) or set "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment")
    if proto in ("gs", "gcs"):
        return "pass storage_options={'token': ...} or set GOOGLE_APPLICATION_CREDENTIALS"
    if proto in ("abfs", "abfss", "az", "adl"):
        return ("pass storage_options={'account_name': ..., 'account_key': ...} or set "
                "AZURE_STORAGE_CONNECTION_STRING")
    return "pass the credentials in storage_options=..."


def _atomic_local_write(path: str, data: bytes) -> None:
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def check_access(spec: StorageSpec) -> RunStorage:
    """Open ``spec`` and run :meth:`RunStorage.check_access`; returns the storage.

    Raises:
        ValueError: Unknown protocol or missing fsspec backend (names the package to install).
        ConnectionError, FileNotFoundError, PermissionError, OSError: see ``RunStorage.check_access``.
    """
    storage = spec.open()
    storage.check_access()
    return storage


# ----------------------------------------------------------------------------------------------
# events.jsonl

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

    def append(self, type: str, epoch: int | None = None, step: int | None = None, **fields: Any) -> dict:
        """Record one event; returns the dict written. Fields named like a common key are dropped (logged)."""
        clash = sorted(k for k in fields if k in _RESERVED_EVENT_KEYS)
        if clash:
            log.warning("event %r: fields %s clash with the common keys and are dropped", type, clash)
        record = {"time": round(time.time(), 3), "attempt": self.attempt, "epoch": epoch,
                  "step": step, "type": type}
        extra = {k: v for k, v in fields.items() if k not in _RESERVED_EVENT_KEYS}
        record.update(_redact_values(extra, self.storage.spec.options))
        line = json.dumps(record, default=_json_default)
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
    text = redact(json.dumps(_redact_values(data, options), indent=2, default=_json_default), options)
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


def is_local(storage: RunStorage) -> bool:
    """Whether the run directory is on a local filesystem (then every node must share it)."""
    return storage.is_local


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


__all__ = [
    "DEFAULT_STORAGE", "EVENTS_JSONL", "RUN_JSON", "EventLog", "RunStorage", "StorageSpec",
    "bump_attempt", "can_read_marker", "check_access", "is_local", "public_config", "read_events",
    "redact", "versions", "write_marker", "write_run_json",
]


def update_run_json(storage: RunStorage, **fields: Any) -> dict:
    """Set top-level fields of run.json (e.g. ``status``), keeping the rest."""
    data = _read_run_json(storage)
    data.update(fields)
    return _write_run_json_dict(storage, data)


def run_status(storage: RunStorage) -> str | None:
    """The ``status`` recorded in run.json (``running``, ``finished``, ``failed``, ``preempted``), if any."""
    return _read_run_json(storage).get("status")
