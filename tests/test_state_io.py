"""Streaming saves: torch.save straight into storage with the manifest's CRC-32 computed on the way."""

from __future__ import annotations

import io
import os
import threading
import uuid
import zipfile
import zlib

import pytest
import torch

from orchestrator.storage.checkpoint import ChecksumWriter, FileEntry, Manifest, verify
from orchestrator.loop.state_io import AsyncPersister, from_bytes, save_to
from orchestrator.storage.fs import StorageSpec
from s3_server import free_port, s3_bucket, s3_server  # noqa: F401


def _state(seed: int = 0, n: int = 4096) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "b": torch.arange(7), "step": 3, "name": "x"}


def _zip_crcs(data: bytes) -> list[int]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [info.CRC for info in z.infolist() if info.file_size > 0]


@pytest.fixture(params=["local", "memory", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return StorageSpec(str(tmp_path / "runs"), "run").open()
    if request.param == "memory":
        return StorageSpec(f"memory://orchestrator-tests/{uuid.uuid4().hex}", "run").open()
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return StorageSpec(f"s3://{bucket}/runs", "run", server.storage_options(bucket)).open()


def test_the_checksum_writer_reports_the_size_and_crc32_of_everything_forwarded():
    out = io.BytesIO()
    writer = ChecksumWriter(out)
    for chunk in (b"abc", memoryview(b"defgh"), bytearray(b"")):
        writer.write(chunk)
    entry = writer.entry("f.pt")
    assert out.getvalue() == b"abcdefgh"
    assert entry.size == 8
    assert entry.digest == f"{zlib.crc32(b'abcdefgh'):08x}"
    assert entry.matches(b"abcdefgh") and not entry.matches(b"abcdefgX")


def test_large_chunks_checksummed_beside_their_write_give_the_same_crc_and_bytes_in_order():
    chunks = [os.urandom(3 << 20), b"small", os.urandom(1 << 20), os.urandom(10)]
    out = io.BytesIO()
    with ChecksumWriter(out, overlap_min_bytes=1 << 20) as writer:
        for chunk in chunks:
            assert writer.write(chunk) == len(chunk)
    whole = b"".join(chunks)
    assert out.getvalue() == whole
    assert writer.entry("f") == FileEntry("f", len(whole), f"{zlib.crc32(whole):08x}")


def test_a_streamed_save_loads_with_weights_only_and_its_entry_matches_the_bytes():
    out = io.BytesIO()
    writer = save_to(_state(), out, zip_crc=False)
    data = out.getvalue()
    assert writer.entry("s").matches(data)
    loaded = from_bytes(data)
    assert torch.equal(loaded["w"], _state()["w"]) and loaded["step"] == 3


def test_zip_crc_off_applies_to_that_save_only_and_the_process_setting_comes_back():
    assert torch.serialization.get_crc32_options() is True
    off, on = io.BytesIO(), io.BytesIO()
    save_to(_state(), off, zip_crc=False)
    save_to(_state(), on)
    assert set(_zip_crcs(off.getvalue())) == {0}
    assert all(crc != 0 for crc in _zip_crcs(on.getvalue()))
    assert torch.serialization.get_crc32_options() is True
    with zipfile.ZipFile(io.BytesIO(on.getvalue())) as z:
        assert z.testzip() is None


def test_a_save_that_fails_before_writing_still_restores_the_setting_and_frees_the_lock():
    class Unpicklable:
        def __reduce__(self):
            raise TypeError("no pickling")

    with pytest.raises(TypeError, match="no pickling"):
        save_to({"bad": Unpicklable()}, io.BytesIO(), zip_crc=False)
    assert torch.serialization.get_crc32_options() is True
    out = io.BytesIO()
    done = threading.Event()
    threading.Thread(target=lambda: (save_to(_state(), out), done.set()), daemon=True).start()
    assert done.wait(30), "the zip-CRC lock was left held"


def test_saves_without_zip_crc_in_a_thread_never_strip_it_from_concurrent_saves():
    stop = threading.Event()

    def background() -> None:
        while not stop.is_set():
            save_to(_state(1, 256), io.BytesIO(), zip_crc=False)

    thread = threading.Thread(target=background, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            out = io.BytesIO()
            save_to(_state(2, 256), out)
            assert all(crc != 0 for crc in _zip_crcs(out.getvalue()))
    finally:
        stop.set()
        thread.join(30)
    assert torch.serialization.get_crc32_options() is True


def test_the_persister_streams_every_file_and_its_entries_verify_on_every_backend(storage):
    done: list = []
    persister = AsyncPersister(storage.write_stream, lambda folder, entries, meta: done.append((folder, entries)))
    files = {"train_state.pt": _state(0, 50_000), "rank-0.pt": _state(1), "raw.bin": b"\x00\x01" * 1000}
    persister.submit("backup/step-5", files, {})
    persister.wait()
    (folder, entries), = done
    assert [e.name for e in entries] == list(files)
    assert verify(storage, folder, Manifest(5, 0, 5, "train", 1, entries)) is None
    assert persister.timing.bytes_written == sum(e.size for e in entries)
    assert storage.read_bytes(f"{folder}/raw.bin") == files["raw.bin"]
    assert torch.equal(from_bytes(storage.read_bytes(f"{folder}/train_state.pt"))["w"], files["train_state.pt"]["w"])


def test_a_failing_local_stream_leaves_neither_the_file_nor_a_temporary_file(tmp_path):
    storage = StorageSpec(str(tmp_path), "run").open()

    def fill(out) -> None:
        out.write(b"half of it")
        raise ValueError("serialisation broke")

    with pytest.raises(ValueError, match="serialisation broke"):
        storage.write_stream("backup/step-1/f.pt", fill)
    folder = tmp_path / "run" / "backup" / "step-1"
    assert list(folder.iterdir()) == []


def test_a_failing_s3_stream_past_one_part_aborts_the_upload_and_leaves_no_object(s3_server, s3_bucket):
    storage = StorageSpec(f"s3://{s3_bucket}/runs", "run", s3_server.storage_options(s3_bucket)).open()
    part = os.urandom(6 * 2**20)

    def fill(out) -> None:
        out.blocksize = 5 * 2**20  # the smallest part S3 accepts: force a multipart upload
        out.write(part)
        out.write(part)
        assert out.mpu is not None, "the multipart upload should have started"
        raise ValueError("serialisation broke")

    with pytest.raises(ValueError, match="serialisation broke"):
        storage.write_stream("backup/step-1/f.pt", fill)
    assert not storage.exists("backup/step-1/f.pt")
    uploads = storage.fs.call_s3("list_multipart_uploads", Bucket=s3_bucket)
    assert not uploads.get("Uploads"), "the multipart upload was left open"


def test_a_retried_stream_calls_fill_again_and_the_last_entry_counts(s3_server, s3_bucket):
    storage = StorageSpec(f"s3://{s3_bucket}/runs", "run", s3_server.storage_options(s3_bucket),
                          ).open(retries=3, backoff_s=0.05)
    calls = []

    def fill(out) -> None:
        calls.append(1)
        out.write(b"payload")
        if len(calls) == 1:
            raise ConnectionError("connection reset by peer")

    storage.write_stream("f.bin", fill)
    assert len(calls) == 2
    assert storage.read_bytes("f.bin") == b"payload"

