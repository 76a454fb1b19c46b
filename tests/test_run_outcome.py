"""What a run keeps and deletes at its end, and what a second fit of a finished run does (no Ray)."""

from __future__ import annotations

import io

import pytest

import workloads
from orchestrator import Trainer, callbacks
from orchestrator.control.states import Finished
from orchestrator.storage.checkpoint import list_steps, remove_all
from orchestrator.storage.fs import RunStorage
from orchestrator.storage.run_files import read_events, run_status
from test_controller import commit_backup, finished, make, step_to_end


def trainer(tmp_path, backup_dir: str) -> Trainer:
    return Trainer(model=workloads.tiny_model, optimizer=workloads.sgd, loss=workloads.cross_entropy,
                   data=workloads.odd_data, storage=str(tmp_path),
                   callbacks=[callbacks.BackupAndRestore(backup_dir=backup_dir)])


@pytest.mark.parametrize("backup_dir", ["/some/dir", "../elsewhere", "nested/../../out", "s3://bucket/backups"])
def test_a_backup_dir_outside_the_run_directory_is_refused_by_name_before_anything_starts(tmp_path, backup_dir):
    with pytest.raises(ValueError, match=r"BackupAndRestore\(backup_dir=\.\.\.\) must be a path inside the run"):
        trainer(tmp_path, backup_dir)


@pytest.mark.parametrize("backup_dir", ["backup", "nested/backups", "./b"])
def test_a_backup_dir_inside_the_run_directory_is_accepted(tmp_path, backup_dir):
    assert trainer(tmp_path, backup_dir).backup.backup_dir == backup_dir.rstrip("/")


def test_deleting_the_backups_removes_only_step_folders_and_keeps_what_the_user_put_there(tmp_path):
    controller, _, _ = make(tmp_path, finished())
    storage: RunStorage = controller.storage
    commit_backup(storage, 3)
    storage.write_bytes("backup/step-5/rank-0.pt", b"torn")  # an uncommitted leftover
    storage.write_bytes("backup/notes.txt", b"mine")
    storage.write_bytes("backup/keep/step-9", b"also mine")
    assert sorted(remove_all(storage, "backup")) == [3, 5]
    assert list_steps(storage, "backup") == []
    assert storage.read_bytes("backup/notes.txt") == b"mine" and storage.exists("backup/keep/step-9")


def test_an_empty_backup_folder_is_removed_with_its_last_step(tmp_path):
    controller, _, _ = make(tmp_path, finished())
    commit_backup(controller.storage, 3)
    remove_all(controller.storage, "backup")
    assert not controller.storage.exists("backup")


def test_the_outcome_is_recorded_before_any_backup_is_deleted(tmp_path, monkeypatch):
    controller, _, _ = make(tmp_path, finished(), delete_at_end=True)
    commit_backup(controller.storage, 3)
    seen_at_first_delete: list[tuple] = []
    rm = controller.storage.rm

    def recording_rm(*args, **kwargs):  # a kill here must leave a run that says "finished"
        if not seen_at_first_delete:
            seen_at_first_delete.append((run_status(controller.storage), read_events(controller.storage)[-1]["type"]))
        return rm(*args, **kwargs)

    monkeypatch.setattr(controller.storage, "rm", recording_rm)
    assert isinstance(step_to_end(controller)[-1], Finished)
    assert seen_at_first_delete == [("finished", "finished")]
    assert list_steps(controller.storage, "backup") == []


def test_a_finished_run_is_returned_as_it_finished_without_a_new_attempt(tmp_path):
    first, _, _ = make(tmp_path, finished())
    step_to_end(first)
    events = read_events(first.storage)
    again, runner, log = make(tmp_path, AssertionError("a finished run must not train again"))
    states = step_to_end(again)
    assert len(states) == 1 and isinstance(states[0], Finished)
    outcome = states[0].result()
    assert outcome.already_finished and outcome.results == [] and outcome.events == events
    assert runner.attempts == [] and "check_capacity" not in log  # nothing started, not even Ray
    assert read_events(again.storage) == events


@pytest.mark.parametrize("recorded, says", [
    ({"batch_size": 8}, "batch_size was 8 when it was written and is 32 now"),
    ({"seed": 7}, "seed was 7 when it was written and is 0 now"),
    ({"world_size": 2, "batch_size": 32, "seed": 0}, None),
])
def test_a_resume_with_another_batch_size_or_seed_fails_before_any_worker_starts(tmp_path, recorded, says):
    from orchestrator.control.states import Failed, Running
    from orchestrator.storage.checkpoint import COORDINATOR_FILE, ChecksumWriter, Manifest, commit, encode_state
    from orchestrator.storage.layout import ResumeMismatch
    controller, runner, _ = make(tmp_path, finished())
    data = encode_state({"history": [], "layout": recorded})
    controller.storage.write_bytes(f"backup/step-4/{COORDINATOR_FILE}", data)
    with ChecksumWriter(io.BytesIO()) as checksum:
        checksum.write(data)
    commit(controller.storage, "backup", Manifest(step=4, epoch=0, batch=3, phase="train", world_size=2,
                                                  files=[checksum.entry(COORDINATOR_FILE)]))
    state = controller.step()
    if says is None:
        assert isinstance(state, Running) and state.resume.folder == "backup/step-4"
        return
    assert isinstance(state, Failed) and isinstance(state.error, ResumeMismatch) and says in str(state.error)
    assert runner.attempts == []
