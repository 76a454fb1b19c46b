"""The controller stepped one state at a time against a fake worker group and scripted attempts (no Ray).

Each test scripts what the attempts do (return every rank's result, or raise what ends an
attempt), steps the controller, and reads the run directory back: ``events.jsonl`` and run.json.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import threading
from typing import Any, Callable

import pytest

from orchestrator import errors
from orchestrator.control.attempt import Attempt
from orchestrator.control.controller import Controller, run_fit
from orchestrator.control.failures import (COORDINATOR, AttemptFailed, Drain, FailureDecision, FailurePolicy,
                                           FailureRecord, NodesDrained)
from orchestrator.control.specs import BackupPolicy, FaultPolicy, FitSpec, Resume
from orchestrator.control.states import Failed, Finished, FitOutcome, Preempted, Restarting, Running, Starting
from orchestrator.core.config import LoopConfig, ScalingConfig
from orchestrator.loop.specs import LoopResult
from orchestrator.storage.checkpoint import COORDINATOR_FILE, ChecksumWriter, Manifest, commit, encode_state
from orchestrator.storage.fs import RunStorage, StorageSpec
from orchestrator.storage.run_files import EventLog, read_events

WORLD = 2


class FakeGroup:
    """Stands in for the WorkerGroup: records what the controller asks of it, in ``log``."""

    def __init__(self, log: list[str], capacity_error: BaseException | None = None) -> None:
        self.log = log
        self.capacity_error = capacity_error

    def check_capacity(self) -> None:
        self.log.append("check_capacity")
        if self.capacity_error is not None:
            raise self.capacity_error

    def shutdown(self) -> None:
        self.log.append("shutdown")


Script = list[LoopResult] | BaseException | Callable[[Attempt], list[LoopResult]]


class ScriptedAttempts:
    """The attempt runner: attempt ``i`` returns, raises or calls the ``i``-th entry of the script."""

    def __init__(self, log: list[str], *script: Script) -> None:
        self.log = log
        self.script = list(script)
        self.attempts: list[Attempt] = []

    def __call__(self, fit: FitSpec, attempt: Attempt, group: Any, outcome: Any) -> list[LoopResult]:
        self.attempts.append(attempt)
        self.log.append(f"attempt {attempt.number}")
        entry = self.script[len(self.attempts) - 1]
        if isinstance(entry, BaseException):
            raise entry
        return entry(attempt) if callable(entry) else entry


def _unused(*args: Any) -> Any:
    raise AssertionError("no worker runs in these tests")


def fit_spec(tmp_path, max_failures: int = 1, delete_at_end: bool = False) -> FitSpec:
    return FitSpec(loop=LoopConfig(model=_unused, optimizer=_unused, data=_unused, loss=_unused),
                   scaling=ScalingConfig(num_workers=WORLD), epochs=2,
                   storage=StorageSpec(url=str(tmp_path), run_name="r"),
                   backups=BackupPolicy(delete_at_end=delete_at_end),
                   faults=FaultPolicy(max_failures=max_failures), config_snapshot={"run_name": "r", "epochs": 2})


def make(tmp_path, *script: Script, max_failures: int = 1, delete_at_end: bool = False,
         capacity_error: BaseException | None = None) -> tuple[Controller, ScriptedAttempts, list[str]]:
    log: list[str] = []
    fit = fit_spec(tmp_path, max_failures, delete_at_end)
    runner = ScriptedAttempts(log, *script)
    controller = Controller(fit, fit.storage.open(), group=FakeGroup(log, capacity_error), run_attempt=runner)
    return controller, runner, log


def step_to_end(controller: Controller) -> list[Any]:
    states = []
    while not controller.state.terminal:
        states.append(controller.step())
    return states


def finished(epochs: int = 2, steps: int = 14) -> list[LoopResult]:
    return [LoopResult(rank=r, learning_rates=[0.1] * epochs, epochs_run=epochs, steps_run=steps)
            for r in range(WORLD)]


def preempted(steps: int = 5) -> list[LoopResult]:
    return [LoopResult(rank=r, learning_rates=[0.1], epochs_run=1, steps_run=steps, preempted=True)
            for r in range(WORLD)]


def worker_failure(attempt: int, rank: int = 1) -> AttemptFailed:
    cause = f"rank {rank} raised RuntimeError: injected failure in attempt {attempt}"
    error = errors.WorkerError(rank, "10.0.0.2", "RuntimeError", f"injected failure in attempt {attempt}", "tb")
    return AttemptFailed(FailureRecord(attempt, rank, "10.0.0.2", cause), error)


def commit_backup(storage: RunStorage, step: int, world_size: int = WORLD) -> str:
    """A committed backup holding only the coordinator's state (all the controller reads)."""
    data = encode_state({"history": [], "step": step})
    folder = f"backup/step-{step}"
    storage.write_bytes(f"{folder}/{COORDINATOR_FILE}", data)
    with ChecksumWriter(io.BytesIO()) as checksum:
        checksum.write(data)
    return commit(storage, "backup", Manifest(step=step, epoch=1, batch=2, phase="train", world_size=world_size,
                                              files=[checksum.entry(COORDINATOR_FILE)]))


