"""events.jsonl: appended locally, immutable merged parts on object stores (O(n) bytes), one reader."""

from __future__ import annotations

import json
import uuid

import pytest

from orchestrator.core.events import EventType
from orchestrator.storage import event_log
from orchestrator.storage.fs import StorageSpec
from orchestrator.storage.run_files import (
    EVENT_PARTS_DIR,
    MERGE_FAN_IN,
    EventLog,
    read_event_log,
    read_events,
)
from s3_server import s3_bucket, s3_server  # noqa: F401

SECRET = "s3cr3t-VALUE-do-not-leak"


def _memory_storage():
    return StorageSpec(f"memory://orchestrator-tests/{uuid.uuid4().hex}", "r", {"token": SECRET}).open()


def _s3_storage(server, bucket, **options):
    return StorageSpec(f"s3://{bucket}/runs", "r", server.storage_options(**options)).open()


def _part_bytes(storage) -> dict[str, int]:
    return {name: storage.size(f"{EVENT_PARTS_DIR}/{name}") for name in storage.listdir(EVENT_PARTS_DIR)}


def test_events_on_s3_upload_less_than_three_times_the_log_size_and_read_back_in_order(s3_server, s3_bucket,
                                                                                        monkeypatch):
    # a fan-in of 4 instead of 32: the same levels after 43 flushes as after thousands (sealed parts of
    # 16 flushes, merged parts of 4, single ones), in a fiftieth of the S3 requests
    fan_in = 4
    monkeypatch.setattr(event_log, "MERGE_FAN_IN", fan_in)
    storage = _s3_storage(s3_server, s3_bucket)
    uploaded: dict[str, int] = {}

    def count(request, event_name, **_):  # every request body the S3 client sends
        uploaded[event_name] = uploaded.get(event_name, 0) + int(request.headers.get("Content-Length", 0))

    storage.fs.s3.meta.events.register("before-send.s3", count)
    log = EventLog(storage, attempt=1)
    held = []
    n = 2 * fan_in ** 2 + 2 * fan_in + 3  # two sealed level-2 parts, two level-1 parts, three single flushes
    for epoch in range(n):  # every line uploaded at most 3 times
        log.append(EventType.EPOCH_END, epoch=epoch, step=epoch * 10, logs={"loss": 1.0 / (epoch + 1), "accuracy": 0.5})
        held.append(log.buffered_bytes())

    final = sum(_part_bytes(storage).values())
    put = uploaded.get("before-send.s3.PutObject", 0) + uploaded.get("before-send.s3.UploadPart", 0)
    assert final > n * 80
    assert put < 3 * final, f"uploaded {put} bytes for a {final}-byte log"
    assert max(held) <= fan_in * 200  # the driver holds at most one level of small parts
    assert len(_part_bytes(storage)) == 2 + 2 + 3
    assert not storage.exists("events.jsonl")
    assert [e["epoch"] for e in read_events(storage)] == list(range(n))


def test_many_events_in_several_attempts_keep_their_order_and_few_parts(tmp_path):
    storage = _memory_storage()
    for attempt in (1, 2, 3):
        log = EventLog(storage, attempt=attempt)
        for epoch in range(700):
            log.append(EventType.EPOCH_END, epoch=epoch, logs={"loss": 1.0}, note=f"token {SECRET}")
    events = read_events(storage)
    assert [(e["attempt"], e["epoch"]) for e in events] == [(a, i) for a in (1, 2, 3) for i in range(700)]
    parts = _part_bytes(storage)
    assert len(parts) <= 2 + 2 * (MERGE_FAN_IN - 1)  # two sealed parts of 1024 flushes, the rest unmerged
    assert sum(size > 100_000 for size in parts.values()) == 2
    assert all(SECRET not in storage.read_bytes(f"{EVENT_PARTS_DIR}/{n}").decode() for n in parts)
    assert events[0]["note"] == "token ***"


def test_parts_left_by_a_crash_between_a_merge_and_its_deletes_are_read_once_and_cleaned_up():
    storage = _memory_storage()
    log = EventLog(storage, attempt=1)
    for epoch in range(MERGE_FAN_IN):
        log.append(EventType.EPOCH_END, epoch=epoch, logs={"loss": 1.0})
    (merged,) = storage.listdir(EVENT_PARTS_DIR)
    lines = storage.read_bytes(f"{EVENT_PARTS_DIR}/{merged}").decode().splitlines()
    for number, line in enumerate(lines[:3], 1):  # as if the merge's deletes never happened
        storage.write_bytes(f"{EVENT_PARTS_DIR}/{number:010d}-{number:010d}.jsonl", (line + "\n").encode())

    assert [e["epoch"] for e in read_events(storage)] == list(range(MERGE_FAN_IN))
    EventLog(storage, attempt=2).append(EventType.STARTED, world_size=1)
    assert len(storage.listdir(EVENT_PARTS_DIR)) == 2
    assert [e["type"] for e in read_events(storage)][-2:] == ["epoch_end", "started"]


