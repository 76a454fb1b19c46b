"""TensorBoard: Keras's tags and run folders, batch scalars, fsspec/S3 files, one value per step across restores.

The hooks run in a real :class:`CoordinatorCore` on a real local (or moto S3) run storage; the files
are read back with tensorboard's own ``EventAccumulator``.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import pytest

from orchestrator.callbacks import Callback, TensorBoard
from orchestrator.cluster.coordinator_core import CoordinatorCore
from orchestrator.core.metrics import PhaseSums
from orchestrator.decisions import Report, ReportKind, WriteHistograms
from orchestrator.storage.fs import StorageSpec
from orchestrator.storage.tb_events import EventFiles, event_file_index, event_file_name, scalar_event
import s3_server as moto

s3_server, s3_bucket = moto.s3_server, moto.s3_bucket  # the moto fixtures, requested by name

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

STEPS = 4  # steps per epoch in the simulated runs


# -- helpers ----------------------------------------------------------------------------------


def read(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of one run folder: [(step, value)] in the order TensorBoard keeps them."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(s.step, s.value) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def logs_of(epoch: int, attempt: int = 1) -> dict[str, float]:
    """Epoch logs that differ per epoch and per attempt (so a replay is told from the original)."""
    return {"loss": 1.0 / (epoch + 1) + attempt, "accuracy": 0.1 * epoch + attempt / 100,
            "val_loss": 2.0 / (epoch + 1) + attempt, "val_accuracy": 0.2 * epoch + attempt / 100}


def batch_loss(global_step: int, attempt: int = 1) -> float:
    return 10.0 / global_step + attempt


class Coordinator:
    """One rank driving a real CoordinatorCore: the hooks run in the coordinator's order, on its logs."""

    def __init__(self, storage, callbacks, restore=None, lr: float = 0.1):
        self.core = CoordinatorCore(list(callbacks), {"epochs": 10, "steps": STEPS, "verbose": 0}, world_size=1,
                                    storage=storage, restore=restore)
        self.lr = lr

    def sync(self, kind, **fields):
        decisions = self.core.handle({0: Report(kind, learning_rate=self.lr, steps_per_epoch=STEPS, **fields)})
        if self.core.error is not None:
            raise self.core.error
        for event in self.core.drain():
            if event["type"] == "warning":
                warnings.warn(event["message"], RuntimeWarning)
        return decisions

    def begin(self, global_step: int = 0):
        self.sync(ReportKind.TRAIN_BEGIN, global_step=global_step)

    def batches(self, epoch: int, first: int = 0, attempt: int = 1, last: int = STEPS):
        """Batch sync points ``first..last-1`` of ``epoch`` (each with the running loss)."""
        for step in range(first, last):
            g = epoch * STEPS + step + 1
            self.sync(ReportKind.BATCH_END, epoch=epoch, step=step, global_step=g,
                      train=PhaseSums({"loss": batch_loss(g, attempt)}, 1))

    def epoch(self, epoch: int, attempt: int = 1, batches: bool = False, first: int = 0):
        if first == 0:
            self.sync(ReportKind.EPOCH_BEGIN, epoch=epoch, global_step=epoch * STEPS)
        if batches:
            self.batches(epoch, first, attempt)
        logs = logs_of(epoch, attempt)
        train = PhaseSums({k: v for k, v in logs.items() if not k.startswith("val_")}, 1)
        val = PhaseSums({k[4:]: v for k, v in logs.items() if k.startswith("val_")}, 1)
        return self.sync(ReportKind.EPOCH_END, epoch=epoch, train=train, val=val, global_step=(epoch + 1) * STEPS)

    def end(self, epoch: int):
        self.sync(ReportKind.TRAIN_END, epoch=epoch)

    def state(self) -> dict:
        """What a backup taken now would hold (the coordinator's state, with every callback's)."""
        return self.core.state_dict()


@pytest.fixture
def storage(tmp_path):
    return StorageSpec(str(tmp_path / "runs"), "digits").open()


def logs_dir(storage) -> str:
    return storage.path("logs")