def events_of(controller: Controller) -> list[dict]:
    return read_events(controller.storage)


def run_json(tmp_path) -> dict:
    return json.loads((tmp_path / "r" / "run.json").read_text())


def test_a_failure_within_the_budget_restarts_from_the_newest_committed_backup_and_finishes(tmp_path):
    def fail_after_a_backup(attempt: Attempt) -> list[LoopResult]:
        commit_backup(attempt.storage, 9)
        raise worker_failure(attempt.number)

    controller, runner, _ = make(tmp_path, fail_after_a_backup, finished(), max_failures=1)
    states = step_to_end(controller)
    assert [type(s) for s in states] == [Running, Restarting, Running, Finished]
    assert states[0] == Running(attempt=1, resume=Resume())
    assert states[1].failure == worker_failure(1).record and states[1].drained is None
    assert states[2].attempt == 2 and states[2].resume.folder == "backup/step-9"
    assert runner.attempts[1].resume.state == {"history": [], "step": 9}
    events = events_of(controller)
    failed = [e for e in events if e["type"] == "worker_failed"]
    assert [(e["attempt"], e["rank"], e["cause"]) for e in failed] == [(1, 1, worker_failure(1).record.cause)]
    assert [(e["attempt"], e["step"]) for e in events if e["type"] == "restored"] == [(2, 9)]
    assert events[-1]["type"] == "finished" and events[-1]["attempt"] == 2 and events[-1]["epochs"] == 2
    assert run_json(tmp_path)["attempts"] == 2 and run_json(tmp_path)["status"] == "finished"
    assert states[-1].result().results == finished()


def test_failures_past_the_budget_fail_with_an_error_listing_every_failure(tmp_path):
    controller, _, _ = make(tmp_path, worker_failure(1), worker_failure(2), max_failures=1)
    states = step_to_end(controller)
    assert [type(s) for s in states] == [Running, Restarting, Running, Failed]
    end = states[-1]
    assert end.failures == (worker_failure(1).record, worker_failure(2).record)
    assert isinstance(end.error, errors.TrainingFailedError)
    assert end.error.failures == list(end.failures)
    assert "attempt 1: rank 1" in str(end.error) and "attempt 2: rank 1" in str(end.error)
    assert isinstance(end.error.__cause__, errors.WorkerError)
    with pytest.raises(errors.TrainingFailedError):
        end.result()
    types = [e["type"] for e in events_of(controller)]
    assert types.count("worker_failed") == 2 and types[-1] == "failed"
    assert run_json(tmp_path)["status"] == "failed" and run_json(tmp_path)["attempts"] == 2


def test_a_single_failure_with_max_failures_zero_raises_that_failures_own_error(tmp_path):
    failure = worker_failure(1)
    log: list[str] = []
    fit = fit_spec(tmp_path, max_failures=0)
    with pytest.raises(errors.WorkerError) as info:
        run_fit(fit, group=FakeGroup(log), run_attempt=ScriptedAttempts(log, failure))
    assert info.value is failure.error
    events = read_events(fit.storage.open())
    assert [e["type"] for e in events][-2:] == ["worker_failed", "failed"]
    assert events[-1]["error"].startswith("WorkerError: rank 1 (node 10.0.0.2) raised RuntimeError")
    assert run_json(tmp_path)["status"] == "failed"


