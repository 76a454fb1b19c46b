"""The coordinator's core on recorded reports, and its sync barrier, without Ray."""

from __future__ import annotations

import dataclasses
import io
import math
import warnings
from typing import Any

import pytest

from orchestrator.callbacks import (
    Callback,
    EarlyStopping,
    ModelCheckpoint,
    ReduceLROnPlateau,
    RollbackOnNaN,
)
from orchestrator.cluster.coordinator_core import CoordinatorCore
from orchestrator.core.events import EventType
from orchestrator.core.metrics import PhaseSums
from orchestrator.decisions import (
    Backup,
    Report,
    ReportKind,
    Rollback,
    SaveModel,
    SetLearningRate,
    SkipBatches,
    StopTraining,
)
from orchestrator.storage.checkpoint import (
    COORDINATOR_FILE,
    ChecksumWriter,
    FileEntry,
    MANIFEST,
    IncompatibleBackup,
    Manifest,
    encode_state,
    latest_valid,
    list_steps,
    rank_file,
    step_dir,
)
from orchestrator.storage.fs import StorageSpec

DIRECTIONS = {"loss": "min", "accuracy": "max"}
STEPS = 4


class Recorder(Callback):
    """Counts its hook calls, keeps the logs it saw, and an epoch counter as its state."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.seen: dict[str, dict] = {}
        self.epochs = 0

    def on_train_begin(self, logs=None):
        self.calls.append("train_begin")

    def on_test_end(self, logs=None):
        self.calls.append("test_end")
        self.seen["test_end"] = dict(logs or {})

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(f"epoch_end:{epoch}")
        self.seen["epoch_end"] = dict(logs or {})
        self.epochs += 1

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(f"batch_end:{batch}")
        self.seen["batch_end"] = dict(logs or {})

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs = int(state.get("epochs", 0))


def make_core(callbacks: list[Callback], world_size: int = 2, storage: Any = None, **kwargs: Any) -> CoordinatorCore:
    params = {"epochs": 3, "steps": STEPS, "verbose": 0, "metric_directions": dict(DIRECTIONS)}
    core = CoordinatorCore(callbacks, params, world_size, storage=storage, **kwargs)
    for cb in callbacks:
        cb.validate(params)
    return core


def reports(kind: ReportKind, world_size: int = 2, lr: float = 0.1, **fields: Any) -> dict[int, Report]:
    fields.setdefault("steps_per_epoch", STEPS)
    return {rank: Report(kind, learning_rate=lr, **fields) for rank in range(world_size)}


def epoch_end(epoch: int, train: list[PhaseSums], val: list[PhaseSums] | None = None,
              lr: float = 0.1) -> dict[int, Report]:
    return {rank: Report(ReportKind.EPOCH_END, epoch=epoch, train=sums, val=val[rank] if val else None,
                         learning_rate=lr, steps_per_epoch=STEPS, global_step=(epoch + 1) * STEPS)
            for rank, sums in enumerate(train)}


def same_loss(value: float, world_size: int = 2) -> list[PhaseSums]:
    return [PhaseSums({"loss": value}, 1) for _ in range(world_size)]


def start(core: CoordinatorCore, epoch: int = 0, lr: float = 0.1) -> list:
    made = core.handle(reports(ReportKind.TRAIN_BEGIN, lr=lr)) if epoch == 0 else []
    return made + core.handle(reports(ReportKind.EPOCH_BEGIN, epoch=epoch, lr=lr, global_step=epoch * STEPS))


def events_of(core: CoordinatorCore, kind: EventType) -> list[dict]:
    return [e for e in core.events if e["type"] is kind]


def write_rank_files(storage: Any, folder: str, rank: int, state: dict | None = None) -> list[FileEntry]:
    files = {rank_file(rank): f"the state of rank {rank}".encode()}
    if state is not None:
        files[COORDINATOR_FILE] = encode_state(state)
    entries = []
    for name, data in files.items():
        storage.write_bytes(f"{folder}/{name}", data)
        with ChecksumWriter(io.BytesIO()) as writer:
            writer.write(data)
        entries.append(writer.entry(name))
    return entries


def meta(step: int, rank: int, epoch: int = 0, **extra: Any) -> dict[str, Any]:
    return {"epoch": epoch, "batch": -1, "step": step, "phase": "epoch_end", "world_size": 2,
            "backup_dir": "backup", "keep": 1, "rank": rank, **extra}


def decide_backup(core: CoordinatorCore, step: int) -> Backup:
    """The core decides a backup of ``step`` (as a ``Backup`` from a callback at that step would)."""
    core.view.global_step = step
    (decision,) = core._record([Backup(source="test")], 0, -1)
    return decision


def persist_from_every_rank(core: CoordinatorCore, storage: Any, step: int, state: dict | None = None,
                            order: tuple[int, ...] = (0, 1), write: int | None = None) -> str:
    """Every rank reports its files of ``step`` (of the save in flight, or of save number ``write``)."""
    folder = step_dir("backup", step)
    if write is None:
        write = core.saves.write_of(folder) or decide_backup(core, step).write
    for rank in order:
        entries = write_rank_files(storage, folder, rank, state if rank == 0 else None)
        core.persisted(rank, folder, entries, meta(step, rank, write=write))
    return folder


@pytest.fixture
def storage(tmp_path):
    return StorageSpec(url=str(tmp_path), run_name="r").open()


# -- one run of the hooks per sync point ---------------------------------------------------------


def test_handle_runs_the_callbacks_once_per_sync_point_and_returns_one_decision_list_for_every_rank():
    recorder = Recorder()

    class StopAtFirstEpoch(Callback):
        def on_epoch_end(self, epoch, logs=None):
            return StopTraining(reason="enough", source="StopAtFirstEpoch")

    core = make_core([recorder, StopAtFirstEpoch()], world_size=3)
    start(core)
    made = core.handle(epoch_end(0, same_loss(1.0, 3)))
    assert recorder.calls == ["train_begin", "epoch_end:0"]
    assert made == [StopTraining(reason="enough", source="StopAtFirstEpoch")]


def test_epoch_logs_are_the_sample_weighted_mean_of_every_ranks_sums_and_validation_logs_are_prefixed_val():
    recorder = Recorder()
    core = make_core([recorder])
    start(core)
    train = [PhaseSums({"loss": 3.0, "accuracy": 1.0}, 2), PhaseSums({"loss": 1.0, "accuracy": 1.0}, 1)]
    val = [PhaseSums({"loss": 0.5}, 1), PhaseSums({"loss": 1.5}, 3)]
    core.handle(epoch_end(0, train, val))
    expected = {"loss": 4 / 3, "accuracy": 2 / 3, "val_loss": 0.5, "learning_rate": 0.1}
    assert recorder.seen["test_end"] == {"loss": 0.5}
    assert recorder.seen["epoch_end"] == pytest.approx(expected)
    assert events_of(core, EventType.EPOCH_END)[-1]["logs"] == pytest.approx(expected)
    assert core.history == [{"epoch": 0, "logs": pytest.approx(expected)}]


def test_a_non_finite_loss_on_any_rank_reaches_the_batch_hooks_as_nan_with_a_nan_detected_event():
    recorder = Recorder()
    core = make_core([recorder])
    start(core)
    batch = {rank: Report(ReportKind.BATCH_END, epoch=0, step=2, train=PhaseSums({"loss": 2.0}, 3),
                          learning_rate=0.1, nonfinite=True, steps_per_epoch=STEPS, global_step=3)
             for rank in range(2)}
    core.handle(batch)
    assert math.isnan(recorder.seen["batch_end"]["loss"])
    assert [(e["epoch"], e["step"]) for e in events_of(core, EventType.NAN_DETECTED)] == [(0, 2)]


@pytest.mark.parametrize("order", ["reduce_first", "stop_first"])
def test_decisions_follow_the_order_of_the_callbacks(order):
    reduce = ReduceLROnPlateau(monitor="loss", patience=0, factor=0.5)
    stop = EarlyStopping(monitor="loss", patience=0)
    core = make_core([reduce, stop] if order == "reduce_first" else [stop, reduce])
    start(core)
    core.handle(epoch_end(0, same_loss(1.0)))
    start(core, epoch=1)
    made = core.handle(epoch_end(1, same_loss(1.0)))
    kinds = [type(d) for d in made]
    assert kinds == ([SetLearningRate, StopTraining] if order == "reduce_first" else [StopTraining, SetLearningRate])
    assert core.view.learning_rate == 0.05


def test_ranks_that_disagree_on_the_learning_rate_stop_training_with_a_clear_error():
    core = make_core([Recorder()])
    disagreeing = {0: Report(ReportKind.TRAIN_BEGIN, learning_rate=0.1, steps_per_epoch=STEPS),
                   1: Report(ReportKind.TRAIN_BEGIN, learning_rate=0.2, steps_per_epoch=STEPS)}
    assert core.handle(disagreeing) == [StopTraining(reason="callback_error", source="coordinator")]
    assert isinstance(core.error, RuntimeError)
    assert "ranks disagree on the learning rate: {0: 0.1, 1: 0.2}" in str(core.error)
    assert core.handle(reports(ReportKind.EPOCH_BEGIN)) == [StopTraining(reason="callback_error",
                                                                          source="coordinator")]


def test_a_callback_that_raises_stops_every_rank_and_keeps_the_error_for_the_driver():
    class Broken(Callback):
        def on_epoch_begin(self, epoch, logs=None):
            raise KeyError("no such log")

    core = make_core([Broken()])
    core.handle(reports(ReportKind.TRAIN_BEGIN))
    assert core.handle(reports(ReportKind.EPOCH_BEGIN)) == [StopTraining("callback_error", "coordinator")]
    assert isinstance(core.error, KeyError) and "no such log" in core.error_traceback


def test_a_callbacks_warning_becomes_a_warning_event_for_the_driver():
    class Warns(Callback):
        def on_epoch_begin(self, epoch, logs=None):
            warnings.warn("careful", RuntimeWarning)

    core = make_core([Warns()])
    start(core)
    assert [(e["message"], e["category"]) for e in events_of(core, EventType.WARNING)] == [
        ("careful", "RuntimeWarning")]


def test_a_preempted_batch_asks_every_rank_for_an_emergency_backup_in_the_runs_folder_then_a_stop():
    core = make_core([Recorder()], backup_dir="backups", keep_backups=2)
    start(core)
    preempted = {rank: Report(ReportKind.BATCH_END, epoch=0, step=1, learning_rate=0.1, preempted=True,
                              steps_per_epoch=STEPS, global_step=2) for rank in range(2)}
    backup, stop = core.handle(preempted)
    assert (backup.backup_dir, backup.keep, backup.source) == ("backups", 2, "preemption")
    assert backup.coordinator_state is not None
    assert stop == StopTraining(reason="preempted", source="preemption")
    assert [e["step"] for e in events_of(core, EventType.PREEMPTED)] == [2]


def test_a_backup_without_a_folder_gets_the_runs_folder_and_policy_and_an_explicit_one_is_kept():
    class Backs(Callback):
        def on_epoch_end(self, epoch, logs=None):
            return [Backup(source="Backs"), Backup(backup_dir="elsewhere", keep=3, source="Backs")]

    core = make_core([Backs()], backup_dir="backup", keep_backups=2)
    start(core)
    run_folder, explicit = core.handle(epoch_end(0, same_loss(1.0)))
    assert (run_folder.backup_dir, run_folder.keep) == ("backup", 2)
    assert (explicit.backup_dir, explicit.keep) == ("elsewhere", 3)
    assert run_folder.coordinator_state == explicit.coordinator_state == core.state_dict()


# -- commit and purge ------------------------------------------------------------------------------


def test_persisted_from_every_rank_writes_the_manifest_and_purges_the_older_step(storage):
    core = make_core([Recorder()], storage=storage)
    persist_from_every_rank(core, storage, step=4)
    newest = persist_from_every_rank(core, storage, step=8)
    found = latest_valid(storage, "backup")
    assert found is not None and found.folder == newest and found.manifest.world_size == 2
    assert [f.name for f in found.manifest.files] == [rank_file(0), rank_file(1)]
    assert list_steps(storage, "backup") == [8]
    assert core.last_committed == newest
    commits = events_of(core, EventType.BACKUP_COMMITTED)
    assert [(e["folder"], e["step"], e["purged"]) for e in commits] == [("backup/step-4", 4, []),
                                                                        ("backup/step-8", 8, [4])]


def test_a_commit_event_carries_the_longest_training_stall_of_any_rank(storage):
    core = make_core([Recorder()], storage=storage)
    folder = step_dir("backup", 4)
    write = decide_backup(core, 4).write
    for rank, stall in ((0, 0.25), (1, 0.75)):
        entries = write_rank_files(storage, folder, rank, None)
        core.persisted(rank, folder, entries, meta(4, rank, write=write, stall_s=stall))
    (commit,) = events_of(core, EventType.BACKUP_COMMITTED)
    assert commit["stall_s"] == 0.75


def test_persisted_reports_out_of_rank_order_still_commit_once(storage):
    core = make_core([Recorder()], storage=storage)
    folder = decide_backup(core, 4) and step_dir("backup", 4)
    core.persisted(1, folder, write_rank_files(storage, folder, 1), meta(4, 1))
    assert latest_valid(storage, "backup") is None and events_of(core, EventType.BACKUP_COMMITTED) == []
    core.persisted(0, folder, write_rank_files(storage, folder, 0), meta(4, 0))
    assert latest_valid(storage, "backup").folder == folder
    assert len(events_of(core, EventType.BACKUP_COMMITTED)) == 1


def test_a_failed_rank_emits_backup_failed_and_its_step_never_commits(storage):
    core = make_core([Recorder()], storage=storage)
    folder = decide_backup(core, 4) and step_dir("backup", 4)
    core.persisted(0, folder, write_rank_files(storage, folder, 0), meta(4, 0))
    core.persisted(1, folder, None, meta(4, 1, error="OSError: disk full"))
    assert [(e["rank"], e["folder"], e["step"], e["error"]) for e in events_of(core, EventType.BACKUP_FAILED)] == [
        (1, folder, 4, "OSError: disk full")]
    assert latest_valid(storage, "backup") is None and core.last_committed is None


@pytest.mark.parametrize("order", [(0, 1, 0), (1, 0, 0), (0, 0, 1)])
def test_a_save_any_rank_failed_is_never_committed_whatever_the_order_of_reports(storage, order):
    core = make_core([Recorder()], storage=storage)
    folder = step_dir("backup", 4)
    write = decide_backup(core, 4).write
    failed_once = False
    for rank in order:
        if rank == 0 and not failed_once:
            failed_once = True
            core.persisted(0, folder, None, meta(4, 0, error="OSError: disk full", write=write))
        else:
            core.persisted(rank, folder, write_rank_files(storage, folder, rank), meta(4, rank, write=write))
    assert latest_valid(storage, "backup") is None and core.last_committed is None
    assert events_of(core, EventType.BACKUP_COMMITTED) == []


def test_a_folder_saved_again_commits_only_the_entries_of_its_newest_save(storage):
    core = make_core([Recorder()], storage=storage)
    folder = step_dir("backup", 4)
    first = decide_backup(core, 4).write
    stale = write_rank_files(storage, folder, 0)
    second = decide_backup(core, 4).write  # the same step saved again (after a rollback replayed it)
    core.persisted(0, folder, stale, meta(4, 0, write=first))  # the first save's late report
    core.persisted(1, folder, write_rank_files(storage, folder, 1), meta(4, 1, write=second))
    assert core.last_committed is None  # rank 0's report of the newest save is still missing
    fresh = [dataclasses.replace(e, size=e.size + 1) for e in stale]  # another content, same names
    core.persisted(0, folder, fresh, meta(4, 0, write=second))
    (commit,) = events_of(core, EventType.BACKUP_COMMITTED)
    assert commit["folder"] == folder
    committed = Manifest.from_json(storage.read_json(f"{folder}/{MANIFEST}")).files
    assert {f.name: f.size for f in committed}[rank_file(0)] == fresh[0].size  # never the stale entry


def test_a_backup_committed_in_another_layout_version_is_refused_by_name_and_never_deleted(storage):
    core = make_core([Recorder()], storage=storage)
    older = persist_from_every_rank(core, storage, step=4)
    manifest = storage.read_json(f"{older}/manifest.json")
    storage.write_json(f"{older}/manifest.json", dict(manifest, version=2))
    with pytest.raises(IncompatibleBackup, match=r"backup/step-4 was committed in layout version 2"):
        latest_valid(storage, "backup")
    assert list_steps(storage, "backup") == [4] and storage.exists(f"{older}/manifest.json")


# -- rollback ----------------------------------------------------------------------------------------


def test_survives_rollback_is_declared_on_every_callback_and_only_rollback_on_nan_sets_it():
    assert Callback.survives_rollback is False and Recorder().survives_rollback is False
    assert RollbackOnNaN.survives_rollback is True


def test_a_rollback_reloads_the_coordinator_state_of_the_newest_committed_folder_except_survivors(storage):
    recorder, rollback = Recorder(), RollbackOnNaN(lr_factor=0.5)
    core = make_core([recorder, rollback], storage=storage)
    (initial,) = core.handle(reports(ReportKind.TRAIN_BEGIN))
    assert isinstance(initial, Backup) and (initial.backup_dir, initial.source) == ("backup", "RollbackOnNaN")
    folder = persist_from_every_rank(core, storage, step=0, state=initial.coordinator_state)

    core.handle(reports(ReportKind.EPOCH_BEGIN, epoch=0))
    core.handle(epoch_end(0, same_loss(1.0)))
    core.handle(reports(ReportKind.EPOCH_BEGIN, epoch=1, global_step=STEPS))
    assert recorder.epochs == 1 and len(core.history) == 1
    nan = {rank: Report(ReportKind.BATCH_END, epoch=1, step=1, train=PhaseSums({"loss": 1.0}, 2),
                        learning_rate=0.1, nonfinite=rank == 1, steps_per_epoch=STEPS, global_step=STEPS + 2)
           for rank in range(2)}
    made = core.handle(nan)

    assert made == [SkipBatches(((1, 1),)), Rollback(lr_factor=0.5, folder=folder, source="RollbackOnNaN")]
    assert recorder.epochs == 0 and core.history == []  # back to the committed state
    assert rollback.rollbacks == 1 and rollback.skipped == [(1, 1)]  # a survivor keeps its own
    assert core.view.learning_rate == pytest.approx(0.05)
    assert [(e["folder"], e["skip"]) for e in events_of(core, EventType.ROLLED_BACK)] == [(folder, [[1, 1]])]


@pytest.mark.parametrize("target_step", [0, STEPS], ids=["initial-backup", "epoch-end-backup"])
def test_a_rolled_back_event_names_the_bad_step_the_target_step_and_the_callbacks_counts(storage, target_step):
    core = make_core([RollbackOnNaN(max_rollbacks=2, lr_factor=0.5)], storage=storage)
    (initial,) = core.handle(reports(ReportKind.TRAIN_BEGIN))
    persist_from_every_rank(core, storage, step=0, state=initial.coordinator_state)
    core.handle(reports(ReportKind.EPOCH_BEGIN, epoch=0))
    core.handle(epoch_end(0, same_loss(1.0)))
    if target_step:
        backup = decide_backup(core, target_step)
        persist_from_every_rank(core, storage, step=target_step, state=backup.coordinator_state, write=backup.write)
    core.handle(reports(ReportKind.EPOCH_BEGIN, epoch=1, global_step=STEPS))
    core.handle(_nan_at(step=2, epoch=1))  # the 3rd step of epoch 1: global step STEPS + 3

    (event,) = events_of(core, EventType.ROLLED_BACK)
    assert {k: event[k] for k in ("epoch", "step", "bad_step", "target_step", "folder", "lr_factor", "learning_rate",
                                  "monitor", "rollbacks", "max_rollbacks", "source")} == {
        "epoch": 1, "step": 2, "bad_step": STEPS + 3, "target_step": target_step, "folder": step_dir("backup", target_step),
        "lr_factor": 0.5, "learning_rate": pytest.approx(0.05), "monitor": "loss", "rollbacks": 1, "max_rollbacks": 2,
        "source": "RollbackOnNaN"}
    assert math.isnan(event["value"])  # the cluster-wide loss of the bad step
    resumes = (1, 0) if target_step else (0, 0)  # the replay starts where the target's epoch resumes
    assert (core.position.epoch, core.position.done, core.position.global_step) == (*resumes, target_step)


def _nan_at(step: int, epoch: int = 1) -> dict[int, Report]:
    return {rank: Report(ReportKind.BATCH_END, epoch=epoch, step=step, train=PhaseSums({"loss": 1.0}, 2),
                         learning_rate=0.1, nonfinite=rank == 1, steps_per_epoch=STEPS,
                         global_step=epoch * STEPS + step + 1) for rank in range(2)}


@pytest.mark.parametrize("backup_first", [True, False])
def test_a_backup_and_a_rollback_decided_at_the_same_sync_point_roll_back_and_never_back_up(storage, backup_first):
    from orchestrator.callbacks import BackupAndRestore
    backups, rollback = BackupAndRestore(save_freq=2), RollbackOnNaN()
    core = make_core([backups, rollback] if backup_first else [rollback, backups], storage=storage)
    (initial,) = core.handle(reports(ReportKind.TRAIN_BEGIN))
    target = persist_from_every_rank(core, storage, step=0, state=initial.coordinator_state)
    core.handle(reports(ReportKind.EPOCH_BEGIN, epoch=0))
    made = core.handle(_nan_at(step=1, epoch=0))  # global step 2: BackupAndRestore's turn too

    assert not any(isinstance(d, Backup) for d in made)
    assert Rollback(folder=target, source="RollbackOnNaN") in made
    assert [e["reason"] for e in events_of(core, EventType.BACKUP_SKIPPED)] == [
        "backup decided by BackupAndRestore not taken: rolled back at the same sync point"]
    assert latest_valid(storage, "backup").folder == target  # the rollback target is still there


def test_a_non_finite_step_is_never_backed_up_even_without_a_rollback(storage):
    from orchestrator.callbacks import BackupAndRestore, TerminateOnNaN
    core = make_core([BackupAndRestore(save_freq=1), TerminateOnNaN()], storage=storage)
    core.handle(reports(ReportKind.TRAIN_BEGIN))
    core.handle(reports(ReportKind.EPOCH_BEGIN, epoch=0))
    made = core.handle(_nan_at(step=0, epoch=0))
    assert [type(d).__name__ for d in made] == ["StopTraining"]
    assert "the step was not finite" in events_of(core, EventType.BACKUP_SKIPPED)[0]["reason"]


def test_a_save_in_flight_when_the_run_rolls_back_never_commits_nor_purges_the_rollback_target(storage):
    core = make_core([RollbackOnNaN()], storage=storage)
    (initial,) = core.handle(reports(ReportKind.TRAIN_BEGIN))
    target = persist_from_every_rank(core, storage, step=0, state=initial.coordinator_state)
    core.handle(reports(ReportKind.EPOCH_BEGIN, epoch=0))
    in_flight = decide_backup(core, 2).write  # still being written by the ranks ...
    core.handle(_nan_at(step=2, epoch=0))  # ... when the run rolls back to step 0
    persist_from_every_rank(core, storage, step=2, write=in_flight)  # its reports arrive late

    assert core.last_committed == target and events_of(core, EventType.BACKUP_COMMITTED)[-1]["folder"] == target
    assert latest_valid(storage, "backup").folder == target
    assert any("abandoned" in e["reason"] for e in events_of(core, EventType.BACKUP_SKIPPED))


def test_a_rollback_before_any_commit_stops_training_with_a_warning():
    core = make_core([RollbackOnNaN()])
    core.handle(reports(ReportKind.TRAIN_BEGIN))
    core.handle(reports(ReportKind.EPOCH_BEGIN))
    nan = reports(ReportKind.BATCH_END, epoch=0, step=0, train=PhaseSums({"loss": math.inf}, 1), nonfinite=True,
                  global_step=1)
    assert core.handle(nan)[-1] == StopTraining(reason="nan_detected", source="RollbackOnNaN")
    assert "no backup has been committed yet" in events_of(core, EventType.WARNING)[0]["message"]


# -- what positions mean: every rank the same data, a resume the same layout -----------------------------


def layout(samples: int = 101, **changes: Any) -> dict[str, Any]:
    return {"world_size": 2, "batch_size": 16, "seed": 0, "samples": samples,
            "parameters": {"0.weight": [10, 64], "0.bias": [10]}, **changes}


def test_ranks_with_training_sets_of_different_lengths_fail_at_train_begin_naming_each_ranks_length():
    core = make_core([Recorder()])
    begin = {0: Report(ReportKind.TRAIN_BEGIN, learning_rate=0.1, steps_per_epoch=4, layout=layout(101)),
             1: Report(ReportKind.TRAIN_BEGIN, learning_rate=0.1, steps_per_epoch=3, layout=layout(90))}
    assert core.handle(begin) == [StopTraining(reason="callback_error", source="coordinator")]
    message = str(core.error)
    assert "rank 0: 101 samples, 4 steps per epoch" in message and "rank 1: 90 samples, 3 steps per epoch" in message
    assert "same training set on every rank" in message


@pytest.mark.parametrize("field, changed, says", [
    ("samples", layout(96), "samples was 101 when it was written and is 96 now"),
    ("parameters", layout(parameters={"0.weight": [20, 64], "0.bias": [20]}),
     "parameters was 0.bias [10] when it was written and is [20] now"),
    ("parameters", layout(parameters={"0.weight": [10, 64]}), "parameters was 0.bias [10] when it was written and "
                                                              "is absent now"),
])
def test_a_resume_with_another_training_set_or_model_fails_before_the_first_step_naming_the_field(field, changed,
                                                                                                  says):
    from orchestrator.storage.layout import ResumeMismatch
    core = make_core([Recorder()], restore={"layout": layout()}, resumed_from="backup/step-8")
    made = core.handle({rank: Report(ReportKind.TRAIN_BEGIN, learning_rate=0.1, steps_per_epoch=4, layout=changed)
                        for rank in range(2)})
    assert made == [StopTraining(reason="callback_error", source="coordinator")]
    assert isinstance(core.error, ResumeMismatch) and says in str(core.error)
    assert str(core.error).startswith("cannot resume from backup/step-8:")


def test_a_resume_with_the_same_layout_goes_on_and_every_backup_records_the_layout():
    core = make_core([Recorder()], restore={"layout": layout()}, resumed_from="backup/step-8")
    core.handle({rank: Report(ReportKind.TRAIN_BEGIN, learning_rate=0.1, steps_per_epoch=4, layout=layout())
                 for rank in range(2)})
    assert core.error is None and core.state_dict()["layout"] == layout()


# -- the event vocabulary ------------------------------------------------------------------------------


def test_dispatch_knows_every_report_kind():
    core = make_core([])
    for kind in ReportKind:
        core.handle(reports(kind))
    assert core.error is None


def test_every_event_the_core_emits_is_a_vocabulary_member_with_only_its_declared_fields(storage, tmp_path):
    callbacks = [ReduceLROnPlateau(monitor="loss", patience=0), EarlyStopping(monitor="loss", patience=1),
                 ModelCheckpoint("m.pt", monitor="loss"), RollbackOnNaN()]
    core = make_core(callbacks, storage=storage)
    (initial,) = core.handle(reports(ReportKind.TRAIN_BEGIN))
    persist_from_every_rank(core, storage, step=0, state=initial.coordinator_state)
    for epoch in range(3):
        start(core, epoch=epoch, lr=core.view.learning_rate)
        core.progress(epoch, 1, {"loss": 1.0})
        made = core.handle(epoch_end(epoch, same_loss(1.0), same_loss(2.0), lr=core.view.learning_rate))
    assert any(isinstance(d, StopTraining) for d in made) and any(isinstance(d, SaveModel) for d in made)
    core.handle(reports(ReportKind.BATCH_END, epoch=2, step=1, train=same_loss(1.0)[0], nonfinite=True,
                        lr=core.view.learning_rate, global_step=10))
    core.handle(reports(ReportKind.BATCH_END, epoch=2, step=2, preempted=True, lr=core.view.learning_rate,
                        global_step=11))
    core.persisted(1, step_dir("backup", 11), None, meta(11, 1, error="boom"))
    core.handle(reports(ReportKind.TRAIN_END, epoch=2))
    events = core.drain()

    emitted = {e["type"] for e in events}
    assert emitted >= {EventType.TRAIN_BEGIN, EventType.EPOCH_BEGIN, EventType.EPOCH_END, EventType.PROGRESS,
                       EventType.LR_CHANGED, EventType.STOP, EventType.CHECKPOINT_SAVED, EventType.BACKUP_COMMITTED,
                       EventType.NAN_DETECTED, EventType.ROLLED_BACK, EventType.PREEMPTED, EventType.BACKUP_FAILED,
                       EventType.BATCH_END, EventType.TRAIN_END}
    for event in events:
        assert isinstance(event["type"], EventType)
        assert set(event) - {"time", "type", "epoch", "step"} <= set(event["type"].fields), event
    assert core.drain() == []


def test_a_sealed_core_commits_nothing_more_so_every_commit_has_its_event(storage):
    core = make_core([Recorder()], storage=storage)
    write = decide_backup(core, 4).write
    core.seal()  # the attempt is ending: its last events are being drained
    persist_from_every_rank(core, storage, step=4, write=write)
    assert latest_valid(storage, "backup") is None and events_of(core, EventType.BACKUP_COMMITTED) == []