# -- what is written where --------------------------------------------------------------------


def test_epoch_scalars_use_keras_tags_in_train_and_validation_folders_at_step_epoch(storage):
    coord = Coordinator(storage, [TensorBoard()])
    coord.begin()
    for epoch in range(3):
        coord.epoch(epoch)
    coord.end(2)

    train, val = read(f"{logs_dir(storage)}/train"), read(f"{logs_dir(storage)}/validation")
    assert sorted(train) == ["epoch_accuracy", "epoch_learning_rate", "epoch_loss"]
    assert sorted(val) == ["epoch_accuracy", "epoch_loss", "evaluation_accuracy_vs_iterations",
                           "evaluation_loss_vs_iterations"]
    for epoch in range(3):
        logs = logs_of(epoch)
        assert train["epoch_loss"][epoch] == (epoch, pytest.approx(logs["loss"]))
        assert train["epoch_accuracy"][epoch] == (epoch, pytest.approx(logs["accuracy"]))
        assert train["epoch_learning_rate"][epoch] == (epoch, pytest.approx(0.1))
        assert val["epoch_loss"][epoch] == (epoch, pytest.approx(logs["val_loss"]))
        assert val["epoch_accuracy"][epoch] == (epoch, pytest.approx(logs["val_accuracy"]))
        # Keras's on_test_end scalars: step = optimizer steps so far
        assert val["evaluation_loss_vs_iterations"][epoch] == ((epoch + 1) * STEPS, pytest.approx(logs["val_loss"]))


def test_batch_scalars_are_written_every_update_freq_steps_tagged_by_global_step(storage):
    other = Callback()
    other.batch_sync_every = 1  # another callback syncs every step: TensorBoard still writes every 2nd
    coord = Coordinator(storage, [TensorBoard(update_freq=2), other])
    coord.begin()
    coord.epoch(0, batches=True)
    coord.epoch(1, batches=True)
    coord.end(1)

    train = read(f"{logs_dir(storage)}/train")
    assert train["batch_loss"] == [(g, pytest.approx(batch_loss(g))) for g in (2, 4, 6, 8)]
    assert [s for s, _ in train["epoch_loss"]] == [0, 1]


@pytest.mark.parametrize("update_freq,sync_every,stored", [
    ("epoch", None, "epoch"),
    ("batch", 1, 1),
    (1, 1, 1),
    (25, 25, 25),
])
def test_update_freq_sets_the_batch_sync_interval(update_freq, sync_every, stored):
    board = TensorBoard(update_freq=update_freq)
    assert (board.batch_sync_every, board.update_freq) == (sync_every, stored)


def test_steps_per_second_are_logged_per_epoch_and_per_batch_write(storage):
    coord = Coordinator(storage, [TensorBoard(update_freq=2, write_steps_per_second=True)])
    coord.begin()
    coord.epoch(0, batches=True)
    coord.end(0)
    train = read(f"{logs_dir(storage)}/train")
    assert [s for s, _ in train["batch_steps_per_second"]] == [2, 4]
    assert [s for s, _ in train["epoch_steps_per_second"]] == [0]
    assert all(v >= 0 and math.isfinite(v) for _, v in train["batch_steps_per_second"] + train["epoch_steps_per_second"])


@pytest.mark.parametrize("log_dir,where", [
    ("logs", "logs"),
    ("logs/", "logs"),
    ("tb", "logs/tb"),
    ("logs/exp1", "logs/exp1"),
    ("exp/a", "logs/exp/a"),
])
def test_a_relative_log_dir_lands_under_run_logs(storage, log_dir, where):
    coord = Coordinator(storage, [TensorBoard(log_dir=log_dir)])
    coord.begin()
    coord.epoch(0)
    assert read(storage.path(where, "train"))["epoch_loss"] == [(0, pytest.approx(logs_of(0)["loss"]))]


def test_an_absolute_log_dir_is_written_as_given(storage, tmp_path):
    target = tmp_path / "elsewhere" / "tb"
    coord = Coordinator(storage, [TensorBoard(log_dir=str(target))])
    coord.begin()
    coord.epoch(0)
    assert [s for s, _ in read(target / "train")["epoch_loss"]] == [0]


