"""Per-rank shards of a map-style dataset, the training epochs' windows of them, and their loaders.

Parallel loading (``loader_workers=N``) and exact resume: a DataLoader seeds each worker process
once, from a base seed drawn from the loader's generator when the iterator is created
(``seed = base_seed + worker_id``); persistent workers keep their streams across epochs and the
batches are dealt to the workers round-robin. What a worker draws for a sample would then depend
on the process's history (batches prefetched, where an attempt started), which no backup can hold.
So with ``N > 0`` the sampler yields ``(index, sample_seed)`` keys (:class:`SeededSampler`) and
the dataset is wrapped (:class:`SeededSamples`) to seed ``random``, ``numpy`` and ``torch`` from
that key before each ``__getitem__``. The rule: **the random draws for a sample are a function of
(seed, data pass, global position in that pass's permutation)**, never of the rank or the worker
that loads it, of ``N``, of prefetching, of a restart or of the world size (an elastic run); the
position component (saved in backups) gives the pass and the position, so a resumed epoch draws
the same augmentations. With ``N = 0``
the dataset draws from the rank's own streams, saved as the ``rng`` component.
"""

from __future__ import annotations

import math
import os
import random
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter


class ShardSampler(Sampler[int]):
    """Indices of one rank's shard, reshuffled each epoch from ``seed + epoch``.

    A data pass is one permutation ``perm`` of the dataset (the same on every rank). Rank ``r`` of
    ``W`` reads ``perm[offset:stop][r::W]``: ``offset`` and ``stop`` are *global* positions in the
    permutation (:meth:`set_offsets`), so what the ranks have consumed together is always the
    prefix ``perm[:offset]``, whatever the world size was when it was consumed. With the stride
    split, the first ``m`` items of every rank's shard are exactly ``perm[:m * W]``; a run that
    changes its world size to ``W'`` at an offset ``c`` (a multiple of ``W'``) reads
    ``perm[c:][r::W']`` and every index of the pass is read exactly once (see docs/elastic.md).
    :meth:`set_epoch` takes per-rank positions (``start``/``stop`` items of this rank's shard) as
    before: ``start * W`` is the global offset.

    With ``pad=True`` (training) every rank gets ``ceil(n / world_size)`` indices, the shortfall
    filled from the start of the permutation like ``DistributedSampler``, so all ranks run the
    same number of steps. The padding is decided by the world size that reads the pass's end: at
    most ``W - 1`` indices of the permutation's start are read a second time, in the pass's last
    step (none when ``n`` is a multiple of ``W``). With ``pad=False`` (validation) the shards
    partition the dataset and every sample is seen exactly once across ranks.

    Args:
        length: Dataset length.
        rank: This rank.
        world_size: Number of ranks.
        shuffle: Permute indices each epoch. Defaults to ``True``.
        seed: Base seed shared by all ranks. Defaults to ``0``.
        pad: Pad shards to equal length. Defaults to ``True``.

    Example:
        >>> s = ShardSampler(8, rank=1, world_size=2, shuffle=False)
        >>> s.set_offsets(0, offset=4)
        >>> list(s), s.global_positions()
        ([5, 7], [5, 7])
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
        self.offset = 0  # global position in the pass's permutation where this range starts
        self.stop_offset: int | None = None  # global position where it ends (None: the pass's end)

    @property
    def start(self) -> int:
        """This rank's position in its shard where the range starts (``offset // world_size``)."""
        return self.offset // self.world_size

    def set_epoch(self, epoch: int, start: int = 0, stop: int | None = None) -> None:
        """Select the epoch's permutation; yield this shard's indices ``start`` (resume) to ``stop`` (a window),
        both counted in this rank's shard (global offsets ``start * world_size`` and ``stop * world_size``)."""
        self.set_offsets(epoch, start * self.world_size, None if stop is None else stop * self.world_size)

    def set_offsets(self, epoch: int, offset: int = 0, stop: int | None = None) -> None:
        """Select the epoch's permutation; yield this rank's share of ``perm[offset:stop]`` (global positions).

        Raises:
            ValueError: ``offset`` is not a multiple of the world size (the ranks' shares would differ in length).
        """
        if offset % self.world_size:
            raise ValueError(f"offset {offset} is not a multiple of world_size {self.world_size}")
        self.epoch, self.offset, self.stop_offset = epoch, offset, stop

    def permutation(self) -> list[int]:
        """The pass's permutation, padded (training) to a multiple of the world size."""
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
        return indices

    def _range(self) -> range:
        """The global positions this rank reads (within the padded permutation)."""
        end = self.total()
        stop = end if self.stop_offset is None else min(self.stop_offset, end)
        return range(self.offset + self.rank, max(stop, self.offset), self.world_size)

    def total(self) -> int:
        """Length of the (padded) permutation."""
        if self.pad and self.length > 0:
            return math.ceil(self.length / self.world_size) * self.world_size
        return self.length

    def global_positions(self) -> list[int]:
        """The global position in the permutation of each index this rank yields, in order."""
        return list(self._range())

    def _indices(self) -> list[int]:
        perm = self.permutation()
        return [perm[i] for i in self._range()]

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
        return len(self._range())