def test_a_legacy_events_jsonl_on_an_object_store_is_read_before_the_parts(s3_server, s3_bucket):
    storage = _s3_storage(s3_server, s3_bucket)
    old = {"time": 1, "attempt": 1, "epoch": 0, "step": None, "type": "started"}
    storage.write_bytes("events.jsonl", (json.dumps(old) + "\n").encode())  # as older versions wrote it
    EventLog(storage, attempt=2).append(EventType.RESTORED, epoch=0, step=4)
    assert [(e["attempt"], e["type"]) for e in read_events(storage)] == [(1, "started"), (2, "restored")]
    assert json.loads(storage.read_bytes("events.jsonl")) == old  # never rewritten


def test_a_flush_that_fails_keeps_its_lines_and_the_next_flush_writes_them(s3_server, s3_bucket):
    storage = StorageSpec(f"s3://{s3_bucket}/runs", "r", s3_server.storage_options(
        config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1})).open(retries=0)
    log = EventLog(storage, attempt=1, autoflush=False)
    log.append(EventType.STARTED, world_size=2)
    s3_server.stop()
    try:
        log.append(EventType.WORKER_FAILED, rank=1, node="n", cause="died")
        with pytest.raises(OSError, match=f"s3://{s3_bucket}/runs/r/events/"):
            log.flush()
    finally:
        s3_server.start()
    log.flush()
    assert [e["type"] for e in read_events(storage)] == ["started", "worker_failed"]


def test_locally_events_are_appended_to_events_jsonl_and_a_torn_line_does_not_swallow_the_next(tmp_path):
    storage = StorageSpec(str(tmp_path), "r").open()
    EventLog(storage, attempt=1).append(EventType.STARTED)
    path = tmp_path / "r" / "events.jsonl"
    with open(path, "a") as f:
        f.write('{"time": 1, "ty')  # a crash in the middle of a write
    assert [e["type"] for e in read_events(storage)] == ["started"]
    assert read_event_log(storage).problems == []  # a cut-off last line is expected, not damage

    EventLog(storage, attempt=2).append(EventType.RESTORED, epoch=0, step=3)
    found = read_event_log(storage)
    assert [e["type"] for e in found.events] == ["started", "restored"]
    (problem,) = found.problems  # once another line follows, the cut-off one is damage: named, skipped
    assert problem.startswith(f"{path} line 2: not JSON (") and problem.endswith("; skipped")
    assert not (tmp_path / "r" / EVENT_PARTS_DIR).exists()


def test_damaged_event_lines_are_skipped_and_named_with_file_and_line(tmp_path):
    storage = StorageSpec(str(tmp_path), "r").open()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "events.jsonl").write_text(
        '{"type": "started", "attempt": 1}\n[1, 2]\nnot json\n"text"\n{"type": "finished", "attempt": 1}\n')
    found = read_event_log(storage)
    assert [(r.line, r.event["type"]) for r in found.records] == [(1, "started"), (5, "finished")]
    events_file = tmp_path / "r" / "events.jsonl"
    assert [p.split(":")[0] for p in found.problems] == [f"{events_file} line {n}" for n in (2, 3, 4)]
    assert "not a JSON object (a list)" in found.problems[0] and "not a JSON object (a str)" in found.problems[2]


def test_a_local_directory_holding_parts_keeps_writing_parts_after_them(tmp_path):
    source = _memory_storage()
    EventLog(source, attempt=1).append(EventType.STARTED)
    (name,) = source.listdir(EVENT_PARTS_DIR)
    local = StorageSpec(str(tmp_path), "r").open()  # as if copied from an object store
    local.write_bytes(f"{EVENT_PARTS_DIR}/{name}", source.read_bytes(f"{EVENT_PARTS_DIR}/{name}"))
    EventLog(local, attempt=2).append(EventType.RESTORED, epoch=0, step=1)
    assert [e["type"] for e in read_events(local)] == ["started", "restored"]
    assert not (tmp_path / "r" / "events.jsonl").exists()
