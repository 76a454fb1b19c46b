"""ShardSampler: equal-length padded training shards, exact validation partitions."""

from __future__ import annotations

import pytest

from orchestrator.loop.data import ShardSampler


@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (101, 3), (1, 2), (7, 1)])
def test_validation_shards_partition_the_dataset_without_duplicates(n, world):
    shards = [list(ShardSampler(n, r, world, shuffle=False, pad=False)) for r in range(world)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(n))
    assert [len(s) for s in shards] == [len(ShardSampler(n, r, world, shuffle=False, pad=False)) for r in range(world)]


@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (101, 3), (1, 2)])
def test_training_shards_have_equal_length_and_cover_every_sample(n, world):
    shards = [list(ShardSampler(n, r, world, seed=3)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert set(i for s in shards for i in s) == set(range(n))


def test_shuffle_changes_with_the_epoch_and_repeats_with_the_seed():
    a = ShardSampler(50, 0, 2, seed=7)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    b = ShardSampler(50, 0, 2, seed=7)
    b.set_epoch(1)
    assert first != second
    assert list(b) == second


def test_rank_outside_the_world_is_rejected():
    with pytest.raises(ValueError, match="rank 2"):
        ShardSampler(10, 2, 2)
