"""orchestrator.storage.fs on real filesystems: a local tmp dir, memory://, and S3 on a moto server."""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading
import time
import traceback
import uuid

import pytest

from orchestrator.core.events import EventType
from orchestrator.core.redaction import public_config, redact
from orchestrator.storage.run_files import (
    EventLog,
    bump_attempt,
    can_read_marker,
    read_events,
    write_marker,
    write_run_json,
)
from orchestrator.storage.checkpoint import latest_valid
from orchestrator.storage.fs import StorageSpec, check_access
from s3_server import free_port, s3_bucket, s3_server  # noqa: F401

SECRET = "s3cr3t-VALUE-do-not-leak"
KEY_ID = "AKIDLEAKCHECK0001"


def _memory_url() -> str:
    return f"memory://orchestrator-tests/{uuid.uuid4().hex}"


@pytest.fixture(params=["local", "memory", "s3"])
def storage(request, tmp_path):
    """The same run directory API on each real backend."""
    if request.param == "local":
        return StorageSpec(str(tmp_path / "runs"), "run").open()
    if request.param == "memory":
        return StorageSpec(_memory_url(), "run").open()
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return StorageSpec(f"s3://{bucket}/runs", "run", server.storage_options(bucket)).open()


def _s3_spec(server, bucket, run_name="run", **extra) -> StorageSpec:
    options = server.storage_options(bucket, key=KEY_ID, secret=SECRET)
    options.update(extra)
    return StorageSpec(f"s3://{bucket}/runs", run_name, options)


# -- paths -------------------------------------------------------------------------------------


def test_a_relative_path_resolves_under_the_run_directory(tmp_path):
    storage = StorageSpec(str(tmp_path), "digits").open()
    assert storage.url() == str(tmp_path / "digits")
    assert storage.resolve("checkpoints/best.pt") == str(tmp_path / "digits" / "checkpoints" / "best.pt")
    assert storage.resolve("a/../b.pt") == str(tmp_path / "digits" / "b.pt")
    assert storage.url("logs", "x.csv") == str(tmp_path / "digits" / "logs" / "x.csv")


@pytest.mark.parametrize("path", ["../other/x.pt", "a/../../x.pt", ".."])
def test_a_path_escaping_the_run_directory_with_dotdot_is_rejected(tmp_path, path):
    storage = StorageSpec(str(tmp_path), "digits").open()
    with pytest.raises(ValueError, match="escapes the run directory"):
        storage.resolve(path)
    with pytest.raises(ValueError, match="escapes the run directory"):
        storage.write_bytes(path, b"x")


def test_an_absolute_url_on_the_same_filesystem_stays_as_is(tmp_path):
    local = StorageSpec(str(tmp_path), "r").open()
    assert local.resolve(str(tmp_path / "elsewhere.pt")) == str(tmp_path / "elsewhere.pt")
    memory = StorageSpec(_memory_url(), "r").open()
    assert memory.resolve("memory://somewhere/x.pt") == "memory://somewhere/x.pt"
    memory.write_bytes("memory://somewhere-" + uuid.uuid4().hex + "/x.pt", b"1")


@pytest.mark.parametrize("url", ["s3://bucket/x.pt", "gcs://bucket/x.pt", "memory://x.pt"])
def test_a_url_on_another_protocol_is_rejected(tmp_path, url):
    storage = StorageSpec(str(tmp_path), "r").open()
    with pytest.raises(ValueError, match="protocol"):
        storage.resolve(url)


def test_a_local_absolute_path_is_rejected_on_an_object_store(s3_server, s3_bucket):
    storage = StorageSpec(f"s3://{s3_bucket}", "r", s3_server.storage_options()).open()
    with pytest.raises(ValueError, match="protocol 'file'"):
        storage.resolve("/tmp/best.pt")
    assert storage.resolve("s3a://other/x") == "s3a://other/x"