class Window(NamedTuple):
    """Training epoch ``epoch``'s batches: ``steps`` batches from batch ``first`` of data pass ``data_pass``."""

    data_pass: int
    first: int
    steps: int


def epoch_window(epoch: int, batches_per_pass: int, steps_per_epoch: int | None = None) -> Window:
    """Which batches training epoch ``epoch`` runs, with Keras 3's ``steps_per_epoch`` semantics.

    Without ``steps_per_epoch`` an epoch is one pass over the shard. With it, the data iterator is
    not reset between epochs: each epoch takes the next ``steps_per_epoch`` batches of the current
    pass, and an epoch that reaches the pass's end stops there, shorter (Keras "ran out of data"),
    the next one starting a new pass (reshuffled). The same on every rank: shards are padded.

    Example:
        >>> [epoch_window(e, batches_per_pass=5, steps_per_epoch=2) for e in range(4)]  # doctest: +NORMALIZE_WHITESPACE
        [Window(data_pass=0, first=0, steps=2), Window(data_pass=0, first=2, steps=2),
         Window(data_pass=0, first=4, steps=1), Window(data_pass=1, first=0, steps=2)]
    """
    if not steps_per_epoch:
        return Window(epoch, 0, batches_per_pass)
    per_pass = math.ceil(batches_per_pass / steps_per_epoch)  # epochs per data pass
    data_pass, i = divmod(epoch, per_pass)
    first = i * steps_per_epoch
    return Window(data_pass, first, min(steps_per_epoch, batches_per_pass - first))


_MASK = (1 << 64) - 1
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix(x: int, part: int) -> int:
    """One splitmix64 step of :func:`sample_seed` (Python ints, modulo 2**64)."""
    x = (x ^ (int(part) & _MASK)) * _MIX1 & _MASK
    x = (x ^ (x >> 31)) * _MIX2 & _MASK
    return x ^ (x >> 29)


