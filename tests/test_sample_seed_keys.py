"""The loader's per-sample keys: vectorised seeds equal the scalar ones, and a batch fetch seeds like single fetches."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from orchestrator.loop.data import SeededSampler, SeededSamples, ShardSampler, sample_seed, sample_seeds


@pytest.mark.parametrize("prefix", [(0, 0, 0), (3, 1, 7), (2**40 + 5, 0, 123456), (-1, 2, 3)])
def test_the_seeds_of_a_whole_range_equal_the_scalar_seed_of_each_position(prefix):
    positions = list(range(0, 5000, 7)) + [2**31, 2**40 + 1]
    assert sample_seeds(prefix, positions) == [sample_seed(*prefix, p) for p in positions]


def test_a_shards_keys_pair_each_index_with_the_seed_of_its_global_position():
    shard = ShardSampler(50, rank=1, world_size=3, shuffle=True, seed=4)
    shard.set_offsets(2, offset=9, stop=42)
    keys = list(SeededSampler(shard, salt=1))
    assert [i for i, _ in keys] == list(shard)
    assert [s for _, s in keys] == [sample_seed(4, 1, 2, p) for p in shard.global_positions()]


class _Draws(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[int, float, float, float]:
        return index, random.random(), float(np.random.rand()), float(torch.rand(()))


def test_a_batch_fetch_draws_what_fetching_each_key_alone_draws():
    samples, keys = SeededSamples(_Draws()), [(3, 11), (3, 2**62 + 9), (7, 5)]
    single = [samples[key] for key in keys]
    random.seed(99)  # other global states before the batch: its draws must not depend on them
    np.random.seed(99)
    torch.manual_seed(99)
    assert samples.__getitems__(keys) == single
    assert single[0] != single[1]
