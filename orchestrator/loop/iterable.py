"""Iterable and streaming datasets: each rank's shard, its batches, and their exact resume.

``data()`` may return ``torch.utils.data.IterableDataset``\\ s (for training, validation or both).

**Sharding.** Across ranks every sample is read once per data pass:

- A plain iterable that knows nothing of ranks is sharded by the framework: rank ``r`` of ``N``
  keeps the samples ``r, r + N, r + 2N, ...`` of the stream (every rank reads the whole stream and
  keeps its part, so make producing a sample cheap, or make the dataset rank-aware).
- A **rank-aware** dataset shards itself, in one of two ways: a method ``rank_shard(rank,
  world_size)`` returning the iterable this rank reads (the ranks' shards partition the stream), or
  an attribute ``rank_aware = True`` saying that the dataset already yields only this rank's part
  (e.g. it reads ``torch.distributed.get_rank()`` or was split with ``split_dataset_by_node``).

A source that batches itself says so with ``yields_batches = True`` (with ``rank_aware``): each item
it yields is one batch, used as it is (a Ray Dataset's shard, see :mod:`orchestrator.cluster.ray_data`).
Otherwise the rank's samples are batched in the order they come (the last batch may be short). With
``loader_workers=W`` every DataLoader worker reads the rank's stream and keeps every ``W``-th
*batch*, so the batches and their order are the same whatever ``W`` (a dataset must therefore not
split itself by ``get_worker_info()``). ``set_epoch(data_pass)`` is called on a dataset that has it
when a data pass starts.

**State.** The rank's stream (:class:`TrainStream`) is the ``train_stream`` component of a backup:
the data pass, the batches of it trained, the samples read, whether the pass ended, and, for a
**stateful** dataset (``state_dict()`` / ``load_state_dict()``, as torchdata's), the dataset's state
right after the last trained batch (captured in the process that read it, with each batch). A resume
loads that state and continues (``state_dict()`` must describe the samples already yielded); a plain
iterable is re-read from the start of its pass and the batches already trained are skipped, which is
exact when the iterable yields the same samples for the same pass (seed it from ``set_epoch``).

**Epochs.** Without ``steps_per_epoch`` an epoch is one pass. With it, an epoch is at most that many
steps and the stream goes on across epochs (an unbounded stream needs it); a pass that ends first
ends the epoch early and the next epoch starts a new pass (Keras). When one rank's shard runs out
first, every rank ends the epoch at that same step: each step's signals (which ride the gradient
all-reduce) carry "no batch after this one" (the rank reads one step ahead). A pass that gives
some rank no batch at all is an error on every rank.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from orchestrator.loop.rank_state import Component


def is_iterable(dataset: Any) -> bool:
    """Whether ``dataset`` is read as a stream (an ``IterableDataset``)."""
    return isinstance(dataset, IterableDataset)


def is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def rank_source(dataset: Any, rank: int, world_size: int) -> tuple[Any, bool]:
    """What this rank reads, and whether the framework must still keep every ``world_size``-th sample."""
    if callable(getattr(dataset, "rank_shard", None)):
        return dataset.rank_shard(rank, world_size), False
    if getattr(dataset, "rank_aware", False):
        return dataset, False
    return dataset, True


def _as_is(item: Any) -> Any:
    return item


def as_datasets(value: Any, *_: Any) -> tuple[Any, Any]:
    """What ``data()`` returned as ``(train, val)``: the loop's default ``data_input`` (see :data:`DataInput`)."""
    if isinstance(value, tuple) and len(value) == 2:
        return value
    return value, None


#: ``(what data() returned, rank, world_size, LoopConfig) -> (train, val)``: what the loop reads. The Ray
#: layer passes one that turns Ray Datasets into rank shards (:mod:`orchestrator.cluster.ray_data`).
DataInput = Callable[[Any, int, int, Any], tuple[Any, Any]]


