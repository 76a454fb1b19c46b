"""Sync points over the process group: the ranks combine their reports, rank 0 alone talks to the coordinator.

At a sync point every rank holds a :class:`~orchestrator.decisions.Report`. Instead of one Ray call
per rank (a fan-in that grows with the number of ranks), :class:`GroupLink` combines the reports
over the training process group (the default torch.distributed group the loop already uses, with
tensors on the loop's device: gloo on CPU, nccl on GPU) and rank 0 alone hands the coordinator the
combined report; the decisions come back to every rank with one broadcast from rank 0. Per sync point:

1. one MAX all-reduce of a small header (:func:`header`): the OR of the flags (``nonfinite``,
   ``preempted``, ``epoch_ends``), the lengths of the metric sums, and fingerprints of everything
   the ranks must agree on (sync point, learning rate, steps, layout, metric names), as
   ``[f, -f]`` pairs so that one MAX gives both the largest and the smallest;
2. when every rank agrees: one SUM all-reduce of the metric sums and counts (float64, as the
   coordinator sums them) and rank 0 sends ``{0: combined report}`` (:func:`combined`). The
   coordinator's ``aggregate`` of it is the ``aggregate`` of the per-rank reports: the same sums,
   added in the collective's order (bit for bit the same for up to two ranks, within float64
   rounding beyond);
3. when some rank disagrees (a learning rate, a data layout, ...; rare, and a run that meets it
   fails): every report is gathered to rank 0 (``gather_object``) and sent as is, so the
   coordinator's checks (``same_lr``, ``same_data``) raise the same errors naming each rank's
   value as when every rank reported on its own.

A rank waiting inside a sync point (in a collective for its peers, or for the coordinator's
callbacks) sends heartbeats from a thread of its own (every ``beat_every_s``): the driver's hang
watchdog does not count it as hung, and a rank that hangs anywhere else still goes silent.
Backup commits (``persisted``) stay one call per rank per backup, from each rank's persist thread:
they come once a backup, not at every sync point.

Example:
    >>> link = GroupLink(RayLink(coordinator, rank), rank, world_size, device)  # doctest: +SKIP
    >>> decisions = link.sync(report)  # every rank, at the same sync point  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Protocol

import torch
import torch.distributed as dist

from orchestrator.core.metrics import PhaseSums
from orchestrator.decisions import Decision, Report
from orchestrator.loop.specs import CoordinatorLink

__all__ = ["GroupLink", "RankZeroLink", "agreed", "combined", "fingerprint", "header", "lengths", "sums_vector"]

_PHASES = ("train", "val")
_NO_NAMES = -1.0  # a rank without metric sums (none yet): agrees with any names
_LOWEST = -float(2 ** 53)
#: Header slots: [agree, -agree, nonfinite, preempted, epoch_ends], then per phase [names, -names,
#: length, rank 0 has sums without names].
_FLAGS = 5
_PER_PHASE = 4


class RankZeroLink(Protocol):
    """Rank 0's line to the coordinator (a Ray actor handle in production), and every rank's own calls."""

    def decide(self, reports: dict[int, Report]) -> list[Decision]:
        """Rank 0: one sync point's reports (combined, or every rank's) in; the decisions for all out."""

    def progress(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        """Fire-and-forget progress update (rank 0 only, time-gated)."""

    def persisted(self, rank: int, folder: str, entries: list[Any] | None, meta: dict[str, Any]) -> None:
        """A backup's files on this rank are durable (entries) or failed (None); blocks until recorded."""

    def heartbeat(self) -> None:
        """Fire-and-forget sign of life for the hang watchdog."""


def fingerprint(value: Any) -> float:
    """A 52-bit hash of ``repr(value)``, exact in float64 (equal values, equal fingerprints on every rank).

    Example:
        >>> fingerprint(("epoch_end", 3)) == fingerprint(("epoch_end", 3)) != fingerprint(("epoch_end", 4))
        True
    """
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return float(int.from_bytes(digest, "big") >> 12)


def _sums(value: object) -> PhaseSums | None:
    return value if isinstance(value, PhaseSums) else None


def _names(report: Report, phase: str) -> list[str]:
    sums = _sums(getattr(report, phase))
    return list(sums.totals) if sums is not None else []