def test_a_drain_restarts_without_counting_a_failure(tmp_path):
    drain = NodesDrained(["node-b"], step=12)
    controller, _, _ = make(tmp_path, drain, finished(), max_failures=0)
    states = step_to_end(controller)
    assert [type(s) for s in states] == [Running, Restarting, Running, Finished]
    assert states[1] == Restarting(failure=None, drained=Drain(nodes=("node-b",), step=12))
    assert controller.failures == []
    events = events_of(controller)
    drained = [e for e in events if e["type"] == "preempted"]
    assert [(e["attempt"], e["step"], e["reason"], e["nodes"]) for e in drained] == [(1, 12, "node_drain", ["node-b"])]
    assert not any(e["type"] in ("worker_failed", "failed") for e in events)
    assert run_json(tmp_path)["status"] == "finished" and run_json(tmp_path)["attempts"] == 2


def test_a_hang_restarts_like_a_worker_failure(tmp_path):
    cause = "rank 0 (node 10.0.0.1) made no progress for 5s (hang_timeout_s=4)"
    hang = AttemptFailed(FailureRecord(1, 0, "10.0.0.1", cause), errors.HangError(cause))
    controller, _, _ = make(tmp_path, hang, finished(), max_failures=1)
    states = step_to_end(controller)
    assert [type(s) for s in states] == [Running, Restarting, Running, Finished]
    assert states[1].failure.cause == cause
    failed = [e for e in events_of(controller) if e["type"] == "worker_failed"]
    assert len(failed) == 1 and "made no progress" in failed[0]["cause"]


def test_a_preemption_ends_preempted_and_fit_raises_preempted(tmp_path):
    controller, _, _ = make(tmp_path, preempted(steps=5), max_failures=3)
    states = step_to_end(controller)
    assert [type(s) for s in states] == [Running, Preempted]
    end = states[-1]
    assert end.step == 5 and end.outcome.preempted and end.outcome.results == preempted(steps=5)
    with pytest.raises(errors.Preempted, match="an emergency backup is in .*backup; run the same command again"):
        end.result()
    events = events_of(controller)
    assert events[-1]["type"] == "preempted" and events[-1]["step"] == 5 and events[-1]["attempt"] == 1
    assert run_json(tmp_path)["status"] == "preempted"


def test_an_error_that_is_not_a_worker_failure_fails_at_once_whatever_the_budget(tmp_path):
    error = ValueError("a callback raised")
    controller, runner, _ = make(tmp_path, error, finished(), max_failures=3)
    states = step_to_end(controller)
    assert [type(s) for s in states] == [Running, Failed]
    assert states[-1].error is error and states[-1].failures == ()
    assert len(runner.attempts) == 1
    events = events_of(controller)
    assert events[-1]["type"] == "failed" and events[-1]["error"] == "ValueError: a callback raised"
    assert run_json(tmp_path)["status"] == "failed"


@pytest.mark.parametrize("failures,max_failures,restart", [
    (1, 0, False),
    (1, 1, True),
    (2, 1, False),
    (2, 2, True),
    (0, 0, True),
])
def test_the_failure_policy_restarts_while_failures_are_at_most_max_failures(failures, max_failures, restart):
    records = [FailureRecord(i + 1, 0, "n", "c") for i in range(failures)]
    decision = FailurePolicy(max_failures).decide(records)
    assert isinstance(decision, FailureDecision) and decision.restart is restart
    assert str(max_failures) in decision.reason


def test_the_controller_checks_capacity_before_any_attempt_and_alone_shuts_the_group_down_once(tmp_path):
    log: list[str] = []
    fit = fit_spec(tmp_path, max_failures=1)
    outcome = run_fit(fit, group=FakeGroup(log), run_attempt=ScriptedAttempts(log, worker_failure(1), finished()))
    assert log == ["check_capacity", "attempt 1", "attempt 2", "shutdown"]
    assert outcome.results == finished()