def test_a_log_dir_on_another_filesystem_fails_at_train_begin(storage):
    coord = Coordinator(storage, [TensorBoard(log_dir="memory://elsewhere/tb")])
    with pytest.raises(ValueError, match="protocol 'memory'"):
        coord.begin()


def test_event_file_names_sort_in_write_order():
    names = [event_file_name(i, "digits") for i in (1, 2, 9, 10, 11, 100, 12345)]
    assert sorted(names) == names
    assert [event_file_index(n, "digits") for n in names] == [1, 2, 9, 10, 11, 100, 12345]
    assert event_file_index(names[0], "other") is None
    assert event_file_index("events.out.tfevents.1700000000.host.123.0.v2", "digits") is None


# -- restores and rollbacks -------------------------------------------------------------------


def test_a_restored_run_writes_each_epoch_once_with_the_values_of_the_replay(storage):
    first = Coordinator(storage, [TensorBoard(update_freq=2)])
    first.begin()
    first.epoch(0, batches=True)
    first.epoch(1, batches=True)
    backup = first.state()  # the newest committed backup holds the end of epoch 1
    first.epoch(2, batches=True)
    first.epoch(3, batches=True)  # ... then a worker fails: epochs 2 and 3 are replayed

    second = Coordinator(storage, [TensorBoard(update_freq=2)], restore=backup)
    second.begin(global_step=2 * STEPS)
    second.epoch(2, attempt=2, batches=True)
    second.epoch(3, attempt=2, batches=True)
    second.epoch(4, attempt=2, batches=True)
    second.end(4)

    train, val = read(f"{logs_dir(storage)}/train"), read(f"{logs_dir(storage)}/validation")
    expect_attempt = {0: 1, 1: 1, 2: 2, 3: 2, 4: 2}
    assert train["epoch_loss"] == [(e, pytest.approx(logs_of(e, a)["loss"])) for e, a in expect_attempt.items()]
    assert val["epoch_loss"] == [(e, pytest.approx(logs_of(e, a)["val_loss"])) for e, a in expect_attempt.items()]
    assert val["evaluation_loss_vs_iterations"] == [
        ((e + 1) * STEPS, pytest.approx(logs_of(e, a)["val_loss"])) for e, a in expect_attempt.items()]
    assert train["batch_loss"] == [(g, pytest.approx(batch_loss(g, 1 if g <= 2 * STEPS else 2)))
                                   for g in range(2, 5 * STEPS + 1, 2)]


def test_a_mid_epoch_restore_writes_the_values_the_backup_had_not_flushed(storage):
    class SlowFlush(TensorBoard):
        flush_interval_s = 1e9  # batch values wait for the epoch end

    first = Coordinator(storage, [SlowFlush(update_freq=1)])
    first.begin()
    first.epoch(0, batches=True)
    first.sync(ReportKind.EPOCH_BEGIN, epoch=1, global_step=STEPS)
    first.batches(1, 0, last=2)
    backup = first.state()  # mid-epoch: steps 5 and 6 are still in memory, and in the backup
    assert [p["step"] for p in backup["callbacks"][0]["pending"]] == [5, 6]
    first.batches(1, 2)  # steps 7, 8 then the failure

    second = Coordinator(storage, [SlowFlush(update_freq=1)], restore=backup)
    second.begin(global_step=STEPS + 2)
    second.epoch(1, attempt=2, batches=True, first=2)
    second.end(1)

    train = read(f"{logs_dir(storage)}/train")
    assert train["batch_loss"] == [(g, pytest.approx(batch_loss(g, 1 if g <= 6 else 2))) for g in range(1, 9)]
    assert [s for s, _ in train["epoch_loss"]] == [0, 1]