def test_the_default_storage_is_an_absolute_path_under_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = StorageSpec(None, "r")
    assert spec.url == str(tmp_path / "orchestrator_results")
    assert spec.open().url() == str(tmp_path / "orchestrator_results" / "r")


def test_plain_relative_paths_and_file_urls_are_local_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert StorageSpec("results", "r").url == str(tmp_path / "results")
    assert StorageSpec(f"file://{tmp_path}/results/", "r").url == str(tmp_path / "results")
    storage = StorageSpec(f"file://{tmp_path}/results", "r").open()
    assert storage.is_local
    storage.write_bytes("a.txt", b"hi")
    assert (tmp_path / "results" / "r" / "a.txt").read_bytes() == b"hi"


@pytest.mark.parametrize("run_name", ["", "a/b", "..", None])
def test_a_run_name_that_is_not_a_plain_name_is_rejected(run_name):
    with pytest.raises(ValueError, match="run_name"):
        StorageSpec("/tmp/x", run_name)


# -- file operations on each backend ----------------------------------------------------------


def test_files_round_trip_and_list_on_every_backend(storage):
    storage.makedirs()
    storage.write_bytes("backup/step-1/model.bin", b"\x00\x01")
    storage.write_json("backup/step-1/manifest.json", {"step": 1})
    storage.write_bytes("run.txt", b"hello")
    assert storage.read_bytes("backup/step-1/model.bin") == b"\x00\x01"
    assert storage.read_json("backup/step-1/manifest.json") == {"step": 1}
    assert storage.size("run.txt") == 5
    assert storage.exists("run.txt") and not storage.exists("nope.txt")
    assert storage.listdir() == ["backup", "run.txt"]
    assert storage.listdir("backup/step-1") == ["manifest.json", "model.bin"]
    storage.write_bytes("run.txt", b"bye")  # overwrite
    assert storage.read_bytes("run.txt") == b"bye"
    storage.rm("backup", recursive=True)
    storage.rm("run.txt")
    assert storage.listdir() == []


def test_reading_a_missing_file_raises_file_not_found_at_once_naming_its_url(storage):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes("missing.bin")
    assert time.monotonic() - start < 1  # not retried
    assert str(info.value).startswith(f"read {storage.url('missing.bin')}: ")


def test_listdir_of_a_missing_directory_is_empty_and_rm_of_a_missing_file_is_logged(storage, caplog):
    assert storage.listdir("never/created") == []
    with caplog.at_level(logging.INFO, logger="orchestrator.storage.fs"):
        storage.rm("never/created.bin")
    if storage.is_local:  # s3fs and memory:// treat deleting a missing key as success
        assert any("already gone" in r.getMessage() for r in caplog.records)


def test_a_local_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    storage = StorageSpec(str(tmp_path), "r").open()
    storage.write_bytes("ck/a.pt", b"1" * 1000)
    storage.write_bytes("ck/a.pt", b"2")
    assert os.listdir(tmp_path / "r" / "ck") == ["a.pt"]
    assert (tmp_path / "r" / "ck" / "a.pt").read_bytes() == b"2"


def test_specs_and_storages_survive_pickling_for_workers(s3_server, s3_bucket):
    spec = _s3_spec(s3_server, s3_bucket)
    storage = spec.open(retries=1, backoff_s=0.1)
    storage.write_bytes("x", b"1")
    again = pickle.loads(pickle.dumps(storage))
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert (again.retries, again.backoff_s) == (1, 0.1)
    assert again.read_bytes("x") == b"1"


def test_a_marker_written_by_the_driver_is_readable_through_the_spec(tmp_path):
    spec = StorageSpec(str(tmp_path), "r")
    storage = spec.open()
    name = write_marker(storage)
    assert name.startswith(".marker-")
    assert can_read_marker(spec, name)
    assert not can_read_marker(spec, ".marker-missing")
    assert not can_read_marker(StorageSpec(str(tmp_path / "other-node"), "r"), name)
    assert storage.is_local and not StorageSpec(_memory_url(), "r").open().is_local


