"""Ray Data input: ``data()`` may return ``ray.data.Dataset``\\ s (training, validation or both).

**Where the split is made.** ``data()`` is called on every worker, as for any dataset; a Ray Dataset
is a lazy plan, so that costs little (build it with ``read_*``/``range``/``map_batches``, not from
large in-memory objects, which every worker would put in the object store). Each attempt, **rank 0**
splits each Ray Dataset once, ``streaming_split(world_size)``, and sends every rank its
``DataIterator`` over the process group (one broadcast, at setup); the other ranks' datasets are
dropped. The split's coordinator actor is then owned by rank 0: it ends with the attempt (a failure
kills it with rank 0; :meth:`RayDataInput.close` ends it otherwise), and a restart splits afresh for
the new group, whatever its size. No flag is needed to say that ``data()`` returns Ray Datasets,
and the loop (``orchestrator/loop``) never imports Ray: it gets the shards through its ``data_input``.

**Shards and batches.** Training is split with ``equal=True``: every rank gets as many rows (at most
``world_size - 1`` rows of a pass are left out), hence as many batches, and the ranks stay in
lockstep; validation with ``equal=False``: every row once across ranks (with ``validation_steps``,
the first ``validation_steps * val_batch_size * world_size`` rows). Each rank reads its shard a data
pass at a time with ``iter_torch_batches`` (Ray Data's own tasks and prefetching do the loading, so
``loader_workers`` must stay 0). A batch is ``(batch[features], batch[label])`` with
``ray_data_columns=(features, label)``, else the dict of columns for ``train_step``. The shard is an
iterable the loop reads like any rank-aware stream (:mod:`orchestrator.loop.iterable`): epochs,
``steps_per_epoch``, the per-step "out of data" signal and the ``train_stream`` backup component.

**Exact resume.** The datasets run with ``preserve_order=True`` (so the rows each rank gets, and their
order, are the same every time a pass is read; it also turns locality hints off), and the optional
local shuffle (``ray_data_shuffle_buffer``) is seeded from (seed, rank, data pass). A resume at an
epoch boundary is then exact; a resume mid-pass re-reads the pass from its start and discards the
batches already trained: **the cost is re-running the pipeline for those batches** (time, not
memory). A dataset-level ``random_shuffle(seed=n)``/``randomize_block_order(seed=n)`` gives the same
order every pass, which stays exact; an unseeded one makes a resumed pass differ.

**CPUs.** The training workers hold their CPUs; Ray Data's tasks need others (the split coordinator
takes none). Rank 0 warns when no CPU is free as it splits: Ray Data would wait for one.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Iterator

import ray
import torch.distributed as dist
from torch.utils.data import IterableDataset

from orchestrator.loop.data import sample_seed
from orchestrator.loop.iterable import as_datasets

logger = logging.getLogger(__name__)

#: Mixed into the local shuffle's seeds, so that they differ from the map-style loaders' sample seeds.
SHUFFLE_SALT = 0x52444154


def is_ray_dataset(obj: Any) -> bool:
    """Whether ``obj`` is a ``ray.data.Dataset``, without importing Ray Data when nothing did.

    Example:
        >>> is_ray_dataset([1, 2, 3])
        False
    """
    module = sys.modules.get("ray.data")
    return module is not None and isinstance(obj, module.Dataset)


class RayDataShard(IterableDataset):
    """One rank's shard of a Ray Dataset: a ``DataIterator`` read one data pass at a time, as whole batches.

    Rank-aware and batched (see :class:`~orchestrator.loop.iterable.RankBatches`): the loop reads it as it
    is. ``set_epoch(data_pass)`` selects the pass, hence the local shuffle's seed.

    Args:
        iterator: The rank's ``DataIterator`` (from ``streaming_split``).
        batch_size: Rows per batch (the last batch of a pass may be short).
        columns: ``(features, label)``: batches are ``(inputs, targets)``; None: the dict of columns.
        shuffle_buffer: Rows of the local shuffle buffer, or None (no shuffle). Defaults to ``None``.
        seed: The run's seed. Defaults to ``0``.
        rank: This rank (in the shuffle's seed). Defaults to ``0``.

    Example:
        >>> shard = RayDataShard(iterators[0], batch_size=32, columns=("x", "y"))  # doctest: +SKIP
        >>> shard.set_epoch(0); x, y = next(iter(shard))  # doctest: +SKIP
    """

    rank_aware = True
    yields_batches = True

    def __init__(self, iterator: Any, *, batch_size: int, columns: tuple[str, str] | None,
                 shuffle_buffer: int | None = None, seed: int = 0, rank: int = 0) -> None:
        self.iterator, self.batch_size, self.columns = iterator, batch_size, columns
        self.shuffle_buffer, self.seed, self.rank = shuffle_buffer, seed, rank
        self.data_pass = 0

    def set_epoch(self, data_pass: int) -> None:
        self.data_pass = data_pass

    def __iter__(self) -> Iterator[Any]:
        shuffle: dict[str, Any] = {}
        if self.shuffle_buffer:
            shuffle = {"local_shuffle_buffer_size": self.shuffle_buffer,
                       "local_shuffle_seed": sample_seed(self.seed, SHUFFLE_SALT, self.rank, self.data_pass) % 2**32}
        for batch in self.iterator.iter_torch_batches(batch_size=self.batch_size, device="cpu", **shuffle):
            yield self._pick(batch)

    def _pick(self, batch: dict[str, Any]) -> Any:
        if self.columns is None:
            return batch
        missing = [c for c in self.columns if c not in batch]
        if missing:
            raise ValueError(f"ray_data_columns={self.columns!r} names column(s) {missing} that the Ray Dataset's "
                             f"batches do not have; they have {sorted(batch)}")
        return batch[self.columns[0]], batch[self.columns[1]]


def _prepared(dataset: Any) -> Any:
    """The dataset with the execution options exact resume needs (on its own context, not the process's)."""
    dataset.context.execution_options.preserve_order = True
    return dataset


def _split(dataset: Any, world_size: int, *, equal: bool) -> list[Any]:
    return _prepared(dataset).streaming_split(world_size, equal=equal)


def check_ray_data_config(config: Any) -> None:
    """Raise ValueError for loop settings that Ray Dataset input cannot honour (``config``: the LoopConfig)."""
    if config.loader_workers:
        raise ValueError(f"loader_workers={config.loader_workers} does not apply to ray.data.Dataset input (Ray "
                         "Data loads in its own tasks and prefetches): set loader_workers=0")
    if config.ray_data_columns is None and config.train_step is None:
        raise ValueError("data() returned a ray.data.Dataset, whose batches are dicts of columns: pass "
                         "Trainer(ray_data_columns=(features, label)) to train on (inputs, targets), or a "
                         "train_step=fn(model, batch) that reads the dict")


class RayDataInput:
    """The Ray layer's ``data_input`` of the per-rank loop (:class:`~orchestrator.loop.train_loop.TrainLoop`):
    ``ray.data.Dataset``\\ s from ``data()`` become this rank's :class:`RayDataShard`\\ s; anything else
    passes through. See the module docstring for where the split is made.

    Every rank calls it at the same point of setup (the loop's build). Call :meth:`close` when the loop ends.

    Example:
        >>> data_input = RayDataInput()  # doctest: +SKIP
        >>> loop = TrainLoop(spec, rank, world_size, device, link, data_input=data_input)  # doctest: +SKIP
        >>> try: loop.run()  # doctest: +SKIP
        ... finally: data_input.close()
    """

    def __init__(self) -> None:
        self.iterators: list[Any] = []  # rank 0: every rank's iterators, whose coordinators it ends at close

    def __call__(self, value: Any, rank: int, world_size: int, config: Any) -> tuple[Any, Any]:
        train, val = as_datasets(value)
        ray_train, ray_val = is_ray_dataset(train), is_ray_dataset(val)
        if not (ray_train or ray_val):
            if config.ray_data_columns is not None or config.ray_data_shuffle_buffer is not None:
                raise ValueError("ray_data_columns and ray_data_shuffle_buffer apply to ray.data.Dataset input, but "
                                 "data() returned none: drop them, or return ray.data.Dataset(s) from data()")
            return train, val
        check_ray_data_config(config)
        val_batch = config.val_batch_size or config.batch_size
        splits: list[Any] = [None, None]
        if rank == 0:
            self._warn_if_no_cpu_is_free()
            if ray_train:
                splits[0] = _split(train, world_size, equal=True)  # lockstep: as many batches on every rank
            if ray_val:
                if config.validation_steps is not None:  # no rank stops early, leaving its rows queued
                    val = val.limit(config.validation_steps * val_batch * world_size)
                splits[1] = _split(val, world_size, equal=False)  # every row once across ranks
            self.iterators = [it for split in splits if split is not None for it in split]
        if world_size > 1:
            payload = [splits]
            dist.broadcast_object_list(payload, src=0)
            splits = payload[0]
        shards = [RayDataShard(splits[0][rank], batch_size=config.batch_size, columns=config.ray_data_columns,
                               shuffle_buffer=config.ray_data_shuffle_buffer, seed=config.seed, rank=rank)
                  if ray_train else train,
                  RayDataShard(splits[1][rank], batch_size=val_batch, columns=config.ray_data_columns)
                  if ray_val else val]
        return shards[0], shards[1]

    @staticmethod
    def _warn_if_no_cpu_is_free() -> None:
        free = ray.available_resources().get("CPU", 0.0)
        if free < 1:
            logger.warning("Ray Data input: the cluster has %.3g CPU free once the training workers hold theirs; "
                           "Ray Data's tasks wait for one (add CPUs or nodes, or give each worker fewer with "
                           "resources_per_worker)", free)

    def close(self) -> None:
        """End the split coordinators this rank made (rank 0), so that none outlives the attempt; never raises."""
        for coordinator in {id(c): c for c in (getattr(it, "_coord_actor", None) for it in self.iterators)
                            if c is not None}.values():
            try:
                ray.kill(coordinator, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - already gone
                logger.debug("kill split coordinator: %s", exc)
        self.iterators = []