def test_a_rollback_to_an_older_state_replays_each_step_once(storage):
    board = TensorBoard(update_freq=1)
    coord = Coordinator(storage, [board])
    coord.begin()
    coord.epoch(0, batches=True)
    saved = board.state_dict()
    coord.epoch(1, batches=True)  # a NaN at the end of epoch 1, say: roll back to the end of epoch 0
    board.load_state_dict(saved)  # what the coordinator does to every callback on a rollback
    coord.epoch(1, attempt=3, batches=True)
    coord.end(1)

    train = read(f"{logs_dir(storage)}/train")
    assert train["batch_loss"] == [(g, pytest.approx(batch_loss(g, 1 if g <= STEPS else 3))) for g in range(1, 9)]
    assert train["epoch_loss"] == [(0, pytest.approx(logs_of(0)["loss"])), (1, pytest.approx(logs_of(1, 3)["loss"]))]


def test_restarting_without_a_backup_replaces_the_old_files_but_keeps_other_writers_files(storage):
    first = Coordinator(storage, [TensorBoard()])
    first.begin()
    first.epoch(0)
    first.epoch(1)  # fails before any backup: the run starts over
    foreign = EventFiles(storage, "logs", owner="another-run")
    foreign.write("train", 1, [scalar_event(7, 0.0, {"foreign": 1.0})], wall_time=0.0)

    second = Coordinator(storage, [TensorBoard()])
    second.begin()
    second.epoch(0, attempt=2)
    second.end(0)

    train = read(f"{logs_dir(storage)}/train")
    assert train["epoch_loss"] == [(0, pytest.approx(logs_of(0, 2)["loss"]))]
    assert train["foreign"] == [(7, 1.0)]


def test_new_files_sort_after_files_left_by_a_failed_attempt(storage):
    first = Coordinator(storage, [TensorBoard()])
    first.begin()
    first.epoch(0)
    backup = first.state()
    first.epoch(1)
    first.epoch(2)
    names_before = set(os.listdir(f"{logs_dir(storage)}/train"))

    second = Coordinator(storage, [TensorBoard()], restore=backup)
    second.begin(global_step=STEPS)
    second.epoch(1, attempt=2)
    names = sorted(os.listdir(f"{logs_dir(storage)}/train"))
    new = [n for n in names if n not in names_before]
    assert len(names) == 2 and len(new) == 1 and names[-1] == new[0]


# -- histograms ---------------------------------------------------------------------------------


def test_histograms_are_decided_every_histogram_freq_epochs_in_a_train_file_sorted_after_the_scalars(storage):
    coord = Coordinator(storage, [TensorBoard(histogram_freq=2)])
    coord.begin()
    decided = {}
    for epoch in range(5):
        decided[epoch] = [d for d in coord.epoch(epoch) if isinstance(d, WriteHistograms)]
        written = sorted(os.listdir(f"{logs_dir(storage)}/train"))
        for d in decided[epoch]:  # rank 0 writes it after the epoch's scalar file
            assert d.filepath.startswith("logs/train/events.out.tfevents.")
            assert os.path.basename(d.filepath) > written[-1]
    assert {e: [d.step for d in ds] for e, ds in decided.items()} == {0: [0], 1: [], 2: [2], 3: [], 4: [4]}
    assert coord.state()["callbacks"][0]["files"] == [[1, 13]]  # 5 x (train, validation) + 3 histogram files


def read_histograms(folder) -> dict[str, list]:
    acc = EventAccumulator(str(folder), size_guidance={"histograms": 0})
    acc.Reload()
    return {tag: acc.Histograms(tag) for tag in acc.Tags()["histograms"]}