# -- check_access ------------------------------------------------------------------------------


def test_check_access_passes_and_leaves_nothing_behind_on_every_backend(storage):
    storage.check_access()
    assert storage.listdir() == []


def test_check_access_on_an_unreachable_endpoint_raises_connection_error_quickly(s3_bucket, s3_server):
    dead = f"http://127.0.0.1:{free_port()}"
    spec = StorageSpec(f"s3://{s3_bucket}/runs", "r", {
        "key": KEY_ID, "secret": SECRET, "client_kwargs": {"endpoint_url": dead, "region_name": "us-east-1"}})
    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        check_access(spec)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert f"s3://{s3_bucket}/runs/r" in message and "endpoint_url" in message
    assert SECRET not in message and KEY_ID not in message and dead not in message


def test_check_access_on_a_missing_bucket_raises_file_not_found(s3_server):
    spec = _s3_spec(s3_server, "no-such-bucket-" + uuid.uuid4().hex[:8])
    with pytest.raises(FileNotFoundError, match="does not exist; create it or change storage") as info:
        check_access(spec)
    assert spec.url in str(info.value)
    assert SECRET not in str(info.value) and KEY_ID not in str(info.value)


def test_check_access_without_credentials_raises_permission_error(s3_server, s3_bucket, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    endpoint = s3_server.endpoint_url
    spec = StorageSpec(f"s3://{s3_bucket}/runs", "r", {
        "anon": False, "skip_instance_cache": True,
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}})
    with pytest.raises(PermissionError, match="no credentials / access denied") as info:
        check_access(spec)
    message = str(info.value)
    assert f"s3://{s3_bucket}/runs/r" in message and "AWS_ACCESS_KEY_ID" in message and "storage_options" in message
    assert endpoint not in message


def test_check_access_with_rejected_credentials_raises_permission_error(s3_server, s3_bucket):
    spec = _s3_spec(s3_server, s3_bucket)
    with s3_server.enforce_credentials(), pytest.raises(PermissionError, match="access denied") as info:
        check_access(spec)
    message = str(info.value)
    assert f"s3://{s3_bucket}/runs/r" in message and "AWS_ACCESS_KEY_ID" in message
    assert SECRET not in message and KEY_ID not in message


def test_check_access_on_a_read_only_local_directory_raises_permission_error(tmp_path):
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        try:
            (parent / "probe").write_bytes(b"x")
        except PermissionError:
            pass
        else:
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod 0o500 does not block writes")
        with pytest.raises(PermissionError, match="no write permission") as info:
            check_access(StorageSpec(str(parent), "r"))
        assert str(parent / "r") in str(info.value)
    finally:
        parent.chmod(0o700)


def test_an_unknown_protocol_raises_value_error_naming_the_url():
    with pytest.raises(ValueError, match="unknown protocol 'nosuchproto'") as info:
        check_access(StorageSpec("nosuchproto://bucket/runs", "r"))
    assert "nosuchproto://bucket/runs/r" in str(info.value)


def test_a_missing_fsspec_backend_raises_value_error_naming_the_package():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed, so its absence cannot be shown")
    with pytest.raises(ValueError, match=r"pip install gcsfs") as info:
        check_access(StorageSpec("gs://bucket/runs", "r", {"token": SECRET}))
    assert "gs://bucket/runs/r" in str(info.value) and SECRET not in str(info.value)


# -- redaction ---------------------------------------------------------------------------------


def test_redact_removes_every_option_value_and_url_userinfo():
    options = {"key": KEY_ID, "secret": SECRET, "client_kwargs": {"endpoint_url": "https://u:pw@minio.local:9000"},
               "tokens": [SECRET + "-2"], "use_ssl": True, "acl": "rw"}
    text = (f"{KEY_ID} {SECRET} {SECRET}-2 https://u:pw@minio.local:9000 https://minio.local:9000 "
            f"ftp://bob:hunter2@host/x rw")
    out = redact(text, options)
    for leaked in (KEY_ID, SECRET, "minio.local", "hunter2", "bob", "u:pw"):
        assert leaked not in out
    assert "ftp://***@host/x" in out and out.endswith(" rw")  # short values are left alone


