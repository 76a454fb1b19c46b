"""RemoteMonitor against real HTTP servers on 127.0.0.1: Keras's payloads, sent off the training path.

The servers are ``http.server`` in a thread. Tests about slow servers assert invariants (a hook
returned while the server was still blocked on an Event), never timings.
"""

from __future__ import annotations

import http.server
import json
import pickle
import threading
import urllib.parse
import warnings
from dataclasses import dataclass, field

import pytest

import workloads
from callback_helpers import fit
from orchestrator import Trainer
from orchestrator.callbacks import RemoteMonitor
from orchestrator.core.events import EventType
from orchestrator.storage.fs import StorageSpec
from orchestrator.storage.run_files import read_events
from s3_server import free_port

SECRET = "Bearer s3cr3t-token-value"


@dataclass
class Server:
    """An HTTP server that records each POST and answers ``status`` (after ``release`` when ``hang``)."""

    status: int = 200
    hang: bool = False
    requests: list[dict] = field(default_factory=list)
    entered: threading.Event = field(default_factory=threading.Event)  # a request reached the handler
    release: threading.Event = field(default_factory=threading.Event)  # a hanging handler may answer

    def start(self) -> "Server":
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                owner.entered.set()
                if owner.hang:
                    owner.release.wait(60)
                # the reason phrase echoes the Authorization header: it must never reach a warning
                self.send_response(owner.status, f"echo {self.headers.get('Authorization')}")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        return self

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def payloads(self, field_name="data"):
        out = []
        for r in self.requests:
            if r["headers"].get("Content-Type") == "application/json":
                out.append(json.loads(r["body"]))
            else:
                out.append(json.loads(urllib.parse.parse_qs(r["body"].decode())[field_name][0]))
        return out


@pytest.fixture
def server():
    s = Server().start()
    yield s
    s.stop()


def epoch_logs(epoch):
    return {"loss": 1.0 / (epoch + 1), "val_loss": 2.0 + epoch, "learning_rate": 0.1}


# -- payloads ------------------------------------------------------------------------------------


@pytest.mark.parametrize("send_as_json", [False, True])
def test_each_epoch_is_posted_with_keras_payload(server, send_as_json):
    cb = RemoteMonitor(root=server.root, path="/metrics/", field="payload", headers={"Authorization": SECRET},
                       send_as_json=send_as_json)
    cb.on_train_begin({})
    for epoch in range(3):
        cb.on_epoch_begin(epoch, {})
        cb.on_epoch_end(epoch, epoch_logs(epoch))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.on_train_end({})  # waits for the queue: every request has been answered
    assert server.payloads("payload") == [{"epoch": e, **epoch_logs(e)} for e in range(3)]
    assert [r["path"] for r in server.requests] == ["/metrics/"] * 3
    expected_type = "application/json" if send_as_json else "application/x-www-form-urlencoded"
    assert {r["headers"]["Content-Type"] for r in server.requests} == {expected_type}
    assert {r["headers"]["Authorization"] for r in server.requests} == {SECRET}


def test_non_finite_values_are_sent_as_json_nan_and_infinity(server):
    cb = RemoteMonitor(root=server.root, send_as_json=True)
    cb.on_train_begin({})
    cb.on_epoch_end(0, {"loss": float("nan"), "val_loss": float("inf")})
    cb.on_train_end({})
    assert server.requests[0]["body"] == b'{"epoch": 0, "loss": NaN, "val_loss": Infinity}'


# -- a slow, failing or dead server never stops training -------------------------------------------


def test_epoch_hooks_return_while_the_server_hangs_and_train_end_waits_a_bounded_time():
    server = Server(hang=True).start()
    try:
        cb = RemoteMonitor(root=server.root, timeout_s=120, drain_timeout_s=0.05)
        cb.on_train_begin({})
        cb.on_epoch_end(0, epoch_logs(0))
        assert server.entered.wait(60)  # the POST of epoch 0 is in the server, which holds it
        cb.on_epoch_begin(1, {})
        cb.on_epoch_end(1, epoch_logs(1))
        sender = cb._sender.thread
        with pytest.warns(UserWarning, match=r"2 epoch payload\(s\) to http://127\.0\.0\.1:\d+/publish/epoch/end/ "
                                             r"still pending drain_timeout_s=0.05s after training ended"):
            cb.on_train_end({})
        assert not server.release.is_set()  # every hook returned while the server was still blocked
        assert len(server.requests) == 1
    finally:
        server.stop()
    sender.join(60)
    assert not sender.is_alive()  # once answered, the sender drops what was left and ends
    assert len(server.requests) == 1


