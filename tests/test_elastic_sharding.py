"""Elastic world size, pure logic (no Ray): the epoch's permutation re-sharded at a global offset
reads every index exactly once, the same global batch on fewer ranks, and metric sums carried over."""

from __future__ import annotations

import pytest
import torch

from orchestrator.loop.data import SeededSampler, ShardSampler, sample_seed


def read(n: int, world: int, offset: int, stop: int | None, epoch: int = 0, seed: int = 5) -> list[int]:
    """What every rank of ``world`` reads of ``perm[offset:stop]``, concatenated in rank order."""
    out: list[int] = []
    for rank in range(world):
        s = ShardSampler(n, rank, world, seed=seed)
        s.set_offsets(epoch, offset, stop)
        out += list(s)
    return out


# (dataset length, [(world size, global offset where it starts)]); each stretch runs to the next offset
RESIZES = [
    (48, [(2, 0), (1, 16), (2, 32)]),
    (48, [(2, 0), (1, 8), (2, 40)]),
    (48, [(1, 0), (2, 24)]),
    (50, [(2, 0), (1, 16), (2, 40)]),      # 50 is a multiple of 2: no padding at the end
    (64, [(2, 0), (1, 0), (2, 0)]),        # resizes before anything was read
    (64, [(2, 0), (1, 62), (2, 64)]),      # a resize at the very end: nothing left to read
    (40, [(4, 0), (2, 8), (1, 20), (4, 32)]),
]


@pytest.mark.parametrize("n,stretches", RESIZES)
def test_every_rank_s_reads_across_resizes_cover_the_pass_exactly_once(n, stretches):
    seen: list[int] = []
    bounds = [offset for _, offset in stretches[1:]] + [None]
    for (world, offset), stop in zip(stretches, bounds):
        seen += read(n, world, offset, stop)
    assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (101, 3), (48, 4)])
@pytest.mark.parametrize("start", [0, 1, 3])
def test_an_unchanged_world_size_reads_exactly_the_stride_shard_from_a_per_rank_start(n, world, start):
    for rank in range(world):
        s = ShardSampler(n, rank, world, seed=2)
        perm = s.permutation()
        s.set_offsets(0, start * world)
        assert list(s) == perm[rank::world][start:]
        s.set_epoch(0, start=start, stop=start + 2)
        assert list(s) == perm[rank::world][start:start + 2]


@pytest.mark.parametrize("n,world", [(11, 2), (10, 3), (7, 4)])
def test_padding_repeats_only_the_permutation_s_first_indices_in_the_pass_s_last_step(n, world):
    seen = read(n, world, 0, None)
    perm = ShardSampler(n, 0, world, seed=5).permutation()
    extra = len(seen) - n
    assert 0 < extra < world
    assert sorted(seen) == sorted(list(range(n)) + perm[:extra])


def test_an_offset_that_is_not_a_multiple_of_the_world_size_is_refused():
    with pytest.raises(ValueError, match="multiple of world_size 2"):
        ShardSampler(10, 0, 2).set_offsets(0, 3)


def test_a_sample_s_augmentation_seed_depends_on_its_place_in_the_permutation_not_on_the_rank():
    seeds: dict[int, int] = {}
    for world in (1, 2, 4):
        for rank in range(world):
            shard = ShardSampler(16, rank, world, seed=3)
            shard.set_offsets(1, 4)
            for index, seed in SeededSampler(shard, salt=0):
                assert seeds.setdefault(index, seed) == seed
    perm = ShardSampler(16, 0, 1, seed=3)
    perm.set_epoch(1)
    first = perm.permutation()[4]
    assert seeds[first] == sample_seed(3, 0, 1, 4)
