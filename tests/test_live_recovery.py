"""Live recovery: a SIGKILLed rank is replaced and the run goes on from the survivors' memory, no backup read."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import workloads
from orchestrator import Trainer, callbacks
from orchestrator.storage.fs import StorageSpec
from orchestrator.storage.run_files import read_events
from s3_server import s3_bucket, s3_server  # noqa: F401

pytestmark = pytest.mark.timeout(300)
STEPS_PER_EPOCH = 7  # odd_data, batch_size 16, 2 workers


def make(tmp_path, run_name, train_step, backups=False, **overrides):
    chosen = [callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=0, min_delta=0.05)]
    if backups:
        chosen.insert(0, callbacks.BackupAndRestore(save_freq=3, delete_checkpoint=False))
    kwargs = dict(model=workloads.dropout_model, optimizer=workloads.adam, data=workloads.odd_data,
                  train_step=train_step, batch_size=16, num_workers=2, seed=0, storage=str(tmp_path),
                  run_name=run_name, max_failures=1, callbacks=chosen)
    kwargs.update(overrides)
    return Trainer(**kwargs)


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """The uninterrupted run (no backups: they change nothing), fitted once for the module."""
    return make(tmp_path_factory.mktemp("reference"), "reference", workloads.faulty_step("raise", 0, 10**6, None),
                warm_standbys=False).fit(epochs=3, verbose=0)


def same_parameters(a, b):
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), name


def events_of(tmp_path, run_name):
    return read_events(StorageSpec(str(tmp_path), run_name).open())


def assert_recovered_from_memory(events, rank, step):
    failed = [e for e in events if e["type"] == "worker_failed"]
    assert len(failed) == 1 and failed[0]["rank"] == rank
    assert not any(e["type"] == "restored" for e in events)  # nothing was read from storage
    (recovered,) = [e for e in events if e["type"] == "recovered"]
    assert recovered["source"] == "memory" and recovered["rank"] == rank and recovered["attempt"] == 2
    assert recovered["step"] == step and recovered["lost_steps"] in (0, 1)
    for part in ("secured_s", "reformed_s", "transferred_s", "first_step_s"):
        assert recovered[part] is not None and recovered[part] >= 0, part
    assert recovered["detection_s"] == failed[0]["detection_s"]  # None when the driver could not measure it
    started = [e for e in events if e["type"] == "started"]
    assert [e["resumed_from"] for e in started] == [None, "memory"]
    assert events[-1]["type"] == "finished" and events[-1]["attempt"] == 2


@pytest.mark.parametrize("rank,call", [(1, 11), (0, 2 * STEPS_PER_EPOCH)])
def test_a_sigkilled_rank_without_any_backup_is_recovered_from_the_survivors_bit_identical(
        ray_cluster, reference, tmp_path, rank, call):
    """Rank 1 mid-epoch (epoch 1, batch 4); rank 0 at the first step of epoch 2 (the donor is then rank 1)."""
    flag = tmp_path / "armed"
    flag.write_text("x")
    run = make(tmp_path, "killed", workloads.faulty_step("sigkill", rank, call, str(flag))).fit(epochs=3, verbose=0)
    same_parameters(reference, run)
    events = events_of(tmp_path, "killed")
    assert_recovered_from_memory(events, rank, step=call)
    # the dead rank's slot is warm only on a standby (then every rank is); the survivor keeps its process when it
    # returned within the grace (the rule: test_controller.py), else it is replaced too
    assert [e["warm_ranks"] for e in events if e["type"] == "started"][-1] in ([0, 1], [1 - rank], [])
    # validation and the callbacks' decisions are those of the uninterrupted run; the training logs
    # differ only in the epoch of the kill (the dead rank's sums of it died with it)
    epoch = call // STEPS_PER_EPOCH
    for key, values in reference.history.items():
        for e, (want, got) in enumerate(zip(values, run.history[key])):
            if not (key == "loss" and e == epoch):
                assert got == want, (key, e)
    assert not (tmp_path / "killed" / "backup").exists()


def test_a_kill_while_a_backup_upload_is_in_flight_is_recovered_from_memory(ray_cluster, reference, tmp_path,
                                                                           s3_server, s3_bucket):
    """Backups every 3 steps to S3. The S3 server stops while rank 1 runs step 12, so the backup of step
    12 cannot finish uploading; rank 1 dies in step 13 with that upload in flight, and the server
    comes back only after the kill: the survivors' memory wins, the torn upload never counts."""
    url, options = f"s3://{s3_bucket}/runs", s3_server.storage_options(s3_bucket)
    (tmp_path / "armed").write_text("x")

    def committed(step):
        events = read_events(StorageSpec(url, "upload", options).open())
        return any(e["type"] == "backup_committed" and e["step"] == step for e in events)

    def outage():
        wait_for(tmp_path / "paused")
        wait_until(lambda: committed(9))  # the backup before is safe: its commit needs the server too
        s3_server.stop()  # before the backup of step 12 is decided
        (tmp_path / "go").write_text("x")
        wait_for(tmp_path / "dying")
        time.sleep(1.0)  # the rank is dead with its upload unfinished
        s3_server.start()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        run = make(tmp_path, "upload", workloads.handshake_then_sigkill(1, 11, 12, str(tmp_path)), backups=True,
                   storage=url, storage_options=options).fit(epochs=3, verbose=0)
    finally:
        thread.join(timeout=60)
        if not s3_server.running:
            s3_server.start()
    same_parameters(reference, run)
    events = read_events(StorageSpec(url, "upload", options).open())
    assert_recovered_from_memory(events, 1, step=12)
    first = [e["step"] for e in events if e["type"] == "backup_committed" and e["attempt"] == 1]
    assert 12 not in first  # its upload was cut short by the kill
    later = [e["step"] for e in events if e["type"] == "backup_committed" and e["attempt"] == 2]
    assert later and min(later) > 12  # the next attempt goes on backing up after the recovered step


def wait_for(path, timeout_s=120.0):
    wait_until(path.exists, timeout_s)


def wait_until(condition, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{condition} never held"
        time.sleep(0.05)


def test_every_rank_killed_at_once_falls_back_to_the_newest_committed_backup(ray_cluster, reference, tmp_path):
    flags = tmp_path / "flags"
    flags.mkdir()
    for r in range(2):
        (flags / f"rank-{r}").write_text("x")
    run = make(tmp_path, "all", workloads.sigkill_every_rank(11, str(flags)), backups=True).fit(epochs=3, verbose=0)
    same_parameters(reference, run)
    assert run.history == reference.history
    events = events_of(tmp_path, "all")
    assert not any(e["type"] == "recovered" for e in events)
    (restored,) = [e for e in events if e["type"] == "restored"]
    failed = next(e for e in events if e["type"] == "worker_failed")
    newest = max(e["step"] for e in events[:events.index(failed)] if e["type"] == "backup_committed")
    assert restored["step"] == newest and restored["attempt"] == 2
    assert events[-1]["type"] == "finished"