def test_a_capacity_error_fails_before_any_attempt_or_run_json_and_the_group_is_still_shut_down(tmp_path):
    capacity = ValueError("num_workers=2 needs 2 CPU in total but the Ray cluster has 1")
    controller, runner, log = make(tmp_path, finished(), capacity_error=capacity)
    with controller:
        state = controller.step()
    assert state == Failed(capacity) and runner.attempts == []
    assert not (tmp_path / "r" / "run.json").exists()
    assert log == ["check_capacity", "shutdown"]


def test_a_backup_written_by_another_number_of_workers_fails_with_a_clear_error(tmp_path):
    controller, runner, _ = make(tmp_path, finished())
    commit_backup(controller.storage, 6, world_size=4)
    state = controller.step()
    assert isinstance(state, Failed) and isinstance(state.error, errors.OrchestratorError)
    assert "was written by 4 workers; resume with num_workers=4" in str(state.error)
    assert runner.attempts == [] and run_json(tmp_path)["status"] == "failed"


def test_finishing_deletes_the_backups_when_asked(tmp_path):
    controller, _, _ = make(tmp_path, lambda attempt: (commit_backup(attempt.storage, 3), finished())[1],
                            delete_at_end=True)
    assert isinstance(step_to_end(controller)[-1], Finished)
    assert not (tmp_path / "r" / "backup").exists()


def test_a_controller_starts_in_starting_and_cannot_step_past_its_end(tmp_path):
    controller, _, _ = make(tmp_path, finished())
    assert controller.state == Starting()
    step_to_end(controller)
    with pytest.raises(RuntimeError, match="has ended"):
        controller.step()


class RayLikeGroup(FakeGroup):
    """Installs a SIGTERM handler of its own while the controller starts, as connecting to Ray does."""

    def check_capacity(self) -> None:
        super().check_capacity()
        signal.signal(signal.SIGTERM, self.fatal)

    def fatal(self, signum: int, frame: Any) -> None:
        raise AssertionError("the driver's SIGTERM should have become a preemption")


def test_sigterm_during_fit_sets_the_preemption_flag_instead_of_killing_the_driver(tmp_path):
    def sigterm(attempt: Attempt) -> list[LoopResult]:
        os.kill(os.getpid(), signal.SIGTERM)
        assert attempt.preempt.wait(5)
        return preempted(steps=3)

    log: list[str] = []
    group = RayLikeGroup(log)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(errors.Preempted):
            run_fit(fit_spec(tmp_path), group=group, run_attempt=ScriptedAttempts(log, sigterm))
        assert signal.getsignal(signal.SIGTERM) == group.fatal  # what was there before the attempts
    finally:
        signal.signal(signal.SIGTERM, before)
    assert run_json(tmp_path)["status"] == "preempted" and log[-1] == "shutdown"


# -- the coordinator: its death, a callback that blocks, Ctrl-C ---------------------------------------

def coordinator_died(attempt: int) -> AttemptFailed:
    cause = "the coordinator (node 10.0.0.9, pid 42) died: The actor died unexpectedly before finishing this task."
    return AttemptFailed(FailureRecord(attempt, None, "10.0.0.9", cause, role=COORDINATOR),
                         errors.CoordinatorLostError(cause))


def test_the_coordinators_death_is_a_failure_restarted_from_the_newest_committed_backup(tmp_path):
    def die_after_a_backup(attempt: Attempt) -> list[LoopResult]:
        commit_backup(attempt.storage, 9)
        raise coordinator_died(attempt.number)

    controller, _, _ = make(tmp_path, die_after_a_backup, finished(), max_failures=1)
    states = step_to_end(controller)
    assert [type(s) for s in states] == [Running, Restarting, Running, Finished]
    assert states[1].failure.role == COORDINATOR and states[1].failure.who == "the coordinator"
    assert states[2].resume.folder == "backup/step-9"
    failed = [e for e in events_of(controller) if e["type"] == "worker_failed"]
    assert [(e["attempt"], e["rank"], e["node"]) for e in failed] == [(1, None, "10.0.0.9")]
    assert failed[0]["cause"].startswith("the coordinator (node 10.0.0.9, pid 42) died")