class RankBatches(IterableDataset):
    """One rank's batches of an iterable, each paired with where the stream is after it.

    Yields ``(batch, mark)``; ``mark`` is ``{"batches": batches of the pass read, "read": samples
    read from the source, "inner": the stateful source's state or None}``. Run in DataLoader workers,
    worker ``w`` of ``W`` yields the batches ``first + w, first + w + W, ...``.

    Args:
        source: The iterable this rank reads.
        rank: This rank.
        world_size: Number of ranks.
        batch_size: Samples per batch.
        stride: Keep every ``world_size``-th sample from ``rank`` (a plain iterable).
    """

    def __init__(self, source: Any, *, rank: int, world_size: int, batch_size: int, stride: bool) -> None:
        self.source, self.rank, self.world_size = source, rank, world_size
        self.batch_size, self.stride = batch_size, stride
        self.stateful = is_stateful(source)
        self.batched = bool(getattr(source, "yields_batches", False))  # each item is a whole batch
        self.data_pass = 0
        self.mark: dict[str, Any] | None = None  # continue after this batch (None: from the pass's start)
        self.limit: int | None = None  # at most this many batches in the pass

    def begin(self, data_pass: int, mark: dict[str, Any] | None = None, limit: int | None = None) -> None:
        self.data_pass, self.mark, self.limit = data_pass, mark, limit

    def __iter__(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        src, mark = self.source, self.mark
        if callable(getattr(src, "set_epoch", None)):
            src.set_epoch(self.data_pass)
        read = index = 0
        first = 0 if mark is None else int(mark["batches"])  # batches from here on are dealt to workers
        if mark is not None and mark.get("inner") is not None:
            src.load_state_dict(copy.deepcopy(mark["inner"]))  # continue where the stream was
            read, index = int(mark["read"]), first
        buffer: list[Any] = []
        for sample in src:
            i, read = read, read + 1
            if self.stride and i % self.world_size != self.rank:
                continue
            buffer.append(sample)
            if len(buffer) < (1 if self.batched else self.batch_size):
                continue
            out = self._deal(buffer, index, first, worker, workers, read)
            buffer, index = [], index + 1
            if out is not None:
                yield out
            if self.limit is not None and index >= self.limit:
                return
        if buffer:
            out = self._deal(buffer, index, first, worker, workers, read)
            if out is not None:
                yield out

    def _deal(self, buffer: list[Any], index: int, first: int, worker: int, workers: int,
              read: int) -> tuple[Any, dict[str, Any]] | None:
        if index < first or (index - first) % workers != worker:
            return None  # already trained (a re-read pass), or another worker's batch
        inner = copy.deepcopy(self.source.state_dict()) if self.stateful else None
        batch = buffer[0] if self.batched else default_collate(buffer)
        return batch, {"batches": index + 1, "read": read, "inner": inner}


def batch_loader(batches: RankBatches, *, workers: int, pin_memory: bool, seed: int) -> DataLoader:
    """The DataLoader over :class:`RankBatches`: in process, or in ``workers`` processes (started per
    iterator, so that each gets the stream's current pass and position)."""
    return DataLoader(batches, batch_size=None, collate_fn=_as_is, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=2 if workers else None, generator=torch.Generator().manual_seed(seed))


class TrainStream:
    """One rank's training stream: steps of ``k`` batches, read one step ahead, and its state.

    The ``train_stream`` component of a backup (per rank). See the module docstring.

    Example:
        >>> stream = TrainStream(dataset, rank=0, world_size=2, batch_size=8, workers=0, device=device,
        ...                      seed=0)  # doctest: +SKIP
        >>> for step, micro_batches, last in stream.steps(first_step=0, k=1, limit=None): ...  # doctest: +SKIP
    """

    def __init__(self, dataset: Any, *, rank: int, world_size: int, batch_size: int, workers: int,
                 device: torch.device, seed: int) -> None:
        source, stride = rank_source(dataset, rank, world_size)
        self.batches = RankBatches(source, rank=rank, world_size=world_size, batch_size=batch_size, stride=stride)
        self.loader = batch_loader(self.batches, workers=workers, pin_memory=device.type == "cuda", seed=seed)
        self.device, self.world_size = device, world_size
        self.data_pass = -1  # no pass started yet
        self.mark: dict[str, Any] | None = None  # after the last trained batch
        self.pass_over = True
        self._it: Iterator[Any] | None = None
        self._ahead: list[tuple[Any, dict[str, Any]]] | None = None
        self._trained_mark: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"data_pass": self.data_pass, "mark": copy.deepcopy(self.mark), "pass_over": self.pass_over}

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        self.data_pass, self.pass_over = int(state["data_pass"]), bool(state["pass_over"])
        self.mark = copy.deepcopy(state["mark"])
        self.close()  # the next step re-reads from the loaded position

    def close(self) -> None:
        """Drop the live iterator (its worker processes end now) and the batches read ahead."""
        if hasattr(self._it, "_shutdown_workers"):
            self._it._shutdown_workers()  # type: ignore[union-attr]
        self._it, self._ahead = None, None

    def _group(self, k: int) -> list[tuple[Any, dict[str, Any]]]:
        group = []
        for _ in range(k):
            item = next(self._it, None)  # type: ignore[arg-type]
            if item is None:
                break
            group.append(item)
        return group

    def _agree(self, flag: bool) -> bool:
        """Whether any rank's ``flag`` is set (one small all-reduce; rare: pass starts, skipped steps)."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def steps(self, first_step: int, k: int, limit: int | None) -> Iterator[tuple[int, list[Any], bool]]:
        """``(step, micro-batches, last)`` from ``first_step`` up to ``limit`` steps; ``last``: this rank
        has no batch after these. The caller reports every step with :meth:`trained`."""
        if self.pass_over:  # a new pass; every rank must have a batch in it
            self.data_pass, self.mark, self.pass_over = self.data_pass + 1, None, False
            self.close()
        if self._it is None:
            self.batches.begin(self.data_pass, self.mark)
            self._it = iter(self.loader)
            self._ahead = self._group(k)
            if self.mark is None and self._agree(not self._ahead):
                raise ValueError(f"the training stream gave some rank no batch in data pass {self.data_pass} "
                                 f"({self.world_size} ranks share it): it needs at least one batch per rank")
        step = first_step
        while self._ahead:
            group = self._ahead
            at_limit = limit is not None and step + 1 >= limit
            self._ahead = self._group(k)
            self._trained_mark = group[-1][1]
            yield step, [batch for batch, _ in group], not self._ahead
            if at_limit:
                return
            step += 1

    def skipped(self, last: bool) -> bool:
        """The step just yielded was skipped (after a rollback), so no all-reduce carried ``last``:
        agree on it with one; whether any rank ran out."""
        out_of_data = self._agree(last)
        self.trained(out_of_data)
        return out_of_data

    def trained(self, out_of_data: bool) -> None:
        """The step just yielded ran; ``out_of_data`` (the same on every rank): some rank has no more."""
        self.mark = self._trained_mark
        if out_of_data:
            self.pass_over = True
            self.close()


def train_stream(dataset: Any, rank: int, world_size: int, config: Any, device: torch.device) -> TrainStream | None:
    """The rank's :class:`TrainStream` of an iterable training set (``config``: the LoopConfig), else None."""
    if not is_iterable(dataset):
        return None
    return TrainStream(dataset, rank=rank, world_size=world_size, batch_size=config.batch_size,
                       workers=config.loader_workers, device=device, seed=config.seed)


def data_components(dataset: Any, stream: TrainStream | None) -> dict[str, Component]:
    """The data's named state: ``train_stream`` (an iterable: position and its own state), or ``train_data``
    (a map-style dataset with ``state_dict``/``load_state_dict``: the training process's copy); per rank."""
    if stream is not None:
        return {"train_stream": Component(stream)}
    return {"train_data": Component(dataset)} if is_stateful(dataset) else {}


class ValStream:
    """One rank's validation batches of an iterable (unpadded: each sample once across ranks)."""

    def __init__(self, dataset: Any, *, rank: int, world_size: int, batch_size: int, workers: int,
                 pin_memory: bool, seed: int, steps: int | None) -> None:
        source, stride = rank_source(dataset, rank, world_size)
        self.batches = RankBatches(source, rank=rank, world_size=world_size, batch_size=batch_size, stride=stride)
        self.batches.begin(0, None, steps)  # the same first batches at every validation
        self.loader = batch_loader(self.batches, workers=workers, pin_memory=pin_memory, seed=seed)

    def __iter__(self) -> Iterator[Any]:
        return (batch for batch, _ in self.loader)
