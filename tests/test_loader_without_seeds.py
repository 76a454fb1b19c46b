"""Loader workers read a plain TensorDataset without per-sample seeds, and the batches stay the same."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from orchestrator.loop.data import SeededSamples, ShardSampler, draws_nothing, make_loader
from rank_processes import start_ranks


class _Subclass(TensorDataset):
    """A TensorDataset subclass: it could draw in ``__getitem__``, so it keeps the seeded keys."""


def _batches(dataset, epoch: int, offset: int) -> list[list[torch.Tensor]]:
    shard = ShardSampler(len(dataset), rank=1, world_size=2, shuffle=True, seed=3)
    loader = make_loader(dataset, shard, batch_size=4, seed=3, workers=2)
    shard.set_offsets(epoch, offset=offset)
    try:
        return list(loader)
    finally:
        loader._iterator._shutdown_workers()


def test_only_an_exact_tensor_dataset_counts_as_drawing_nothing():
    x = torch.zeros(3)
    assert draws_nothing(TensorDataset(x))
    assert not draws_nothing(_Subclass(x))
    assert not draws_nothing(torch.utils.data.Subset(TensorDataset(x), [0]))


def _same_batches_both_ways(rank: int) -> None:
    import multiprocessing

    # the loaders fork their workers from this process (as from a rank's actor), not through the fork
    # server this rank process came from: a process of its own that starts with about a second of imports
    multiprocessing.set_start_method("fork", force=True)
    x, y = torch.arange(60.0).reshape(30, 2), torch.arange(30)
    for epoch, offset in ((0, 0), (1, 8)):  # a fresh pass, and a resumed one
        got, seeded = _batches(TensorDataset(x, y), epoch, offset), _batches(_Subclass(x, y), epoch, offset)
        assert len(got) == len(seeded) > 1
        for a, b in zip(got, seeded):
            assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_a_tensor_datasets_workers_read_plain_indices_and_give_the_seeded_paths_batches():
    x, y = torch.arange(60.0).reshape(30, 2), torch.arange(30)
    plain = make_loader(TensorDataset(x, y), ShardSampler(30, 0, 2), batch_size=4, seed=0, workers=2)
    assert not isinstance(plain.dataset, SeededSamples)
    assert isinstance(make_loader(_Subclass(x, y), ShardSampler(30, 0, 2), batch_size=4, seed=0,
                                  workers=2).dataset, SeededSamples)
    # the loaders' worker processes fork from a process of the fork server, not from this one: a fork of the
    # test session's process, with its threads (Ray's, the S3 server's), hung once and crashed once in them
    start_ranks(_same_batches_both_ways, (), nprocs=1)
