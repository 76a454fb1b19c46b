"""Iterable and streaming datasets in the per-rank loop, in process (no Ray): rank and worker sharding,
the ``train_stream`` component and exact mid-epoch resume, ``steps_per_epoch`` over a stream, every rank
ending an epoch at the same step, and iterable validation sets."""

from __future__ import annotations

import dataclasses
import math
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from rank_processes import CONTEXT, start_ranks
from torch.utils.data import IterableDataset

from orchestrator.core.config import LoopConfig
from orchestrator.decisions import Backup
from orchestrator.loop.iterable import RankBatches, batch_loader, rank_source
from orchestrator.loop.specs import TrainSpec
from orchestrator.loop.train_loop import TrainLoop
from clean_process import in_clean_process
from test_train_loop import (
    BATCH, BATCH_END, EPOCH_END, TRAIN, VAL, StandInCoordinator, _RecordingLink, _assert_same_weights, _config,
    _linear, _run, _storage, _with_dropout)

W = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def _sample(data_pass: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(4, generator=torch.Generator().manual_seed(100_003 * data_pass + k))
    return x, (x @ W).reshape(1)


class Stream(IterableDataset):
    """Samples ``0 .. n-1`` of a pass (``n=None``: unbounded), each a function of (pass, index); plain."""

    def __init__(self, n: int | None, offset: int = 0) -> None:
        self.n, self.offset, self.i, self.data_pass = n, offset, 0, 0

    def set_epoch(self, data_pass: int) -> None:
        self.data_pass, self.i = data_pass, 0

    def __iter__(self):
        while self.n is None or self.i < self.n:
            k, self.i = self.i, self.i + 1
            yield _sample(self.data_pass, self.offset + k)


class StatefulStream(Stream):
    """The same, with torchdata's protocol: ``state_dict()`` says how many samples were yielded."""

    def state_dict(self) -> dict[str, int]:
        return {"pass": self.data_pass, "i": self.i}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.data_pass, self.i = state["pass"], state["i"]


class Ints(IterableDataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(range(self.n))


class RankAwareInts(Ints):
    """Declares its own sharding: rank r of N reads the block of its own contiguous range."""

    def rank_shard(self, rank: int, world_size: int):
        per = math.ceil(self.n / world_size)
        return _Range(rank * per, min(self.n, (rank + 1) * per))


class _Range(IterableDataset):
    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))


def _batches(dataset: Any, rank: int, world_size: int, workers: int = 0, batch_size: int = 4) -> list[list[int]]:
    source, stride = rank_source(dataset, rank, world_size)
    batches = RankBatches(source, rank=rank, world_size=world_size, batch_size=batch_size, stride=stride)
    return [b.tolist() for b, _ in batch_loader(batches, workers=workers, pin_memory=False, seed=0)]


# -- sharding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", [Ints(23), RankAwareInts(23)])
def test_the_ranks_shards_of_a_stream_partition_it(dataset):
    shards = [[i for b in _batches(dataset, rank, 3) for i in b] for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(23))
    if isinstance(dataset, RankAwareInts):
        assert shards[0] == list(range(8))  # its own blocks, not every third sample
    else:
        assert shards[1] == list(range(1, 23, 3))


def test_a_dataset_that_says_it_is_rank_aware_is_read_as_it_is():
    dataset = Ints(10)
    dataset.rank_aware = True
    assert _batches(dataset, 1, 2) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@in_clean_process
def test_loader_workers_deal_whole_batches_so_the_batches_do_not_depend_on_their_number():
    assert _batches(Ints(45), 1, 2, workers=2) == _batches(Ints(45), 1, 2, workers=0)


# -- training and exact resume -------------------------------------------------------------------
def _stream_data(kind=StatefulStream, n: int | None = TRAIN, val: Any = None):
    def data():
        return kind(n), val
    return data


def _stream_config(kind=StatefulStream, workers: int = 0, n: int | None = TRAIN, **changes) -> LoopConfig:
    return dataclasses.replace(_config(model=_with_dropout, lr=0.01), data=_stream_data(kind, n),
                               loader_workers=workers, **changes)


@pytest.mark.parametrize("kind, workers", [(StatefulStream, 0), (Stream, 0), (StatefulStream, 2)])
@in_clean_process
def test_a_stream_resumed_mid_epoch_trains_the_same_weights_as_an_uninterrupted_run(group, tmp_path, kind, workers):
    storage = _storage(tmp_path)
    straight = StandInCoordinator({(BATCH_END, 1, 2): [Backup(backup_dir="backup")]}, draws_rng=True)
    whole = _run(straight, _stream_config(kind, workers), epochs=3, storage=storage, batch_sync_every=1)
    (_, folder, _, _), = straight.persisted
    assert [r.steps_per_epoch for r in straight.reports[:1]] == [None]  # unknown length: Keras's None
    resumed = StandInCoordinator(draws_rng=True)
    rest = _run(resumed, _stream_config(kind, workers), epochs=3, storage=storage, batch_sync_every=1,
                resume_from=folder)
    _assert_same_weights(rest.state_dict, whole.state_dict)
    assert (rest.epochs_run, rest.steps_run) == (whole.epochs_run, whole.steps_run) == (3, 15)
    assert resumed.report(EPOCH_END, 1).train == straight.report(EPOCH_END, 1).train


