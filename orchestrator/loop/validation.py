"""One rank's validation pass at the end of an epoch, and how it yields to a preemption notice.

This module owns validation inside the per-rank loop: :class:`Validation` builds the rank's
unpadded shard of the validation set (every sample counted once across ranks) and its loader, and
:meth:`Validation.run` evaluates the model on it, summing loss and metrics exactly. While watching
for preemption, every rank runs the same number of rounds (those of the rank with the most
batches; the others idle through the last ones), and at its check rounds all-reduces the ranks'
notices overlapped with the round's batch, so that all ranks abandon validation together, with
their RNG streams as they were before it. :class:`~orchestrator.loop.train_loop.TrainLoop` calls it
once per epoch.

**Check rounds.** Rounds 0 and 1 are checked; after that, a check about every
:data:`NOTICE_EVERY_S` seconds: each check's all-reduce also carries rank 0's count of rounds until
the next one (from the pace of the rounds since the previous check), so every rank checks at the
same rounds. A check is a collective whose result is read on the host (on a GPU, a wait for the
round's kernels): checking every round made a pass of the benchmark model on 2 CPU ranks take about
1.6 times as long (``python benchmarks/validation_notices.py``). A notice that arrives after the
last check of a pass is seen at the epoch-end sync point, as one during its last round always was.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from orchestrator.core.metrics import PhaseSums
from orchestrator.loop.data import ShardSampler, drain, make_loader
from orchestrator.loop.iterable import ValStream, is_iterable
from orchestrator.loop.rank_state import Accumulator
from orchestrator.loop.state_io import capture_rng, restore_rng
from orchestrator.loop.steps import move_to, split_output

#: About how often (seconds) a validation pass that watches for preemption checks the ranks' notices.
NOTICE_EVERY_S = 0.5


class Validation:
    """One rank's validation shard and the pass over it.

    Args:
        dataset: The validation set (map-style, or an iterable: see :mod:`~orchestrator.loop.iterable`),
            or ``None``; an empty map-style one means no validation.
        rank: This rank.
        world_size: Number of ranks.
        batch_size: Per-rank validation batch size.
        seed: Seed of the loader's private generator.
        device: Where the model lives.
        preemption: Set (from another thread) when a preemption notice arrives.
        beat: Called once per round: the loop's time-gated heartbeat.
        steps: At most this many batches per rank (its shard's first ones, as Keras's
            ``validation_steps``). Defaults to ``None``: the whole shard.
        workers: DataLoader worker processes (see :func:`~orchestrator.loop.data.make_loader`). Defaults to ``0``.
        pin_memory: Pin the batches (GPU). Defaults to ``False``.
        lockstep: Every rank runs the model the same number of times (``strategy="fsdp"``, whose
            forward all-gathers the parameters): every rank runs every round, a rank whose shard is
            done runs its last batch again and ignores the result. Defaults to ``False``.
        notice_every_s: About how often a watching pass checks for notices after its first two
            rounds (``0``: every round). Defaults to :data:`NOTICE_EVERY_S`.

    Attributes:
        loader: The shard's loader, or ``None`` without validation data.
        checks: Notice checks (all-reduces) made by the passes so far.
        rounds: Validation batches of the rank with the most (every rank runs as many rounds
            while watching for preemption); ``0`` without validation data.
    """

    def __init__(self, dataset: Any, *, rank: int, world_size: int, batch_size: int, seed: int,
                 device: torch.device, preemption: threading.Event, beat: Callable[[], None],
                 steps: int | None = None, workers: int = 0, pin_memory: bool = False,
                 lockstep: bool = False, notice_every_s: float = NOTICE_EVERY_S) -> None:
        if notice_every_s < 0:
            raise ValueError(f"notice_every_s must be at least 0, got {notice_every_s}")
        self.device = device
        self.lockstep = lockstep
        self.rank = rank
        self.notice_every_s = notice_every_s
        self.checks = 0  # notice checks (all-reduces) of the passes so far
        self.preemption = preemption
        self.beat = beat
        self.loader: DataLoader | ValStream | None = None
        self.rounds: int | None = 0
        if is_iterable(dataset):  # a stream: unpadded shards, rounds until every rank is done (None)
            self.loader, self.rounds = ValStream(dataset, rank=rank, world_size=world_size, batch_size=batch_size,
                                                 workers=workers, pin_memory=pin_memory, seed=seed, steps=steps), None
        elif dataset is not None and len(dataset) > 0:
            sampler = ShardSampler(len(dataset), rank, world_size, shuffle=False, seed=seed, pad=False)
            if steps is not None:  # the same first batches at every validation (the same count on every rank)
                sampler.set_epoch(0, stop=steps * batch_size)
            self.loader = make_loader(dataset, sampler, batch_size=batch_size, seed=seed, workers=workers,
                                      pin_memory=pin_memory, salt=1)
            self.rounds = math.ceil(sampler.longest_shard_length() / batch_size)
            if steps is not None:
                self.rounds = min(self.rounds, steps)

    def run(self, model: torch.nn.Module, step: Callable[..., Any], *,
            watch: bool) -> tuple[PhaseSums | None, bool]:
        """Validate this rank's shard: (sums or None without validation data, abandoned).

        With ``watch``, every rank runs :attr:`rounds` rounds (ranks with fewer batches idle
        through the last ones) and each round all-reduces the ranks' preemption notices, overlapped
        with the round's batch. At the first round where any rank has one, every rank abandons
        validation, with its RNG streams as they were before validation: the state of the end of
        the epoch's training, which a resume validates again.

        Args:
            model: The model to evaluate (put in eval mode, then back in train mode).
            step: ``step(model, batch)``, the validation step (loss, metrics, sample count).
            watch: Watch for preemption notices (all ranks must agree on it).
        """
        if self.loader is None:
            return None, False
        model.eval()
        sums = Accumulator()
        batches: Any = iter(self.loader)
        if self.rounds is None:  # a stream: each round also says whether this rank still has a batch
            return self._run_stream(model, step, sums, batches, watch)
        notice = torch.zeros(2, device=self.device) if watch else None  # [any notice, rounds to the next check]
        before = capture_rng() if watch else None
        next_check, previous = 0, None  # the next check round; (round, time) of the last check
        try:
            with torch.no_grad():
                last = None
                for r in range(self.rounds if watch or self.lockstep else len(self.loader)):
                    pending = None
                    if notice is not None and r == next_check:
                        notice[0] = 1.0 if self.preemption.is_set() else 0.0
                        notice[1] = self._rounds_to_next_check(r, previous) if self.rank == 0 else 0.0
                        pending = dist.all_reduce(notice, op=dist.ReduceOp.MAX, async_op=True)
                    batch = next(batches, None) if batches is not None else None
                    if batch is None:
                        batches = None  # this rank's shard is done; it idles through the other ranks' rounds
                        self._replay(model, step, last)
                    else:
                        last = batch
                        batch = move_to(batch, self.device)
                        loss, metrics, n = split_output(step(model, batch), batch)
                        sums.add(loss.detach(), metrics, n)
                    self.beat()
                    if pending is not None:
                        pending.wait()
                        self.checks += 1
                        any_notice, rounds = notice.tolist()
                        if any_notice > 0:
                            restore_rng(before)
                            return None, True
                        next_check, previous = r + max(1, int(rounds)), (r, time.perf_counter())
        finally:
            drain(batches)  # left early (a notice, an error): its workers' batches are received
            model.train()
        return sums.phase_sums(), False

    def _rounds_to_next_check(self, r: int, previous: tuple[int, float] | None) -> float:
        """Rank 0, at check round ``r``: rounds until the next check (about :attr:`notice_every_s`
        seconds at the pace since the previous check ``(round, time)``; 1 until there is one)."""
        if previous is None or self.notice_every_s == 0:
            return 1.0
        elapsed = max(time.perf_counter() - previous[1], 1e-9)
        return float(min(2**20, max(1, int(self.notice_every_s * (r - previous[0]) / elapsed))))

    def _replay(self, model: torch.nn.Module, step: Callable[..., Any], last: Any) -> None:
        """With ``lockstep``, an idle round runs the model on this rank's last batch (result ignored)."""
        if not self.lockstep:
            return
        if last is None:
            raise RuntimeError("strategy='fsdp' validates in lockstep and this rank's validation shard is empty: "
                               "give every worker at least one validation sample (or set validation_steps)")
        step(model, move_to(last, self.device))

    def _run_stream(self, model: torch.nn.Module, step: Callable[..., Any], sums: Accumulator, batches: Any,
                    watch: bool) -> tuple[PhaseSums | None, bool]:
        """:meth:`run` over an iterable's shard, whose length no rank knows: with ``watch``, each round
        all-reduces ``[notice, has a batch]`` and the rounds go on while some rank has a batch."""
        watch = watch or self.lockstep  # lockstep: the rounds go on while any rank has a batch
        before = capture_rng() if watch else None
        flags = torch.zeros(2, device=self.device)
        last = None
        try:
            with torch.no_grad():
                while True:
                    batch = next(batches, None) if batches is not None else None
                    if batch is None:
                        batches = None
                    else:
                        last = batch
                    if watch:
                        flags[0], flags[1] = (1.0 if self.preemption.is_set() else 0.0), float(batch is not None)
                        pending = dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True)
                    elif batch is None:
                        break
                    if batch is not None:
                        batch = move_to(batch, self.device)
                        loss, metrics, n = split_output(step(model, batch), batch)
                        sums.add(loss.detach(), metrics, n)
                    self.beat()
                    if watch:
                        pending.wait()
                        if batch is None and flags[1].item() > 0:
                            self._replay(model, step, last)
                        if flags[0].item() > 0:
                            restore_rng(before)
                            return None, True
                        if flags[1].item() == 0:
                            break
        finally:
            model.train()
        return sums.phase_sums(), False