def header(report: Report, rank: int) -> list[float]:
    """This rank's header of a sync point, to be MAX-reduced over the ranks (see the module)."""
    agree = fingerprint((str(report.kind), report.epoch, report.step, report.learning_rate, report.steps_per_epoch,
                         report.global_step, report.layout, report.train is None, report.val is None))
    out = [agree, -agree, float(report.nonfinite), float(report.preempted), float(report.epoch_ends)]
    for phase in _PHASES:
        names = _names(report, phase)
        if names:
            f = fingerprint(names)
            out += [f, -f, float(len(names)), 0.0]
        else:
            out += [_NO_NAMES, _LOWEST, 0.0, float(rank == 0)]
    return out


def agreed(reduced: list[float]) -> bool:
    """Whether every rank agrees on what must agree, given the MAX-reduced headers."""
    if reduced[0] != -reduced[1]:
        return False
    for i in range(len(_PHASES)):
        names, low, _, rank0_lacks = reduced[_FLAGS + _PER_PHASE * i:_FLAGS + _PER_PHASE * (i + 1)]
        if names != _NO_NAMES and (names != -low or rank0_lacks > 0):  # rank 0 must have the names
            return False
    return True


def lengths(reduced: list[float]) -> list[int]:
    """The number of metric sums of each phase (train, val), from the MAX-reduced headers."""
    return [int(reduced[_FLAGS + _PER_PHASE * i + 2]) for i in range(len(_PHASES))]


def sums_vector(report: Report, sizes: list[int]) -> list[float]:
    """This rank's ``[train sums..., train count, val sums..., val count]`` (zeros where it has none),
    to be SUM-reduced over the ranks."""
    out: list[float] = []
    for phase, k in zip(_PHASES, sizes):
        sums = _sums(getattr(report, phase))
        values = list(sums.totals.values()) if sums is not None and sums.totals else [0.0] * k
        out += [float(v) for v in values] + [float(sums.count) if sums is not None else 0.0]
    return out


def combined(first: Report, reduced: list[float], summed: list[float]) -> Report:
    """Rank 0's report with every rank's sums added up (``summed``) and flags OR-ed (``reduced``)."""
    fields: dict[str, Any] = {"nonfinite": reduced[2] > 0, "preempted": reduced[3] > 0, "epoch_ends": reduced[4] > 0}
    at = 0
    for phase, k in zip(_PHASES, lengths(reduced)):
        values, count = summed[at:at + k], summed[at + k]
        at += k + 1
        if getattr(first, phase) is not None:
            fields[phase] = PhaseSums(dict(zip(_names(first, phase), values)), int(round(count)))
    return dataclasses.replace(first, **fields)


class _Ticker:
    """Calls ``beat`` every ``every_s`` while the rank waits inside :meth:`waiting`, from a thread of its own."""

    def __init__(self, beat: Any, every_s: float) -> None:
        self._beat, self._every = beat, every_s
        self._cond = threading.Condition()
        self._waiting, self._closed, self._round = False, False, 0
        self._thread: threading.Thread | None = None

    @contextmanager
    def waiting(self) -> Iterator[None]:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="orchestrator-sync-heartbeat", daemon=True)
                self._thread.start()
            self._waiting, self._round = True, self._round + 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._waiting = False
                self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                round_ = self._round
                self._cond.wait(timeout=self._every)
                due = self._waiting and self._round == round_ and not self._closed
            if due:
                try:
                    self._beat()
                except Exception:  # noqa: BLE001 - a sign of life is best effort; the sync itself reports failures
                    pass

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)