def test_steps_per_epoch_bounds_an_unbounded_stream_and_a_resume_inside_it_is_exact(group, tmp_path):
    storage = _storage(tmp_path)
    seen: list[torch.Tensor] = []

    def step(model, batch):
        inputs, targets = batch
        seen.append(inputs.clone())
        return {"loss": torch.nn.functional.mse_loss(model(inputs), targets)}

    config = dataclasses.replace(_stream_config(n=None, steps_per_epoch=3), train_step=step, loss=None, metrics={})
    straight = StandInCoordinator({(BATCH_END, 1, 1): [Backup(backup_dir="backup")]})
    whole = _run(straight, config, epochs=3, storage=storage, batch_sync_every=1)
    assert (whole.epochs_run, whole.steps_run) == (3, 9)
    expected = torch.stack([_sample(0, k)[0] for k in range(9 * BATCH)])
    assert torch.equal(torch.cat(seen), expected)  # one pass goes on across epochs
    (_, folder, _, _), = straight.persisted
    rest = _run(StandInCoordinator(), config, epochs=3, storage=storage, batch_sync_every=1, resume_from=folder)
    _assert_same_weights(rest.state_dict, whole.state_dict)


def test_a_pass_that_ends_inside_a_steps_per_epoch_window_ends_the_epoch_and_the_next_starts_a_new_pass(group):
    coordinator = StandInCoordinator()
    result = _run(coordinator, _stream_config(steps_per_epoch=2), epochs=4, batch_sync_every=1)
    steps = [[r.step for r in coordinator.reports if r.kind == BATCH_END and r.epoch == e] for e in range(4)]
    assert steps == [[0, 1], [0, 1], [0], [0, 1]] and result.steps_run == 7
    ends = [[r.epoch_ends for r in coordinator.reports if r.kind == BATCH_END and r.epoch == e] for e in range(4)]
    assert ends == [[False, False], [False, False], [True], [False, False]]  # no batch-begin hook past the data


def test_a_stream_with_no_batch_for_a_rank_is_an_error_not_a_hang(group):
    with pytest.raises(ValueError, match="no batch in data pass 0"):
        _run(StandInCoordinator(), _stream_config(n=0), epochs=1)


def test_an_iterable_validation_set_counts_each_sample_once(group):
    coordinator = StandInCoordinator()
    config = dataclasses.replace(_config(), data=_stream_data(Stream, TRAIN, val=Stream(VAL, offset=10_000)))
    _run(coordinator, config, epochs=1)
    assert coordinator.report(EPOCH_END, 0).val.count == VAL


# -- two ranks: uneven shards end every epoch at the same step, validation counts each sample once --
class UnevenShards(IterableDataset):
    """Rank-aware: rank 0 reads 20 samples (5 batches of 4), rank 1 reads 12 (3 batches)."""

    def rank_shard(self, rank: int, world_size: int):
        return Stream(20 if rank == 0 else 12, offset=100 * rank)

    def __iter__(self):
        raise AssertionError("read through rank_shard only")


def _two_rank_stream_data():
    return UnevenShards(), Stream(9, offset=10_000)  # framework-sharded: 5 and 4 samples


class _ValCountingLink(_RecordingLink):
    def __init__(self) -> None:
        super().__init__()
        self.val_counts: list[int] = []

    def sync(self, report):
        if report.val is not None:
            self.val_counts.append(report.val.count)
        return super().sync(report)


def _two_rank_stream_worker(rank: int, store: str, out: Any) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        torch.set_num_threads(1)
        config = LoopConfig(model=_linear, optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
                            data=_two_rank_stream_data, loss=torch.nn.functional.mse_loss, batch_size=4, seed=0)
        link = _ValCountingLink()
        result = TrainLoop(TrainSpec(loop=config, epochs=2, batch_sync_every=1), rank=rank, world_size=2,
                           device=torch.device("cpu"), link=link).run()
        loop_reports = [(kind, epoch, step) for kind, epoch, step, _ in link.reports]
        out.put((rank, loop_reports, result.steps_run, link.val_counts))
    finally:
        dist.destroy_process_group()


def test_when_one_ranks_shard_runs_out_first_every_rank_ends_the_epoch_at_that_step(tmp_path):
    out = CONTEXT.SimpleQueue()
    start_ranks(_two_rank_stream_worker, (str(tmp_path / "group-store"), out), nprocs=2)
    results = {rank: rest for rank, *rest in (out.get() for _ in range(2))}
    got = {rank: (reports, steps) for rank, (reports, steps, _) in results.items()}
    assert got[0] == got[1]
    assert [a + b for a, b in zip(results[0][2], results[1][2])] == [9, 9]  # each val sample once per epoch
    assert (results[0][2], results[1][2]) == ([5, 5], [4, 4])
    reports, steps = got[0]
    assert steps == 6  # 3 steps per epoch: rank 1's 3 batches
    assert [r for r in reports if r[0] == "batch_end"] == [("batch_end", e, s) for e in (0, 1) for s in range(3)]