def test_the_coordinators_death_counts_against_max_failures_and_is_named_in_the_error(tmp_path):
    log: list[str] = []
    with pytest.raises(errors.CoordinatorLostError, match="the coordinator .* died"):
        run_fit(fit_spec(tmp_path, max_failures=0), group=FakeGroup(log), run_attempt=ScriptedAttempts(
            log, coordinator_died(1)))
    controller, _, _ = make(tmp_path, coordinator_died(1), worker_failure(2), max_failures=1)
    end = step_to_end(controller)[-1]
    assert isinstance(end.error, errors.TrainingFailedError)
    assert "attempt 1: the coordinator on 10.0.0.9: the coordinator (node 10.0.0.9" in str(end.error)
    assert "attempt 2: rank 1 on 10.0.0.2" in str(end.error)


def test_a_callback_that_blocks_fails_at_once_without_a_restart_whatever_the_budget(tmp_path):
    hang = errors.HangError("callback Sleepy has been running on_epoch_end on the coordinator for 11s "
                            "(hang_timeout_s=10); ... Not retried")
    controller, runner, _ = make(tmp_path, hang, finished(), max_failures=3)
    states = step_to_end(controller)
    assert [type(s) for s in states] == [Running, Failed] and states[-1].error is hang
    assert len(runner.attempts) == 1 and controller.failures == []
    events = events_of(controller)
    assert events[-1]["type"] == "failed" and events[-1]["error"].startswith("HangError: callback Sleepy")


def test_ctrl_c_during_an_attempt_shuts_the_group_down_and_reaches_the_caller(tmp_path):
    log: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_fit(fit_spec(tmp_path, max_failures=3), group=FakeGroup(log),
                run_attempt=ScriptedAttempts(log, KeyboardInterrupt(), finished()))
    assert log == ["check_capacity", "attempt 1", "shutdown"]