def test_public_config_lists_option_keys_never_values():
    keys = public_config({"key": KEY_ID, "secret": SECRET, "client_kwargs": {"endpoint_url": "http://h"}})
    assert keys == ["client_kwargs.endpoint_url", "key", "secret"]
    assert SECRET not in repr(StorageSpec("s3://b", "r", {"secret": SECRET}))


def test_run_json_records_config_versions_and_world_size_without_credentials(s3_server, s3_bucket):
    storage = _s3_spec(s3_server, s3_bucket).open()
    write_run_json(storage, {"num_workers": 2, "batch_size": 64, "note": f"key={KEY_ID}",
                             "storage_options": storage.spec.options, "loss": len})
    text = storage.read_bytes("run.json").decode()
    assert SECRET not in text and KEY_ID not in text and s3_server.endpoint_url not in text
    data = json.loads(text)
    assert data["world_size"] == 2 and data["config"]["batch_size"] == 64
    assert data["config"]["storage_options"] == ["client_kwargs.endpoint_url", "client_kwargs.region_name",
                                                 "key", "secret"]
    assert data["config"]["loss"] == "builtins.len"
    assert data["storage"] == f"s3://{s3_bucket}/runs/run"
    assert {"python", "torch", "ray", "fsspec", "orchestrator"} <= set(data["versions"])


def test_the_attempts_counter_in_run_json_counts_up_and_survives_rewrites(tmp_path):
    storage = StorageSpec(str(tmp_path), "r").open()
    assert bump_attempt(storage) == 1
    write_run_json(storage, {"num_workers": 1})
    assert bump_attempt(storage) == 2
    write_run_json(storage, {"world_size": 3})
    assert storage.read_json("run.json")["world_size"] == 3
    write_run_json(storage, {"num_workers": 1})
    assert storage.read_json("run.json")["attempts"] == 2
    assert storage.read_json("run.json")["world_size"] == 1


# -- events.jsonl ------------------------------------------------------------------------------


def test_events_append_locally_and_a_second_log_continues_the_file(tmp_path):
    storage = StorageSpec(str(tmp_path), "r", {"token": SECRET}).open()
    first = EventLog(storage, attempt=1)
    first.append("started", epoch=0)
    first.append("lr_changed", epoch=1, step=20, old=0.1, new=0.05, note=f"token {SECRET}")
    EventLog(storage, attempt=2).append("restored", epoch=1, step=20)
    events = read_events(storage)
    assert [(e["type"], e["attempt"], e["epoch"], e["step"]) for e in events] == [
        ("started", 1, 0, None), ("lr_changed", 1, 1, 20), ("restored", 2, 1, 20)]
    assert set(events[0]) == {"time", "attempt", "epoch", "step", "type"}
    assert events[1]["new"] == 0.05 and events[1]["note"] == "token ***"
    assert SECRET not in (tmp_path / "r" / "events.jsonl").read_text()


def test_events_on_s3_are_written_as_parts_and_a_resumed_run_continues_them(s3_server, s3_bucket):
    storage = _s3_spec(s3_server, s3_bucket).open()
    first = EventLog(storage, attempt=1)
    first.append("started", epoch=0)
    first.append("worker_failed", epoch=0, step=3, error=f"auth {SECRET} failed")
    second = EventLog(_s3_spec(s3_server, s3_bucket).open(), attempt=2, autoflush=False)
    second.append("restored", epoch=0, step=3)
    assert len(read_events(storage)) == 2  # not flushed yet
    second.flush()
    events = read_events(storage)
    assert [(e["type"], e["attempt"]) for e in events] == [("started", 1), ("worker_failed", 1), ("restored", 2)]
    parts = storage.listdir("events")
    assert len(parts) == 3 and all(SECRET not in storage.read_bytes(f"events/{p}").decode() for p in parts)


