"""One owner per run: the controller holds the run lease, the coordinator checks its token (no Ray)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from orchestrator.control.controller import Controller
from orchestrator.control.specs import FaultPolicy
from orchestrator.control.states import Failed, Finished, Running
from orchestrator.core.events import EventType
from orchestrator.storage.checkpoint import MANIFEST, Manifest, latest_valid, list_steps
from orchestrator.storage.lease import LeaseHeld, LeaseLost, Owner, RunLease, read_lease
from orchestrator.storage.run_files import read_events
from test_controller import (FakeGroup, ScriptedAttempts, commit_backup, finished, fit_spec, preempted,
                             step_to_end, worker_failure)
from test_coordinator_core import make_core, persist_from_every_rank


def controller(tmp_path, *script, takeover: bool = False, max_failures: int = 0) -> tuple[Controller, ScriptedAttempts]:
    fit = dataclasses.replace(fit_spec(tmp_path), faults=FaultPolicy(lease_wait_s=0.0, max_failures=max_failures),
                              takeover=takeover)
    log: list[str] = []
    runner = ScriptedAttempts(log, *script)
    return Controller(fit, fit.storage.open(), group=FakeGroup(log), run_attempt=runner), runner


def test_a_second_driver_on_a_running_run_fails_at_once_naming_the_owner_and_writes_nothing(tmp_path):
    first, _ = controller(tmp_path, finished())
    assert isinstance(first.step(), Running)  # the first driver owns the run
    events = read_events(first.storage)
    second, runner = controller(tmp_path, finished())
    state = second.step()
    assert isinstance(state, Failed) and isinstance(state.error, LeaseHeld)
    message = str(state.error)
    assert first.storage.url() in message and f"pid {Owner.current().pid}" in message and "takeover" in message
    assert runner.attempts == [] and read_events(second.storage) == events
    second.close()
    first.close()


def test_takeover_fences_the_first_driver_out_so_it_records_nothing_more(tmp_path):
    first, _ = controller(tmp_path, finished())
    first.step()
    second, _ = controller(tmp_path, finished(), takeover=True)
    assert isinstance(second.step(), Running) and second.lease.token == first.lease.token + 1
    events = read_events(first.storage)
    ended = first.step()  # the first driver's attempt ends: it finds the run is no longer its own
    assert isinstance(ended, Failed) and isinstance(ended.error, LeaseLost)
    assert read_events(first.storage) == events  # no "finished", no "failed" from the fenced-out driver
    first.close()
    assert read_lease(second.storage).token == second.lease.token  # closing never releases another's lease
    assert isinstance(step_to_end(second)[-1], Finished)
    second.close()


def test_each_restart_takes_a_new_token_so_the_previous_attempts_coordinator_can_no_longer_commit(tmp_path):
    tokens: list[int] = []

    def fail(attempt):
        tokens.append(first.fit.lease_token)
        raise worker_failure(attempt.number)

    def finish(attempt):
        tokens.append(first.fit.lease_token)
        return finished()

    first, _ = controller(tmp_path, fail, finish, max_failures=1)
    assert isinstance(step_to_end(first)[-1], Finished)
    assert tokens[1] == tokens[0] + 1
    stale = make_core([], storage=first.storage, lease_token=tokens[0])  # attempt 1's coordinator, not dead yet
    persist_from_every_rank(stale, first.storage, step=6)
    assert isinstance(stale.error, LeaseLost) and latest_valid(first.storage, "backup") is None
    first.close()


def test_the_lease_is_released_when_the_driver_ends_so_the_next_driver_resumes_at_once(tmp_path):
    first, _ = controller(tmp_path, finished())
    step_to_end(first)
    first.close()
    assert read_lease(first.storage).released
    commit_backup(first.storage, 3)
    first.storage.write_json("run.json", dict(first.storage.read_json("run.json"), status="preempted"))
    second, _ = controller(tmp_path, finished())
    state = second.step()
    assert isinstance(state, Running) and state.resume.folder == "backup/step-3"
    second.close()


def test_a_fenced_out_coordinator_neither_commits_nor_purges_and_stops_the_attempt(storage):
    lease = RunLease.acquire(storage, Owner.current(), ttl_s=60)
    core = make_core([], storage=storage, lease_token=lease.token)
    kept = persist_from_every_rank(core, storage, step=4)
    manifest = Manifest.from_json(storage.read_json(f"{kept}/{MANIFEST}"))
    assert manifest.token == lease.token  # every manifest names the owner's token
    RunLease.acquire(storage, Owner.current("another-job"), ttl_s=60, takeover=True)
    persist_from_every_rank(core, storage, step=8)
    assert list_steps(storage, "backup") == [8, 4] and latest_valid(storage, "backup").folder == kept
    assert isinstance(core.error, LeaseLost)
    failed = [e for e in core.events if e["type"] is EventType.BACKUP_FAILED]
    assert failed and "fenced out" in failed[-1]["error"]


@pytest.fixture
def storage(tmp_path):
    from orchestrator.storage.fs import StorageSpec
    return StorageSpec(url=str(tmp_path), run_name="r").open()



def test_every_event_names_the_lease_token_of_the_driver_that_wrote_it(tmp_path):
    first, _ = controller(tmp_path, preempted())
    step_to_end(first)
    first.close()
    second, _ = controller(tmp_path, finished())
    step_to_end(second)
    second.close()
    owners = [(e["attempt"], e["owner"]) for e in read_events(first.storage)]
    assert owners and {o for a, o in owners if a == 1} == {1} and {o for a, o in owners if a == 2} == {2}


def test_an_attempt_learns_within_a_renewal_that_another_driver_took_the_run_over(tmp_path):
    seen: list[BaseException | None] = []

    def taken_over_meanwhile(attempt):
        RunLease.acquire(attempt.storage, Owner.current("the-operator"), ttl_s=60, takeover=True)
        deadline = time.monotonic() + 10
        while attempt.fenced() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        seen.append(attempt.fenced())
        return finished()

    fit = dataclasses.replace(fit_spec(tmp_path), faults=FaultPolicy(lease_wait_s=0.0, lease_ttl_s=0.3))
    first = Controller(fit, fit.storage.open(), group=FakeGroup([]), run_attempt=ScriptedAttempts([], taken_over_meanwhile))
    ended = step_to_end(first)[-1]
    first.close()
    assert isinstance(seen[0], LeaseLost) and "the-operator" in str(seen[0])
    assert isinstance(ended, Failed) and isinstance(ended.error, LeaseLost)
    assert not any(e["type"] in ("finished", "failed") for e in read_events(first.storage))


def test_a_rank_refusing_a_backup_of_another_layout_is_not_retried():
    from orchestrator.cluster.worker import WorkerFailure
    from orchestrator.control.blame import raised
    from orchestrator.storage.layout import ResumeMismatch
    refusal = ResumeMismatch("cannot resume from backup/step-4: batch_size was 8 when it was written and is 16 now")
    with pytest.raises(ResumeMismatch):
        raised(WorkerFailure(0, "n", 1, "ResumeMismatch", str(refusal), "tb", refusal), attempt=1)
    other = raised(WorkerFailure(0, "n", 1, "ValueError", "bad", "tb", ValueError("bad")), attempt=1)
    assert other.record.rank == 0  # anything else is a failure the policy may retry
