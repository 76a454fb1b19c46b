"""Where a run lives: :class:`StorageSpec`, the picklable ``<url>/<run_name>/`` that every process opens.

This module owns the run's address and how it becomes a filesystem: normalising the URL (a plain
path, ``file://`` or any fsspec URL; ``~/orchestrator_results`` by default), validating the run
name and ``storage_options``, redacting both for display, adding bounded S3 client timeouts, and
turning an unknown protocol or a missing fsspec backend into an error that names the package to
install. :meth:`StorageSpec.open` returns the :class:`~orchestrator.storage.fs.RunStorage` that
does the I/O.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import fsspec

from orchestrator.core.config import validate_run_name
from orchestrator.core.redaction import public_config, redact

if TYPE_CHECKING:
    from orchestrator.storage.fs import RunStorage

#: Where runs go when ``storage`` is not given (expanded to an absolute path of the driver's home).
DEFAULT_STORAGE = "~/orchestrator_results"

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
        run_name: The run directory's name (1-128 letters, digits, ``.``, ``_`` or ``-``, starting
            with a letter or digit); the same storage and run_name resume a run. Defaults to ``"run"``.
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
        validate_run_name(self.run_name)
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

    def check_shared(self) -> "StorageSpec":
        """Return self if processes other than this one can reach the storage (not ``memory://``).

        Raises:
            ValueError: The storage lives inside this process.
        """
        if self.protocol == "memory":
            raise ValueError("storage: memory:// lives inside one process and the workers cannot share it; "
                             "use a local path, file:// or an object store such as s3://")
        return self

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
        from orchestrator.storage.fs import RunStorage  # here, not at the top: fs.py imports this module

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