def test_a_request_to_a_hanging_server_times_out_and_warns():
    server = Server(hang=True).start()
    try:
        cb = RemoteMonitor(root=server.root, timeout_s=0.2, drain_timeout_s=60)
        cb.on_train_begin({})
        cb.on_epoch_end(0, epoch_logs(0))
        with pytest.warns(UserWarning, match=r"Could not reach RemoteMonitor root server at http://127\.0\.0\.1:\d+ "
                                             r"\(epoch 0: .*timed out"):
            cb.on_train_end({})
        assert not server.release.is_set()
    finally:
        server.stop()


def test_an_http_error_becomes_a_warning_event_without_header_values_and_training_goes_on():
    server = Server(status=500).start()
    try:
        cb = RemoteMonitor(root=server.root, headers={"Authorization": SECRET})
        with pytest.warns(UserWarning) as caught:
            run = fit([cb], [epoch_logs(e) for e in range(3)])
    finally:
        server.stop()
    assert run.epochs_run == 3 and not run.stopped
    assert len(server.requests) == 3 and server.payloads() == [{"epoch": e, **run.logs[e]} for e in range(3)]
    messages = [str(w.message) for w in caught if "RemoteMonitor" in str(w.message)]
    assert len(messages) == 3
    assert all("answered HTTP 500" in m for m in messages)
    assert sorted(int(m.rsplit(" ", 1)[1]) for m in messages) == [0, 1, 2]  # "... to the logs of epoch N"
    assert all(SECRET not in m and "s3cr3t" not in m for m in messages)


def test_a_dead_server_warns_as_keras_does(tmp_path):
    cb = RemoteMonitor(root=f"http://127.0.0.1:{free_port()}")
    cb.on_train_begin({})
    cb.on_epoch_end(0, epoch_logs(0))
    with pytest.warns(UserWarning, match=r"Could not reach RemoteMonitor root server at http://127\.0\.0\.1"):
        cb.on_train_end({})


def test_a_link_local_host_is_refused_at_request_time():
    cb = RemoteMonitor(root="http://169.254.169.254")
    cb.on_train_begin({})
    cb.on_epoch_end(0, epoch_logs(0))
    with pytest.warns(UserWarning, match="link-local addresses are not allowed"):
        cb.on_train_end({})


# -- arguments and wiring ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(root="ftp://host"), "invalid URL scheme 'ftp'"),
    (dict(root="localhost:9000"), "invalid URL scheme"),
    (dict(root="http://"), "has no host"),
    (dict(root=3), "root and path must be strings"),
    (dict(path="@evil.example.com/x"), "path='@evil.example.com/x' changes the host"),
    (dict(field=""), "field must be a non-empty string"),
    (dict(headers={"X-Token": 3}), "headers must be None or a dict of str to str"),
    (dict(headers=["a"]), "headers must be None or a dict of str to str"),
    (dict(send_as_json="yes"), "send_as_json must be True or False"),
    (dict(timeout_s=0), "timeout_s must be a number of seconds > 0"),
    (dict(timeout_s=float("nan")), "timeout_s must be a number of seconds > 0"),
    (dict(drain_timeout_s=-1), "drain_timeout_s must be a number of seconds >= 0"),
])
def test_bad_arguments_raise_a_clear_error_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=f"RemoteMonitor: .*{match}"):
        RemoteMonitor(**kwargs)


def test_it_pickles_without_its_thread_and_never_shows_header_values(server):
    cb = RemoteMonitor(root=server.root, headers={"Authorization": SECRET})
    cb.on_train_begin({})
    copy = pickle.loads(pickle.dumps(cb))
    assert copy._sender is None and copy.headers == {"Authorization": SECRET}
    assert SECRET not in repr(cb) and "Authorization" in repr(cb)
    assert cb.state_dict() == {}  # nothing of it goes into backups
    cb.on_train_end({})


@pytest.mark.timeout(180)
def test_a_real_fit_posts_each_epochs_cluster_wide_logs(ray_cluster, server, tmp_path):
    trainer = Trainer(model=workloads.tiny_model, optimizer=workloads.sgd, loss=workloads.cross_entropy,
                      data=workloads.odd_data, metrics=["accuracy"], batch_size=16, num_workers=2, seed=0,
                      storage=str(tmp_path), run_name="remote",
                      callbacks=[RemoteMonitor(root=server.root, send_as_json=True,
                                               headers={"Authorization": SECRET})])
    history = trainer.fit(epochs=2, verbose=0)
    payloads = server.payloads()
    assert [p["epoch"] for p in payloads] == [0, 1]
    for p in payloads:
        assert set(p) == {"epoch", *history.history}
        for key, values in history.history.items():
            assert p[key] == pytest.approx(values[p["epoch"]], rel=1e-12)
    assert not [e for e in history.events if e["type"] == EventType.WARNING]
    storage = StorageSpec(str(tmp_path), "remote").open()
    assert SECRET not in storage.read_bytes("run.json").decode() and SECRET not in json.dumps(read_events(storage))
