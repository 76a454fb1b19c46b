"""An S3 endpoint for tests: moto's threaded server on 127.0.0.1 and a fresh bucket per test.

Use from a test module (``from s3_server import s3_server, s3_bucket  # noqa: F401``) or from
conftest.py (``pytest_plugins = ["s3_server"]``, with tests/ on sys.path).

Fixtures:
    s3_server: session-scoped :class:`S3Server` (``endpoint_url``, ``storage_options()``,
        ``make_bucket()``, ``url()``, ``stop()`` / ``start()`` on the same port,
        ``enforce_credentials()`` to make it reject unknown access keys).
    s3_bucket: a new, empty bucket name for one test.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from contextlib import contextmanager
from typing import Iterator

import pytest

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
_ENV_DEFAULTS = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind to port 0 and let it go)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class S3Server:
    """A moto S3 server on ``host:port``; state (buckets, objects) survives ``stop()`` / ``start()``."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._server = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Start (or restart, on the same port) the server; returns once it accepts requests."""
        from moto.server import ThreadedMotoServer

        if self._server is None:
            server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
            server.start()
            self._server = server

    def stop(self) -> None:
        """Stop serving: requests get "connection refused" until :meth:`start`."""
        if self._server is not None:
            server, self._server = self._server, None
            server.stop()

    def storage_options(self, bucket: str | None = None, **extra) -> dict:
        """``storage_options`` for s3fs against this server (``bucket`` is accepted for symmetry, unused)."""
        options = {
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": REGION},
        }
        options.update(extra)
        return options

    def url(self, bucket: str, *parts: str) -> str:
        return "/".join(["s3:/", bucket, *parts])

    @contextmanager
    def enforce_credentials(self) -> Iterator[None]:
        """While inside, the (in-process) server checks credentials like IAM: unknown keys are rejected."""
        from moto.core.authorization import enable_iam_authentication

        with enable_iam_authentication():
            yield

    def make_bucket(self, name: str) -> str:
        import boto3

        client = boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, region_name=REGION,
        )
        client.create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server for the whole session; AWS_* test credentials are set only while it runs."""
    pytest.importorskip("moto.server", reason="pip install 'moto[server]' to run the S3 tests")
    pytest.importorskip("s3fs", reason="pip install s3fs to run the S3 tests")
    saved = {name: os.environ.get(name) for name in _ENV_DEFAULTS}
    werkzeug_log = logging.getLogger("werkzeug")
    saved_level = werkzeug_log.level
    werkzeug_log.setLevel(logging.ERROR)  # no access log line per request
    os.environ.update(_ENV_DEFAULTS)
    server = S3Server()
    try:
        server.start()
        yield server
    finally:
        server.stop()
        werkzeug_log.setLevel(saved_level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh bucket (its name) for this test; the server is restarted first if a test left it stopped."""
    if not s3_server.running:
        s3_server.start()
    return s3_server.make_bucket(f"test-{uuid.uuid4().hex[:16]}")