def test_rank_0_writes_weight_histograms_with_keras_tags_that_tensorboard_reads(storage):
    import torch

    from orchestrator.loop.saver import RankSaver

    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.arange(12.0).reshape(3, 4))  # 0..11: 4 buckets of 3 values each
        model.bias.fill_(0.5)  # constant: one bucket
        model.bias[1] = float("nan")  # left out
    decision = WriteHistograms("logs/train/" + event_file_name(5, "digits"), step=3, bins=4)
    savers = [RankSaver({}, rank=r, world_size=2, storage=storage, on_persisted=lambda *a: None) for r in (1, 0)]
    for saver in savers:  # every rank applies the decision; rank 0 only writes
        saver.write_histograms(decision, model)
        saver.flush()

    hists = read_histograms(f"{logs_dir(storage)}/train")
    assert sorted(hists) == ["bias/histogram", "weight/histogram"]
    [weight] = hists["weight/histogram"]
    h = weight.histogram_value
    assert (weight.step, h.min, h.max, h.num, h.sum, h.sum_squares) == (3, 0.0, 11.0, 12, 66.0, 506.0)
    assert (list(h.bucket_limit), list(h.bucket)) == ([2.75, 5.5, 8.25, 11.0], [3.0, 3.0, 3.0, 3.0])
    [bias] = hists["bias/histogram"]
    assert (bias.histogram_value.num, list(bias.histogram_value.bucket)) == (2, [2.0])


def test_a_histogram_write_that_fails_is_logged_and_training_goes_on(storage, caplog):
    import torch

    from orchestrator.loop.tb_histograms import HistogramWriter

    blocker = storage.path("logs", "train")
    os.makedirs(os.path.dirname(blocker), exist_ok=True)
    with open(blocker, "w") as f:
        f.write("x")
    writer = HistogramWriter(storage)
    writer.write(WriteHistograms("logs/train/" + event_file_name(1, "digits"), step=0), torch.nn.Linear(2, 2))
    writer.wait()
    assert "histograms of step 0 not written" in caplog.text


# -- storage failures -------------------------------------------------------------------------


def test_a_failed_write_warns_and_the_values_are_written_with_the_next_flush(storage):
    coord = Coordinator(storage, [TensorBoard()])
    coord.begin()
    blocker = storage.path("logs", "train")
    os.makedirs(os.path.dirname(blocker), exist_ok=True)
    with open(blocker, "w") as f:  # a file where the run folder should be: every write fails
        f.write("x")
    with pytest.warns(RuntimeWarning, match="could not write"):
        coord.epoch(0)
    os.remove(blocker)
    coord.epoch(1)
    assert [s for s, _ in read(f"{logs_dir(storage)}/train")["epoch_loss"]] == [0, 1]


# -- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,name", [
    ({"update_freq": 0}, "update_freq"),
    ({"update_freq": "step"}, "update_freq"),
    ({"update_freq": True}, "update_freq"),
    ({"update_freq": 2.5}, "update_freq"),
    ({"histogram_freq": -1}, "histogram_freq"),
    ({"histogram_freq": 1.5}, "histogram_freq"),
    ({"write_graph": "yes"}, "write_graph"),
    ({"write_images": True}, "write_images"),
    ({"write_steps_per_second": 1}, "write_steps_per_second"),
    ({"profile_batch": 5}, "profile_batch"),
    ({"profile_batch": (10, 20)}, "profile_batch"),
    ({"embeddings_freq": 1}, "embeddings_freq"),
    ({"embeddings_metadata": "meta.tsv"}, "embeddings_metadata"),
    ({"log_dir": ""}, "log_dir"),
    ({"log_dir": 3}, "log_dir"),
    ({"log_dir": "../elsewhere"}, "log_dir"),
    ({"log_dir": "logs/../../x"}, "log_dir"),
])
def test_bad_arguments_are_rejected_by_name(kwargs, name):
    with pytest.raises(ValueError, match=rf"TensorBoard\({name}="):
        TensorBoard(**kwargs)


def test_keras_defaults_construct_and_write_graph_is_accepted():
    board = TensorBoard()
    assert (board.log_dir, board.histogram_freq, board.write_graph, board.update_freq) == ("logs", 0, True, "epoch")
    assert TensorBoard(write_graph=False).write_graph is False


def test_without_tensorboard_installed_construction_names_the_extra_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r'pip install "orchestrator\[tensorboard\]"'):
        TensorBoard()


def test_without_a_run_storage_train_begin_says_so():
    coord = Coordinator(None, [TensorBoard()])
    with pytest.raises(RuntimeError, match="storage"):
        coord.begin()


# -- S3 -----------------------------------------------------------------------------------------


