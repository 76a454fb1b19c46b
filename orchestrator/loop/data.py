"""Per-rank shards of a map-style dataset."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


class ShardSampler(Sampler[int]):
    """Indices of one rank's shard, reshuffled each epoch from ``seed + epoch``.

    With ``pad=True`` (training) every rank gets ``ceil(n / world_size)`` indices, the shortfall
    filled from the start of the permutation like ``DistributedSampler``, so all ranks run the
    same number of steps. With ``pad=False`` (validation) the shards partition the dataset and
    every sample is seen exactly once across ranks.

    Args:
        length: Dataset length.
        rank: This rank.
        world_size: Number of ranks.
        shuffle: Permute indices each epoch. Defaults to ``True``.
        seed: Base seed shared by all ranks. Defaults to ``0``.
        pad: Pad shards to equal length. Defaults to ``True``.
    """

    def __init__(self, length: int, rank: int, world_size: int, shuffle: bool = True, seed: int = 0,
                 pad: bool = True) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.length = length
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation; skip the first ``start`` indices of this shard (resume)."""
        self.epoch = epoch
        self.start = start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.length, generator=g).tolist()
        else:
            indices = list(range(self.length))
        if self.pad and self.length > 0:
            total = math.ceil(self.length / self.world_size) * self.world_size
            while len(indices) < total:
                indices += indices[: total - len(indices)]
        return indices[self.rank :: self.world_size][self.start :]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def shard_length(self) -> int:
        """Indices in this rank's shard for a whole epoch (ignores ``start``)."""
        if self.pad:
            return math.ceil(self.length / self.world_size)
        return len(range(self.rank, self.length, self.world_size))

    def longest_shard_length(self) -> int:
        """Indices in the longest shard of any rank (rank 0's), for a whole epoch.

        Example:
            >>> ShardSampler(10, rank=3, world_size=4, pad=False).longest_shard_length()
            3
        """
        return math.ceil(self.length / self.world_size)

    def __len__(self) -> int:
        return max(0, self.shard_length() - self.start)
