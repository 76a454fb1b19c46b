"""orchestrator.storage.lease: one owner per run, with a fencing token, on local disk, memory:// and S3 (moto)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import posixpath
import threading
import time
import uuid

import pytest

from orchestrator.errors import OrchestratorError
from orchestrator.storage.fs import RunStorage, StorageSpec
from orchestrator.storage.lease import (
    LEASE_FILE,
    LeaseHeld,
    LeaseLost,
    LeaseRecord,
    Owner,
    RunLease,
    check_token,
    read_lease,
)
from s3_server import s3_bucket, s3_server  # noqa: F401

FAST = {"poll_s": 0.01}


@pytest.fixture
def atomic_conditional_puts(monkeypatch):
    """Make moto evaluate If-Match / If-None-Match and store the object in one step, as S3 does.

    moto's PUT handler checks the condition and then writes without a lock, so two concurrent
    conditional PUTs can both pass the check (a race of the test server, not of S3). Serialising the
    handler gives S3's semantics, against which the lease's protocol is what is under test.
    """
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    unlocked = S3Response.put_object

    def put_object(self, *args, **kwargs):
        with lock:
            return unlocked(self, *args, **kwargs)

    monkeypatch.setattr(S3Response, "put_object", put_object)


@pytest.fixture(params=["local", "memory", "s3"])
def open_run(request, tmp_path):
    """``open_run(fresh=False)``: a new RunStorage of one run directory; with ``fresh=True`` on its own
    fsspec filesystem instance (a driver on another host), else on fsspec's cached one (an S3 client
    takes ~0.2 s to set up)."""
    if request.param == "local":
        url, options = str(tmp_path / "runs"), {}
    elif request.param == "memory":
        url, options = f"memory://lease-tests/{uuid.uuid4().hex}", {}
    else:
        server = request.getfixturevalue("s3_server")
        url, options = f"s3://{request.getfixturevalue('s3_bucket')}/runs", server.storage_options()
        request.getfixturevalue("atomic_conditional_puts")

    def open_storage(fresh: bool = False):
        return StorageSpec(url, "digits", {**options, "skip_instance_cache": fresh}).open()

    open_storage.backend = request.param
    return open_storage


def _owner(job: str) -> Owner:
    return Owner.current(job_id=job)


def test_a_second_acquire_fails_at_once_naming_the_run_the_owner_and_its_age(open_run):
    first = RunLease.acquire(open_run(), _owner("raysubmit_first"), ttl_s=30)
    second_storage = open_run()
    started = time.monotonic()
    with pytest.raises(LeaseHeld) as info:
        RunLease.acquire(second_storage, _owner("raysubmit_second"), ttl_s=30)
    assert time.monotonic() - started < 2
    message = str(info.value)
    assert second_storage.url() in message
    assert "raysubmit_first" in message and f"pid {os.getpid()}" in message and first.owner.host in message
    assert "held for" in message and "renewed" in message and "takeover=True" in message and "--takeover" in message
    assert isinstance(info.value, OrchestratorError)
    assert info.value.holder.token == first.token == 1


def test_a_waiting_acquire_succeeds_when_the_holder_releases(open_run):
    first = RunLease.acquire(open_run(), _owner("first"), ttl_s=30)
    timer = threading.Timer(0.15, first.release)
    timer.start()
    try:
        second = RunLease.acquire(open_run(), _owner("second"), ttl_s=30, wait_s=10, **FAST)
    finally:
        timer.join()
    assert second.token == first.token + 1
    assert read_lease(open_run()).owner.job_id == "second"


def test_a_waiting_acquire_gives_up_after_wait_s(open_run):
    RunLease.acquire(open_run(), _owner("first"), ttl_s=30)
    started = time.monotonic()
    with pytest.raises(LeaseHeld, match="first"):
        RunLease.acquire(open_run(), _owner("second"), ttl_s=30, wait_s=0.15, **FAST)
    assert 0.14 < time.monotonic() - started < 3


def test_an_expired_lease_is_taken_over_with_a_higher_token(open_run):
    dead = RunLease.acquire(open_run(), _owner("dead"), ttl_s=0.1)  # never renewed
    time.sleep(0.15)
    second = RunLease.acquire(open_run(), _owner("second"), ttl_s=30)
    assert second.token == dead.token + 1
    with pytest.raises(LeaseLost, match="second"):
        dead.renew()


def test_a_waiting_acquire_takes_the_lease_once_it_expires(open_run):
    dead = RunLease.acquire(open_run(), _owner("dead"), ttl_s=0.15)
    second = RunLease.acquire(open_run(), _owner("second"), ttl_s=30, wait_s=5, **FAST)
    assert second.token == dead.token + 1


def test_a_lease_stamped_by_a_clock_running_ahead_still_expires_after_ttl_unchanged(open_run):
    storage = open_run()
    ahead = LeaseRecord(token=4, owner=_owner("skewed"), acquired=time.time() + 3600,
                        renewed=time.time() + 3600, ttl_s=0.15)
    storage.write_bytes(LEASE_FILE, ahead.to_bytes())
    with pytest.raises(LeaseHeld, match="skewed"):
        RunLease.acquire(open_run(), _owner("second"))
    second = RunLease.acquire(open_run(), _owner("second"), wait_s=5, **FAST)
    assert second.token == 5


def test_takeover_takes_a_live_lease_and_the_old_holder_can_no_longer_renew_check_or_release(open_run):
    old = RunLease.acquire(open_run(), _owner("old"), ttl_s=30)
    new = RunLease.acquire(open_run(), _owner("new"), ttl_s=30, takeover=True)
    assert new.token == old.token + 1
    for fenced in (old.renew, old.check, lambda: check_token(open_run(), old.token)):
        with pytest.raises(LeaseLost) as info:
            fenced()
        assert "new" in str(info.value) and f"token {new.token}" in str(info.value)
        assert info.value.current.token == new.token
    assert old.release() is False
    assert read_lease(open_run()) == new.record
    new.check()
    check_token(open_run(), new.token)
    new.renew()
    assert read_lease(open_run()).renewed == new.record.renewed


def test_release_never_removes_a_lease_someone_else_holds(open_run):
    old = RunLease.acquire(open_run(), _owner("old"), ttl_s=0.05)
    time.sleep(0.1)
    new = RunLease.acquire(open_run(), _owner("new"), ttl_s=30)
    assert old.release() is False
    on_storage = read_lease(open_run())
    assert on_storage == new.record and not on_storage.released
    with pytest.raises(LeaseHeld, match="new"):
        RunLease.acquire(open_run(), _owner("third"))
    assert new.release() is True and new.release() is False
    assert read_lease(open_run()).released and read_lease(open_run()).token == new.token


def test_tokens_strictly_increase_across_release_expiry_and_takeover(open_run):
    tokens = []
    lease = RunLease.acquire(open_run(), _owner("a"))
    tokens.append(lease.token)
    lease.release()
    lease = RunLease.acquire(open_run(), _owner("b"), ttl_s=0.05)
    tokens.append(lease.token)
    time.sleep(0.1)
    lease = RunLease.acquire(open_run(), _owner("c"))
    tokens.append(lease.token)
    lease = RunLease.acquire(open_run(), _owner("d"), takeover=True)
    tokens.append(lease.token)
    with lease:
        tokens.append(RunLease.acquire(open_run(), _owner("d2"), takeover=True).token)
    assert tokens == [1, 2, 3, 4, 5]


def test_the_fencing_check_refuses_a_released_or_older_token(open_run):
    lease = RunLease.acquire(open_run(), _owner("a"))
    check_token(open_run(), lease.token)
    with pytest.raises(LeaseLost):
        check_token(open_run(), lease.token - 1)
    lease.release()
    with pytest.raises(LeaseLost, match="released"):
        check_token(open_run(), lease.token)


def test_a_missing_lease_fails_the_fencing_check(open_run):
    with pytest.raises(LeaseLost, match="missing"):
        check_token(open_run(), 1)


def _race(open_run, workers: int, rounds: int) -> tuple[list[int], list[str]]:
    """``workers`` threads, each on its own filesystem instance, acquire and release ``rounds`` times.

    Returns the tokens won and any overlap of two holders (an exclusive-create marker detects it).
    """
    tokens: list[int] = []
    overlaps: list[str] = []
    errors: list[BaseException] = []
    inside = threading.Lock()
    start = threading.Barrier(workers)

    def work(i: int) -> None:
        storage = open_run(fresh=True)
        try:
            start.wait()
            for _ in range(rounds):
                lease = RunLease.acquire(storage, _owner(f"w{i}"), ttl_s=30, wait_s=20, poll_s=0.003)
                if not inside.acquire(blocking=False):
                    overlaps.append(f"w{i} token {lease.token}")
                else:
                    tokens.append(lease.token)
                    time.sleep(0.001)
                    inside.release()
                assert lease.release()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return tokens, overlaps


def test_racing_acquirers_on_their_own_filesystems_never_both_win(open_run):
    workers, rounds = 3, 5
    tokens, overlaps = _race(open_run, workers, rounds)
    assert overlaps == []
    assert sorted(tokens) == list(range(1, workers * rounds + 1))


def test_racing_creators_of_a_new_lease_never_both_win(open_run):
    """Fresh run directories, each created by two threads at once: exactly one create wins."""
    first, second = open_run(fresh=True), open_run(fresh=True)  # two filesystem instances, reused for every run below
    for _ in range(5):
        run = f"r{uuid.uuid4().hex[:8]}"
        winners: list[int] = []
        held: list[LeaseHeld] = []
        barrier = threading.Barrier(2)

        def work(base, i: int) -> None:
            storage = RunStorage(base.spec, base.fs, posixpath.join(posixpath.dirname(base.root), run))
            barrier.wait()
            try:
                winners.append(RunLease.acquire(storage, _owner(f"c{i}"), ttl_s=30).token)
            except LeaseHeld as exc:
                held.append(exc)

        threads = [threading.Thread(target=work, args=(base, i)) for i, base in enumerate((first, second))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert winners == [1] and len(held) == 1


def _process_worker(root: str, index: int, rounds: int, results) -> None:
    storage = StorageSpec(root, "digits", {"skip_instance_cache": True}).open()
    marker = os.path.join(root, "inside")
    for _ in range(rounds):
        lease = RunLease.acquire(storage, _owner(f"p{index}"), ttl_s=30, wait_s=20, poll_s=0.001)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            results.put(("overlap", lease.token))
        else:
            time.sleep(0.001)
            os.close(fd)
            os.remove(marker)
            results.put(("token", lease.token))
        lease.release()


def test_racing_driver_processes_on_local_storage_never_both_win(tmp_path):
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    workers, rounds = 3, 8
    procs = [ctx.Process(target=_process_worker, args=(str(tmp_path), i, rounds, results)) for i in range(workers)]
    for p in procs:
        p.start()
    got = [results.get(timeout=30) for _ in range(workers * rounds)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert [g for g in got if g[0] == "overlap"] == []
    assert sorted(t for _, t in got) == list(range(1, workers * rounds + 1))


def test_a_write_that_reports_a_conflict_but_landed_counts_as_won(open_run, monkeypatch):
    """A retried conditional PUT whose first try succeeded gets 412: the lease's nonce tells it was ours."""
    from orchestrator.storage import lease as lease_module

    storage = open_run()
    backend = lease_module._backend(storage)
    real_create = backend.create

    def create_then_report_conflict(data: bytes):
        real_create(data)
        return None  # "someone else won"

    monkeypatch.setattr(backend, "create", create_then_report_conflict)
    monkeypatch.setattr(lease_module, "_backend", lambda s: backend)
    lease = RunLease.acquire(storage, _owner("a"))
    monkeypatch.undo()
    assert lease.token == 1 and read_lease(open_run()) == lease.record
    lease.renew()
    lease.check()