class GroupLink:
    """The loop's :class:`~orchestrator.loop.specs.CoordinatorLink` for one rank of a process group:
    sync points are combined over the group and only rank 0 calls the coordinator (see the module).

    Every rank of the group must call :meth:`sync` at the same sync points, in the same order (the
    loop does: its sync points follow from decisions every rank applies alike).

    Args:
        link: This rank's line to the coordinator (:class:`RankZeroLink`; only rank 0's ``decide`` is called).
        rank: This rank.
        world_size: Ranks in the default process group.
        device: Where the collectives' tensors live (the loop's device: CPU with gloo, the GPU with nccl).
        beat_every_s: Seconds between heartbeats while waiting at a sync point. Defaults to ``1.0``
            (the loop's ``progress_interval_s``).

    Example:
        >>> link = GroupLink(RayLink(coordinator, 0), rank=0, world_size=1, device=torch.device("cpu"))  # doctest: +SKIP
        >>> link.sync(Report(ReportKind.TRAIN_BEGIN))  # doctest: +SKIP
        []
    """

    def __init__(self, link: RankZeroLink, rank: int, world_size: int, device: torch.device,
                 beat_every_s: float = 1.0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"GroupLink: rank must be in [0, world_size={world_size}), got {rank}")
        if beat_every_s <= 0:
            raise ValueError(f"GroupLink: beat_every_s must be positive, got {beat_every_s}")
        self.link, self.rank, self.world_size, self.device = link, rank, world_size, device
        self._ticker = _Ticker(link.heartbeat, beat_every_s)

    def sync(self, report: Report) -> list[Decision]:
        """Combine this sync point's report with every rank's; return the decisions for all (the same list).

        Raises:
            RuntimeError: On the other ranks, when rank 0's call to the coordinator failed (rank 0
                raises the call's own error).
        """
        with self._ticker.waiting():
            if self.world_size == 1:
                return self.link.decide({0: report})
            reports = self._combine(report)
            answer: list[Any] = [None]
            if self.rank == 0:
                try:
                    answer[0] = (self.link.decide(reports), None)
                except BaseException as exc:
                    dist.broadcast_object_list([(None, f"{type(exc).__name__}: {exc}")], src=0)
                    raise
            dist.broadcast_object_list(answer, src=0)
        decisions, error = answer[0]
        if error is not None:
            raise RuntimeError(f"rank 0 could not hand the {report.kind} sync point (epoch {report.epoch}, step "
                               f"{report.step}) to the coordinator: {error}")
        return decisions

    def _combine(self, report: Report) -> dict[int, Report]:
        """Rank 0: the reports to send (``{0: combined}``, or every rank's when they disagree); others: ``{}``."""
        reduced = torch.tensor(header(report, self.rank), dtype=torch.float64, device=self.device)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        top = reduced.tolist()
        if not agreed(top):
            everyone: list[Report] | None = [None] * self.world_size if self.rank == 0 else None  # type: ignore[list-item]
            dist.gather_object(report, everyone, dst=0)
            return dict(enumerate(everyone)) if everyone is not None else {}
        summed = torch.tensor(sums_vector(report, lengths(top)), dtype=torch.float64, device=self.device)
        dist.all_reduce(summed)
        return {0: combined(report, top, summed.tolist())} if self.rank == 0 else {}

    def progress(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        self.link.progress(epoch, step, logs)

    def persisted(self, rank: int, folder: str, entries: list[Any] | None, meta: dict[str, Any]) -> None:
        self.link.persisted(rank, folder, entries, meta)

    def heartbeat(self) -> None:
        self.link.heartbeat()

    def close(self) -> None:
        """Stop the heartbeat thread (the loop has ended)."""
        self._ticker.close()


class Pulse:
    """A rank's time-gated signs of life between sync points, at most one per ``every_s``: rank 0's running
    loss (the driver's progress bar), on the other ranks a heartbeat (the driver's hang watchdog);
    :meth:`beat`, a heartbeat on any rank (validation).

    Args:
        link: The rank's link to the coordinator.
        rank: This rank.
        every_s: The least time between two signs (the loop's ``progress_interval_s``).

    Example:
        >>> pulse = Pulse(link, rank=0, every_s=1.0)  # doctest: +SKIP
        >>> pulse.progress(epoch=0, step=3, running_loss=0.7)  # doctest: +SKIP
    """

    def __init__(self, link: CoordinatorLink, rank: int, every_s: float) -> None:
        self.link, self.rank, self.every_s = link, rank, every_s
        self._last = -math.inf  # the first sign goes out at once (monotonic time may start near 0)

    def progress(self, epoch: int, step: int, running_loss: float) -> None:
        """Rank 0 sends the cluster-wide running loss; every other rank a heartbeat (fire and forget)."""
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        if self.rank == 0:
            self.link.progress(epoch, step, {"loss": running_loss if math.isfinite(running_loss) else float("nan")})
        else:
            self.link.heartbeat()

    def beat(self) -> None:
        """A heartbeat (fire and forget)."""
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.link.heartbeat()