class RayFreeGroup:
    """The part of a WorkerGroup that run_attempt uses, without Ray; records calls in ``log``."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.promoted = True  # with storage_checked: skips the shared-storage check
        self.storage_checked = True
        self.warm_ranks = list(range(WORLD))
        self.workers: list[Any] = []

    def coordinator(self, spec: Any) -> tuple[str, str]:
        return "coordinator", "setup-ref"

    def start(self) -> list[dict]:
        return [{"node": "10.0.0.1", "node_id": f"n{r}", "pid": r} for r in range(WORLD)]

    def run(self, spec: Any, coordinator: Any) -> list[str]:
        return [f"rank-{r}" for r in range(WORLD)]

    def stop_workers(self) -> None:
        self.log.append("stop_workers")

    def release(self) -> None:
        self.log.append("release")


def test_ctrl_c_while_watching_kills_the_workers_and_the_coordinator_at_once_and_is_re_raised(tmp_path, monkeypatch):
    from orchestrator.control import attempt as attempt_module
    from orchestrator.control.watch import Relay

    log: list[str] = []

    def interrupted(*args: Any, **kwargs: Any) -> None:
        log.append("watch")
        raise KeyboardInterrupt

    monkeypatch.setattr(attempt_module, "get_within", lambda *args: None)
    monkeypatch.setattr(attempt_module, "watch", interrupted)
    monkeypatch.setattr(Relay, "call", lambda self, method, *args: {"node": "10.0.0.9", "node_id": "c", "pid": 7})
    monkeypatch.setattr(Relay, "flush", lambda self, *args, **kwargs: log.append("flush"))
    monkeypatch.setattr(attempt_module.ray, "kill", lambda actor, no_restart: log.append(f"kill {actor}"))
    fit = fit_spec(tmp_path)
    storage = fit.storage.open()
    attempt = Attempt(number=1, resume=Resume(), storage=storage, events=EventLog(storage, 1),
                      preempt=threading.Event())
    with pytest.raises(KeyboardInterrupt):
        attempt_module.run_attempt(fit, attempt, RayFreeGroup(log), FitOutcome())
    assert log == ["watch", "stop_workers", "kill coordinator"]  # no wait for the coordinator's last events


@pytest.mark.parametrize("max_failures, parks, failure, kept", [
    (1, False, "worker", True),  # a restart follows: the survivors are its warm ranks
    (0, True, "worker", True),  # the failure ends the fit, whose group is parked: the survivors start the rerun
    (0, False, "worker", False),  # nothing follows that could use them
    (1, True, "coordinator", False),  # every rank waited on the dead coordinator: nothing is kept
])
def test_an_attempt_that_failed_keeps_the_survivors_when_a_restart_or_a_parked_group_can_use_them(
        tmp_path, monkeypatch, max_failures, parks, failure, kept):
    from orchestrator.control import attempt as attempt_module
    from orchestrator.control.watch import Relay

    log: list[str] = []
    failed = worker_failure(1) if failure == "worker" else coordinator_failure(1)

    def fails(*args: Any, **kwargs: Any) -> None:
        raise failed

    monkeypatch.setattr(attempt_module, "get_within", lambda *args: None)
    monkeypatch.setattr(attempt_module, "watch", fails)
    monkeypatch.setattr(attempt_module, "keep_survivors",
                        lambda group, refs, rank: log.append(f"keep_survivors of rank {rank}"))
    monkeypatch.setattr(Relay, "call", lambda self, method, *args: {"node": "10.0.0.9", "node_id": "c", "pid": 7})
    monkeypatch.setattr(Relay, "flush", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(attempt_module.ray, "kill", lambda actor, no_restart: None)
    fit = fit_spec(tmp_path, max_failures=max_failures)
    storage = fit.storage.open()
    attempt = Attempt(number=1, resume=Resume(), storage=storage, events=EventLog(storage, 1),
                      preempt=threading.Event())
    group = RayFreeGroup(log)
    group.parks = parks
    with pytest.raises(AttemptFailed):
        attempt_module.run_attempt(fit, attempt, group, FitOutcome())
    assert ("keep_survivors of rank 1" in log) is kept
    assert log[-1] == "stop_workers"  # whatever is kept, the attempt's end kills the rest


@pytest.mark.parametrize("loader_workers, reusable", [(0, True), (2, False)])
def test_a_finished_groups_workers_are_kept_for_the_next_fit_unless_they_forked_loader_workers(
        tmp_path, loader_workers, reusable):
    controller, _, _ = make(tmp_path, finished())
    controller.fit = dataclasses.replace(
        controller.fit, loop=dataclasses.replace(controller.fit.loop, loader_workers=loader_workers))
    step_to_end(controller)
    controller._owns_group = True  # as if it had built the group on a Ray it did not start
    assert isinstance(controller.state, Finished) and controller._reusable() is reusable


def coordinator_failure(attempt: int) -> AttemptFailed:
    return AttemptFailed(FailureRecord(attempt, None, "10.0.0.1", "the coordinator died", role=COORDINATOR),
                         errors.OrchestratorError("the coordinator died"))


@pytest.mark.parametrize("ending, reusable", [
    ("worker failure", True),  # its survivors, idle and warm, start the rerun (a new process for the failed rank)
    ("coordinator failure", False),
    ("worker failure, then lease lost", False),  # the run is another driver's now
    ("worker failure, loader workers", False),  # forked loaders: fresh processes for every fit
])
def test_a_fit_that_failed_on_a_worker_keeps_its_group_for_the_next_fit_unless_the_coordinator_or_loaders_say_no(
        tmp_path, ending, reusable):
    from orchestrator.storage.lease import LeaseLost

    script = {"worker failure": [worker_failure(1)], "worker failure, loader workers": [worker_failure(1)],
              "coordinator failure": [coordinator_failure(1)],
              "worker failure, then lease lost": [worker_failure(1), LeaseLost(str(tmp_path / "r"), 2, None)]}
    controller, _, _ = make(tmp_path, *script[ending], max_failures=len(script[ending]) - 1)
    if "loader" in ending:
        controller.fit = dataclasses.replace(
            controller.fit, loop=dataclasses.replace(controller.fit.loop, loader_workers=2))
    step_to_end(controller)
    controller._owns_group = True  # as if it had built the group on a Ray it did not start
    assert isinstance(controller.state, Failed) and bool(controller.state.failures)
    assert controller._reusable() is reusable