def test_a_renewing_lease_outlives_its_ttl_and_its_thread_reports_a_takeover(open_run):
    second, operator = open_run(), open_run()
    for storage in (second, operator):  # set up their clients before the clock matters
        read_lease(storage)
    lease = RunLease.acquire(open_run(), _owner("renewer"), ttl_s=0.3)
    lease.start_renewing(interval_s=0.03)
    try:
        time.sleep(0.45)
        with pytest.raises(LeaseHeld, match="renewer"):
            RunLease.acquire(second, _owner("second"))
        RunLease.acquire(operator, _owner("operator"), takeover=True)
        deadline = time.monotonic() + 5
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert isinstance(lease.lost, LeaseLost) and "operator" in str(lease.lost)
    finally:
        lease.stop_renewing()


def test_owner_current_names_the_ray_job_submission_id_host_and_pid(monkeypatch):
    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"metadata": {"job_submission_id": "raysubmit_XYZ"}}')
    owner = Owner.current()
    assert owner.job_id == "raysubmit_XYZ" and owner.pid == os.getpid() and owner.host
    assert Owner.current(job_id="mine").job_id == "mine"
    assert Owner.current().id != owner.id
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert Owner.current().job_id is None


def test_lease_errors_survive_pickling_for_ray(tmp_path):
    storage = StorageSpec(str(tmp_path), "digits").open()
    lease = RunLease.acquire(storage, _owner("a"))
    held = LeaseHeld(storage.url(), lease.record)
    lost = LeaseLost(storage.url(), 1, lease.record)
    for exc in (held, lost):
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is type(exc) and "job a" in str(again)


def test_bad_arguments_are_rejected(tmp_path):
    storage = StorageSpec(str(tmp_path), "digits").open()
    for kwargs in ({"ttl_s": 0}, {"wait_s": -1}, {"poll_s": -1}):
        with pytest.raises(ValueError):
            RunLease.acquire(storage, _owner("a"), **kwargs)