def sample_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 steps): neighbouring inputs give unrelated seeds.

    Example:
        >>> sample_seed(0, 0, 1, 7) == sample_seed(0, 0, 1, 7) != sample_seed(0, 0, 1, 8)
        True
    """
    x = _GOLDEN
    for part in parts:
        x = _mix(x, part)
    return x >> 1


def sample_seeds(prefix: tuple[int, ...], lasts: Any) -> list[int]:
    """``[sample_seed(*prefix, last) for last in lasts]`` (non-negative ``lasts``), computed for all of
    them at once in uint64 arithmetic (which wraps modulo 2**64 like the scalar's masks): a data
    pass's keys cost about 0.05 us each instead of 3.5 us in Python, in the rank's main process.

    Example:
        >>> sample_seeds((0, 0, 1), [7, 8]) == [sample_seed(0, 0, 1, 7), sample_seed(0, 0, 1, 8)]
        True
    """
    x = _GOLDEN
    for part in prefix:
        x = _mix(x, part)
    lasts = np.asarray(lasts, dtype=np.uint64)
    if lasts.size == 0:
        return []
    v = (lasts ^ np.uint64(x)) * np.uint64(_MIX1)
    v = (v ^ (v >> np.uint64(31))) * np.uint64(_MIX2)
    v ^= v >> np.uint64(29)
    return (v >> np.uint64(1)).tolist()


class SeededSampler(Sampler[tuple[int, int]]):
    """A :class:`ShardSampler`'s indices as ``(index, seed)`` keys for :class:`SeededSamples`.

    The seed of the index at global position ``p`` of pass ``epoch``'s permutation is
    ``sample_seed(seed, salt, epoch, p)``: the same whichever rank reads it, so a sample's random draws
    survive a change of the world size (an elastic run) as well as a resume.

    Example:
        >>> keys = list(SeededSampler(ShardSampler(4, rank=0, world_size=1, shuffle=False)))
        >>> [i for i, _ in keys], keys[0][1] == sample_seed(0, 0, 0, 0)
        ([0, 1, 2, 3], True)
    """

    def __init__(self, shard: ShardSampler, salt: int = 0) -> None:
        self.shard = shard
        self.salt = salt

    def __iter__(self) -> Iterator[tuple[int, int]]:
        s = self.shard
        return zip(iter(s), sample_seeds((s.seed, self.salt, s.epoch), s.global_positions()))

    def __len__(self) -> int:
        return len(self.shard)


class SeededSamples(Dataset):
    """A map-style dataset read with ``(index, seed)`` keys: seeds the worker's ``random``, ``numpy``
    and ``torch`` streams from ``seed``, then returns ``dataset[index]``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        """A batch's samples (the DataLoader's fetcher calls this): for each key, in order, the streams
        seeded from its seed, then its sample; one loop (no call per sample through the fetcher).
        Only the CPU torch generator is seeded: torch.manual_seed also seeds every accelerator's
        (about 0.26 ms a call, once a sample), and a loader worker draws on the CPU."""
        dataset, seed_random, seed_numpy, torch_generator = self.dataset, random.seed, np.random.seed, \
            torch.default_generator
        samples = []
        for index, seed in keys:
            seed_random(seed)
            seed_numpy(seed & 0xFFFFFFFF)
            torch_generator.manual_seed(seed)
            samples.append(dataset[index])
        return samples

    def __len__(self) -> int:
        return len(self.dataset)


def draws_nothing(dataset: Any) -> bool:
    """Whether reading ``dataset``'s samples provably draws from no random stream: its type is exactly
    ``torch.utils.data.TensorDataset`` (indexing stored tensors; a subclass may override that).

    Example:
        >>> draws_nothing(TensorDataset(torch.zeros(2))), draws_nothing(SeededSamples(TensorDataset(torch.zeros(2))))
        (True, False)
    """
    return type(dataset) is TensorDataset


def share_by_filename(worker_id: int) -> None:
    """The ``worker_init_fn`` of a map-style dataset's loader workers: each sends its batches
    to the rank as named shared-memory files (torch's ``"file_system"`` sharing strategy).

    Under Linux's default (``"file_descriptor"``) the rank receives each tensor of a batch by opening
    a new connection to the worker's resource sharer, which answers an authentication challenge and
    passes the file descriptor: a few round trips between two processes per tensor, waiting for the
    worker's sharer thread to be scheduled. With names the rank opens the memory directly; on 2
    cores this made the realistic configuration's steps about 8% faster (benchmarks/fit_vs_ddp.py,
    docs/BENCHMARKS.md). Only the worker processes change strategy (the sender's strategy decides
    how a tensor travels; the receiver rebuilds either kind), so the rank's own processes keep the
    default. The files a process leaves when it dies are removed by torch's ``torch_shm_manager``
    once the processes of its group exit; a batch a worker sent and the rank never received would stay
    in memory until then, so an iterator left before its end is drained (:func:`drain`). Without that
    helper (an install without ``torch/bin``), the workers keep the default.
    """
    if os.access(_SHM_MANAGER, os.X_OK):
        torch.multiprocessing.set_sharing_strategy("file_system")


_SHM_MANAGER = os.path.join(os.path.dirname(torch.__file__), "bin", "torch_shm_manager")


def make_loader(dataset: Any, shard: ShardSampler, *, batch_size: int, seed: int, workers: int = 0,
                pin_memory: bool = False, salt: int = 0) -> DataLoader:
    """The loader of one rank's shard: in process (``workers=0``), or in ``workers`` persistent worker
    processes (prefetching 2 batches each) reading :class:`SeededSamples` (see the module's rule), or
    the shard's plain indices when the dataset :func:`draws_nothing` (the same batches, no seeding).

    The loader's generator is private: creating an iterator never draws from the global RNG.
    """
    generator = torch.Generator().manual_seed(seed)
    if workers == 0:
        return DataLoader(dataset, batch_size=batch_size, sampler=shard, pin_memory=pin_memory, generator=generator)
    if draws_nothing(dataset):
        return DataLoader(dataset, batch_size=batch_size, sampler=shard, num_workers=workers, persistent_workers=True,
                          prefetch_factor=2, pin_memory=pin_memory, generator=generator,
                          worker_init_fn=share_by_filename)
    return DataLoader(SeededSamples(dataset), batch_size=batch_size, sampler=SeededSampler(shard, salt),
                      num_workers=workers, persistent_workers=True, prefetch_factor=2, pin_memory=pin_memory,
                      generator=generator, worker_init_fn=share_by_filename)


#: Seconds :func:`drain` waits for one batch.
DRAIN_TIMEOUT_S = 60.0


def drain(iterator: Any, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Receive (and drop) the batches that a loader's worker processes still prepare for ``iterator``,
    which its reader leaves before its end (a stop, a rollback or a preemption mid-epoch); an iterator
    run to its end, or one without worker processes, has none.

    Under the ``"file_system"`` sharing strategy (:func:`share_by_filename`) a batch sent and never
    received holds its shared memory until every process of the rank exits, and persistent workers
    (or a long-lived Ray worker) would accumulate such batches; received, each is freed as it is dropped.
    No new index is sent to the workers, so at most ``prefetch_factor * workers`` batches are received.
    A worker that fails or sends nothing for ``timeout_s`` seconds ends the draining (its memory is
    then freed when the processes exit). The iterator can be reset afterwards (a persistent loader's
    next ``iter``).

    Example:
        >>> drain(iter(DataLoader(range(4))))  # in process: nothing to receive
    """
    if not isinstance(iterator, _MultiProcessingDataLoaderIter) or iterator._shutdown:
        return
    timeout = iterator._timeout
    iterator._sampler_iter = iter(())  # send no further index
    iterator._timeout = timeout if 0 < timeout < timeout_s else timeout_s
    try:
        for _ in iterator:
            pass
    except Exception:  # noqa: BLE001 - a dead or stuck worker: the process's exit frees what it held
        pass
    finally:
        iterator._timeout = timeout


def shutdown_workers(*loaders: DataLoader | None) -> None:
    """End the worker processes of persistent loaders now (not whenever they are garbage-collected)."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        if loader is not None:
            loader._iterator = None
