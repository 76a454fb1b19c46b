"""Loader workers read a plain TensorDataset without per-sample seeds, and the batches stay the same."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from clean_process import in_clean_process
from orchestrator.loop.data import SeededSamples, ShardSampler, draws_nothing, make_loader


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


@in_clean_process  # the loaders fork their worker processes from this one
def test_a_tensor_datasets_workers_read_plain_indices_and_give_the_seeded_paths_batches():
    x, y = torch.arange(60.0).reshape(30, 2), torch.arange(30)
    plain = make_loader(TensorDataset(x, y), ShardSampler(30, 0, 2), batch_size=4, seed=0, workers=2)
    assert not isinstance(plain.dataset, SeededSamples)
    assert isinstance(make_loader(_Subclass(x, y), ShardSampler(30, 0, 2), batch_size=4, seed=0,
                                  workers=2).dataset, SeededSamples)
    for epoch, offset in ((0, 0), (1, 8)):  # a fresh pass, and a resumed one
        got, seeded = _batches(TensorDataset(x, y), epoch, offset), _batches(_Subclass(x, y), epoch, offset)
        assert len(got) == len(seeded) > 1
        for a, b in zip(got, seeded):
            assert all(torch.equal(p, q) for p, q in zip(a, b))