def test_events_take_the_vocabulary_members_and_write_their_string_values(tmp_path):
    storage = StorageSpec(str(tmp_path), "r").open()
    record = EventLog(storage, attempt=1).append(EventType.BACKUP_COMMITTED, epoch=0, step=8,
                                                 folder="backup/step-8", bytes=10, purged=[4])
    assert record["type"] == "backup_committed"
    assert '"type": "backup_committed"' in (tmp_path / "r" / "events.jsonl").read_text()


def test_an_unknown_event_type_is_rejected_naming_it(tmp_path):
    storage = StorageSpec(str(tmp_path), "r").open()
    with pytest.raises(ValueError, match="unknown event type 'lr_change'"):
        EventLog(storage, attempt=1).append("lr_change", epoch=0)
    assert read_events(storage) == []


def test_fields_not_declared_for_an_event_type_are_written_and_logged(tmp_path, caplog):
    storage = StorageSpec(str(tmp_path), "r").open()
    with caplog.at_level(logging.WARNING, logger="orchestrator.storage.run_files"):
        record = EventLog(storage, attempt=1).append(EventType.LR_CHANGED, value=0.05, source="cb", colour="red")
    assert record["colour"] == "red"
    assert "['colour'] are not declared" in caplog.text


def test_a_torn_last_event_line_is_skipped(tmp_path):
    storage = StorageSpec(str(tmp_path), "r").open()
    EventLog(storage, attempt=1).append("started")
    with open(tmp_path / "r" / "events.jsonl", "a") as f:
        f.write('{"time": 1, "ty')
    assert [e["type"] for e in read_events(storage)] == ["started"]


def test_an_event_field_named_like_a_common_key_does_not_override_it(tmp_path):
    storage = StorageSpec(str(tmp_path), "r").open()
    EventLog(storage, attempt=1).append("started", attempt=3, time=0, world_size=2)
    (event,) = read_events(storage)
    assert event["attempt"] == 1 and event["time"] > 0 and event["world_size"] == 2


# -- retries -----------------------------------------------------------------------------------


def test_a_write_retries_through_a_short_s3_outage(s3_server, s3_bucket, caplog):
    # One botocore attempt per call, so the retries seen here are RunStorage's own.
    spec = _s3_spec(s3_server, s3_bucket, config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1})
    storage = spec.open(retries=5, backoff_s=0.25)
    storage.write_bytes("before.bin", b"0")
    s3_server.stop()
    restarter = threading.Timer(2.0, s3_server.start)
    restarter.start()
    try:
        with caplog.at_level(logging.WARNING, logger="orchestrator.storage.fs"):
            storage.write_bytes("during.bin", b"1")
    finally:
        restarter.join()
        s3_server.start()
    assert storage.read_bytes("during.bin") == b"1"
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert retries and all(SECRET not in m and KEY_ID not in m for m in retries)
    assert f"s3://{s3_bucket}/runs/run/during.bin" in retries[0]


