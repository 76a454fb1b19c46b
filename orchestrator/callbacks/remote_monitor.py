"""POST each epoch's cluster-wide logs to an HTTP server (Keras 3 ``RemoteMonitor``), off the training path."""

from __future__ import annotations

import collections
import ipaddress
import json
import math
import queue
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
from typing import Any, Callable, Mapping

from orchestrator.callbacks.base import Callback
from orchestrator.core.redaction import redact

_STOP = object()  # tells the sender thread that training ended


class RemoteMonitor(Callback):
    """Send each epoch's logs to a server with an HTTP POST, without ever slowing training down.

    Runs once for the whole cluster, on the coordinator, on the aggregated logs. The request is
    Keras 3's: a POST to ``root + path`` whose data is ``{"epoch": epoch, **logs}`` (0-based
    epoch), either as a JSON body (``send_as_json=True``, ``Content-Type: application/json``) or
    as the JSON text in the form field ``field`` (``application/x-www-form-urlencoded``).
    Non-finite values are written ``NaN``/``Infinity`` (Python's ``json``).

    Unlike Keras, the POST is not made in ``on_epoch_end``: the hook queues the payload and
    returns, and a background thread sends the queue in order, each request with a timeout of
    ``timeout_s`` seconds (per connection attempt and per read). A slow, hanging or dead server
    therefore never holds the epoch barrier. A request that fails (the server cannot be reached,
    times out, or answers with an HTTP error status, which Keras ignores) gives a warning at the
    next hook (``UserWarning``, recorded as a ``warning`` event and re-issued on the driver), and
    training goes on. ``on_train_end`` waits at most ``drain_timeout_s`` seconds for the queue to
    be sent, then warns about what is left and drops it.

    Like Keras, ``root`` must be an ``http``/``https`` URL and ``path`` may not change its host;
    a host that resolves to a link-local address (cloud metadata services, 169.254.0.0/16 and
    fe80::/10) is refused at request time. Header values never appear in warnings or events
    (``headers`` may carry a token); nothing of this callback is saved in backups.

    After a restart or a rollback, a replayed epoch is sent again with the logs that count: a
    server that keys rows by ``epoch`` keeps the last one.

    Args:
        root: Root URL of the server. Defaults to ``"http://localhost:9000"``.
        path: Path relative to ``root`` to which the events are sent.
            Defaults to ``"/publish/epoch/end/"``.
        field: Form field under which the JSON text is sent (when ``send_as_json=False``).
            Defaults to ``"data"``.
        headers: Extra HTTP headers, e.g. ``{"Authorization": "Bearer ..."}``. Defaults to ``None``.
        send_as_json: Send the data as a JSON body. Defaults to ``False``.
        timeout_s: Beyond Keras: seconds each request may wait for the server (connecting, and
            each read). Defaults to ``5.0``.
        drain_timeout_s: Beyond Keras: seconds ``on_train_end`` waits for the requests still
            queued. Defaults to ``10.0``.

    Example:
        >>> monitor = RemoteMonitor(root="http://dashboard.internal:9000", send_as_json=True,
        ...                         headers={"Authorization": "Bearer <token>"})
        >>> # Trainer(..., callbacks=[monitor]).fit(epochs=10) POSTs
        >>> # {"epoch": 0, "learning_rate": 0.1, "loss": 0.69, ...} after each epoch.
    """

    def __init__(self, root: str = "http://localhost:9000", path: str = "/publish/epoch/end/", field: str = "data",
                 headers: Mapping[str, str] | None = None, send_as_json: bool = False, *,
                 timeout_s: float = 5.0, drain_timeout_s: float = 10.0) -> None:
        super().__init__()
        _check_url(root, path)
        if not isinstance(field, str) or not field:
            raise ValueError(f"RemoteMonitor: field must be a non-empty string (the form field), got {field!r}")
        if headers is not None and not (isinstance(headers, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
            raise ValueError("RemoteMonitor: headers must be None or a dict of str to str, e.g. "
                             f"{{'Authorization': 'Bearer ...'}}, got a {type(headers).__name__}")
        if not isinstance(send_as_json, bool):
            raise ValueError(f"RemoteMonitor: send_as_json must be True or False, got {send_as_json!r}")
        for name, value, low in (("timeout_s", timeout_s, "> 0"), ("drain_timeout_s", drain_timeout_s, ">= 0")):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and (value > 0 if low == "> 0" else value >= 0)
            if not ok:
                raise ValueError(f"RemoteMonitor: {name} must be a number of seconds {low}, got {value!r}")
        self.root = root
        self.path = path
        self.field = field
        self.headers = dict(headers) if headers is not None else None
        self.send_as_json = send_as_json
        self.timeout_s = float(timeout_s)
        self.drain_timeout_s = float(drain_timeout_s)
        self._reset_sender()

    def _reset_sender(self) -> None:
        self._sender: _Sender | None = None
        self._failures: collections.deque[str] = collections.deque()  # appended by the sender thread

    def __getstate__(self) -> dict[str, Any]:  # threads and queues stay in the process that made them
        state = dict(self.__dict__)
        state.pop("_sender", None)
        state.pop("_failures", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_sender()

    def __repr__(self) -> str:
        headers = None if self.headers is None else sorted(self.headers)  # names only: values may be secrets
        return f"RemoteMonitor(root={redact(self.root)!r}, path={self.path!r}, headers={headers})"

    # -- hooks -----------------------------------------------------------------------------
    def on_train_begin(self, logs: dict | None = None) -> None:
        self._warn_failures()
        if self._sender is None:
            self._sender = _Sender(self._send_one)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._warn_failures()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._warn_failures()
        send = {"epoch": epoch, **{k: _plain(v) for k, v in (logs or {}).items()}}
        text = json.dumps(send, default=str)
        if self.send_as_json:
            body, content_type = text.encode(), "application/json"
        else:
            body = urllib.parse.urlencode({self.field: text}).encode()
            content_type = "application/x-www-form-urlencoded"
        if self._sender is None:  # called without on_train_begin (unit tests): start the sender now
            self._sender = _Sender(self._send_one)
        self._sender.put((epoch, body, content_type))

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._sender is not None:
            left = self._sender.close(self.drain_timeout_s)
            self._sender = None
            if left:
                self._failures.append(f"RemoteMonitor: {left} epoch payload(s) to {self._where()} still pending "
                                      f"drain_timeout_s={self.drain_timeout_s:g}s after training ended; given up")
        self._warn_failures()

    # -- on the sender thread --------------------------------------------------------------
    def _send_one(self, item: tuple[int, bytes, str]) -> None:
        epoch, body, content_type = item
        try:
            self._post(body, content_type)
        except urllib.error.HTTPError as exc:
            self._failures.append(self._clean(
                f"RemoteMonitor: the server at {self._where()} answered HTTP {exc.code} ({exc.reason}) to the "
                f"logs of epoch {epoch}"))
        except Exception as exc:  # noqa: BLE001 - any failure warns; training goes on
            self._failures.append(self._clean(
                f"Could not reach RemoteMonitor root server at {self.root} (epoch {epoch}: "
                f"{type(exc).__name__}: {getattr(exc, 'reason', exc)})"))

    def _post(self, body: bytes, content_type: str) -> None:
        _refuse_link_local(urllib.parse.urlparse(self.root).hostname or "")
        request = urllib.request.Request(self.root + self.path, data=body, method="POST",
                                         headers={"Content-Type": content_type, **(self.headers or {})})  # yours win
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            response.read()

    # -- warnings (issued on the hook's thread, where the coordinator records them) --------
    def _warn_failures(self) -> None:
        while self._failures:
            warnings.warn(self._failures.popleft(), stacklevel=3)

    def _where(self) -> str:
        return redact(self.root + self.path)

    def _clean(self, message: str) -> str:
        return redact(message, {"headers": self.headers or {}})


class _Sender:
    """A daemon thread that sends queued payloads in order, and counts those not done yet.

    Args:
        send: Sends one payload; called on the thread, must not raise.
    """

    def __init__(self, send: Callable[[Any], None]) -> None:
        self.queue: queue.Queue = queue.Queue()
        self.abandon = threading.Event()
        self.lock = threading.Lock()
        self.pending = 0  # put and not yet sent (or dropped)
        self.thread = threading.Thread(target=self._run, args=(send,), name="RemoteMonitor", daemon=True)
        self.thread.start()

    def put(self, item: Any) -> None:
        with self.lock:
            self.pending += 1
        self.queue.put(item)

    def close(self, timeout_s: float) -> int:
        """End the thread once the queue is sent, waiting at most ``timeout_s``; return the payloads
        still pending then (the thread drops them, but the one in flight)."""
        self.queue.put(_STOP)
        self.thread.join(timeout_s)
        with self.lock:
            left = self.pending
        if left:
            self.abandon.set()
        return left

    def _run(self, send: Callable[[Any], None]) -> None:
        while (item := self.queue.get()) is not _STOP:
            try:
                if not self.abandon.is_set():
                    send(item)
            finally:
                with self.lock:
                    self.pending -= 1


def _check_url(root: Any, path: Any) -> None:
    """Keras's checks: an http(s) root with a host, and a path that does not change the host."""
    if not isinstance(root, str) or not isinstance(path, str):
        raise ValueError(f"RemoteMonitor: root and path must be strings, got root={root!r}, path={path!r}")
    parsed = urllib.parse.urlparse(root)
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"RemoteMonitor: invalid URL scheme {parsed.scheme!r} in root={redact(root)!r}; only "
                         "'http' and 'https' are allowed, e.g. root='http://localhost:9000'")
    if not parsed.hostname:
        raise ValueError(f"RemoteMonitor: root={redact(root)!r} has no host; e.g. root='http://localhost:9000'")
    combined = urllib.parse.urlparse(root + path).hostname
    if combined != parsed.hostname:
        raise ValueError(f"RemoteMonitor: path={path!r} changes the host of root ({parsed.hostname!r} becomes "
                         f"{combined!r}); a path may not contain '@', a scheme or other authority characters")


def _refuse_link_local(hostname: str) -> None:
    """Refuse hosts that resolve to link-local addresses (cloud metadata services), as Keras does."""
    for info in socket.getaddrinfo(hostname, None):
        try:
            ip = ipaddress.ip_address(info[4][0])
        except ValueError:
            continue
        if ip.is_link_local:
            raise ValueError(f"requests to link-local addresses are not allowed: {hostname!r} resolves to {ip}")


def _plain(value: Any) -> Any:
    """A value JSON can write: numpy scalars and 0-d arrays by their Python value."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 0) == 0 and not isinstance(value, (int, float, str)):
        try:
            return item()
        except (TypeError, ValueError):
            return value
    return value