def test_event_files_on_s3_are_read_back_by_tensorboard_and_a_restore_replaces_the_replayed_steps(
        s3_server, s3_bucket, tmp_path):
    storage = StorageSpec(f"s3://{s3_bucket}/runs", "digits", s3_server.storage_options()).open()
    first = Coordinator(storage, [TensorBoard(update_freq=2)])
    first.begin()
    first.epoch(0, batches=True)
    backup = first.state()
    first.epoch(1, batches=True)

    second = Coordinator(storage, [TensorBoard(update_freq=2)], restore=backup)
    second.begin(global_step=STEPS)
    second.epoch(1, attempt=2, batches=True)
    second.end(1)

    local = tmp_path / "copy"
    storage.fs.get(storage.path("logs") + "/", str(local) + "/", recursive=True)
    assert sorted(os.listdir(local)) == ["train", "validation"]
    train = read(local / "train")
    assert train["epoch_loss"] == [(0, pytest.approx(logs_of(0)["loss"])), (1, pytest.approx(logs_of(1, 2)["loss"]))]
    assert train["batch_loss"] == [(g, pytest.approx(batch_loss(g, 1 if g <= STEPS else 2))) for g in (2, 4, 6, 8)]


def test_the_s3_writer_writes_whole_files_that_tensorboard_reads(s3_server, s3_bucket, tmp_path):
    storage = StorageSpec(f"s3://{s3_bucket}/runs", "digits", s3_server.storage_options()).open()
    files = EventFiles(storage, "logs", owner="digits")
    files.write("train", 1, [scalar_event(0, 1.0, {"epoch_loss": 0.5})], wall_time=1.0)
    files.write("train", 2, [scalar_event(1, 2.0, {"epoch_loss": 0.25})], wall_time=2.0)
    assert sorted(files.existing(["train", "validation"]).values()) == [1, 2]
    local = tmp_path / "train"
    storage.fs.get(storage.path("logs", "train") + "/", str(local) + "/", recursive=True)
    assert read(local) == {"epoch_loss": [(0, 0.5), (1, 0.25)]}
    files.remove([files.path("train", 1)])
    assert sorted(files.existing(["train"]).values()) == [2]


# -- a real fit: a worker fails, the run resumes ----------------------------------------------


def test_a_fit_resumed_after_a_worker_failure_logs_the_same_scalars_as_an_uninterrupted_run(restarted_runs):
    # restarted_run.py: TensorBoard(update_freq=3, histogram_freq=1), 3 epochs of 7 steps; rank 1 raises at
    # epoch 1, batch 4 and the group restarts from a backup
    assert not restarted_runs.flag_left
    events = [e["type"] for e in restarted_runs.events("faulty")]
    assert "worker_failed" in events and "restored" in events  # the second attempt resumed from a backup

    for run in ("train", "validation"):
        reference = read(restarted_runs.tensorboard("reference", run))
        resumed = read(restarted_runs.tensorboard("faulty", run))
        assert sorted(resumed) == sorted(reference)
        for tag, points in reference.items():
            assert [s for s, _ in resumed[tag]] == [s for s, _ in points], tag  # each step once
            assert [v for _, v in resumed[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    reference = read(restarted_runs.tensorboard("reference", "train"))
    assert [s for s, _ in reference["batch_loss"]] == [3, 6, 9, 12, 15, 18, 21]
    assert [s for s, _ in reference["epoch_loss"]] == [0, 1, 2]
    hists = read_histograms(restarted_runs.tensorboard("faulty", "train"))
    assert sorted(hists) == ["0.bias/histogram", "0.weight/histogram", "3.bias/histogram", "3.weight/histogram"]
    reference_hists = read_histograms(restarted_runs.tensorboard("reference", "train"))
    for tag, events in hists.items():
        assert [e.step for e in events] == [e.step for e in reference_hists[tag]] == [0, 1, 2], tag
        for got, want in zip(events, reference_hists[tag]):
            assert got.histogram_value.num == want.histogram_value.num
            assert got.histogram_value.sum == pytest.approx(want.histogram_value.sum, rel=1e-6, abs=1e-9), tag