def test_a_write_that_keeps_failing_raises_os_error_naming_the_url_and_attempts(s3_bucket):
    dead = f"http://127.0.0.1:{free_port()}"
    spec = StorageSpec(f"s3://{s3_bucket}", "r", {
        "key": KEY_ID, "secret": SECRET,
        "client_kwargs": {"endpoint_url": dead, "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}})
    storage = spec.open(retries=2, backoff_s=0.05)
    with pytest.raises(OSError, match="failed after 3 attempts") as info:
        storage.write_bytes("x.bin", b"x")
    message = str(info.value)
    assert f"s3://{s3_bucket}/r/x.bin" in message
    assert SECRET not in message and KEY_ID not in message and dead not in message


# -- errors of the filesystem reach the user redacted -------------------------------------------


def _printed(exc: BaseException) -> str:
    """What a user sees of an exception: the whole printed traceback, causes and contexts included."""
    return "".join(traceback.format_exception(exc))


def test_a_token_in_the_endpoint_url_never_shows_while_looking_for_a_backup(s3_bucket):
    endpoint = f"http://127.0.0.1:{free_port()}/gateway/{SECRET}"  # nobody listens: a real botocore error
    storage = StorageSpec(f"s3://{s3_bucket}/runs", "r", {
        "key": KEY_ID, "secret": "plain-secret-2",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}).open(retries=1, backoff_s=0.01)
    with pytest.raises(OSError, match="failed after 2 attempts") as info:
        latest_valid(storage, "backup")
    printed = _printed(info.value)
    assert f"list s3://{s3_bucket}/runs/r/backup" in printed and "EndpointConnectionError" in printed
    assert SECRET not in printed and "gateway" not in printed and KEY_ID not in printed


def test_an_endpoint_url_the_client_rejects_raises_value_error_naming_storage_options_without_its_token(
        s3_server, s3_bucket):
    options = s3_server.storage_options()
    options["client_kwargs"]["endpoint_url"] = f"{s3_server.endpoint_url}?token={SECRET}"
    storage = StorageSpec(f"s3://{s3_bucket}/runs", "r", options).open(retries=3, backoff_s=5)
    start = time.monotonic()
    with pytest.raises(ValueError, match="check storage_options") as info:
        storage.exists("backup/step-1/manifest.json")
    assert time.monotonic() - start < 5  # a configuration error is not retried
    printed = _printed(info.value)
    assert f"s3://{s3_bucket}/runs/r/backup/step-1/manifest.json" in printed and SECRET not in printed
    with pytest.raises(ValueError, match="check storage_options") as info:
        storage.check_access()  # what fit runs first
    assert f"s3://{s3_bucket}/runs/r" in str(info.value) and SECRET not in _printed(info.value)


def test_rejected_credentials_while_reading_raise_permission_error_naming_the_url_not_the_key(s3_server, s3_bucket):
    storage = _s3_spec(s3_server, s3_bucket).open(retries=0)
    with s3_server.enforce_credentials():
        for read in (lambda: storage.listdir("backup"), lambda: storage.read_bytes("run.json")):
            with pytest.raises(PermissionError, match="access denied") as info:
                read()
            printed = _printed(info.value)
            assert f"s3://{s3_bucket}/runs/run/" in printed and "AWS_ACCESS_KEY_ID" in printed
            assert KEY_ID not in printed and SECRET not in printed


def test_a_filesystem_error_carrying_an_option_value_is_rebuilt_with_its_type_and_no_chain(tmp_path):
    token = "tok-" + uuid.uuid4().hex
    storage = StorageSpec(str(tmp_path / token), "r", {"token": token}).open()  # the path holds the token
    with pytest.raises(FileNotFoundError) as info:
        storage.read_bytes("missing.bin")
    assert token not in _printed(info.value) and info.value.__cause__ is None
    assert str(info.value).startswith(f"read {tmp_path}/***/r/missing.bin: ")


# -- multipart uploads -------------------------------------------------------------------------


def test_a_streamed_write_whose_completion_fails_aborts_its_multipart_upload(s3_server, s3_bucket):
    storage = StorageSpec(f"s3://{s3_bucket}/runs", "r", s3_server.storage_options()).open(retries=0)
    part = os.urandom(6 * 2**20)

    def fill(out) -> None:
        out.blocksize = 5 * 2**20  # the smallest part S3 accepts: force a multipart upload
        out.write(part)
        out.write(part)
        assert out.mpu is not None, "the multipart upload should have started"
        out.parts[0]["ETag"] = '"0123456789abcdef0123456789abcdef"'  # S3 will refuse to complete it

    with pytest.raises(OSError, match=f"write s3://{s3_bucket}/runs/r/big.bin: .*parts could not be found"):
        storage.write_stream("big.bin", fill)
    assert not storage.exists("big.bin")
    assert not storage.fs.call_s3("list_multipart_uploads", Bucket=s3_bucket).get("Uploads")
