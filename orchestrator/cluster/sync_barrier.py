"""The coordinator's sync barrier: every rank's report of one sync point in, one result out to all.

This module owns the gathering of ranks at a sync point, without Ray or torch: :class:`SyncBarrier`
keys each sync point by its report's ``(kind, epoch, step)``, collects one report per rank in any
order, runs the handler (``CoordinatorCore.handle``) exactly once when the last rank arrives, and
hands every waiting rank the same decisions (or the same error, so none hangs); :class:`_SyncPoint`
is one point's state until every rank has collected its result.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

from orchestrator.decisions import Decision, Report

Reports = dict[int, Report]


@dataclass
class _SyncPoint:
    reports: Reports = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: list[Decision] = field(default_factory=list)
    error: BaseException | None = None
    served: int = 0


class SyncBarrier:
    """Gathers the reports of one sync point from every rank; the last to arrive runs ``handler`` once.

    A sync point is keyed by the report's ``(kind, epoch, step)``; every rank waiting at it gets
    the same result, whatever order the ranks arrive in.

    Args:
        world_size: Number of ranks that report at each sync point.
        handler: Turns every rank's report into the decisions for all (``CoordinatorCore.handle``).

    Example:
        >>> import asyncio
        >>> from orchestrator.decisions import ReportKind
        >>> barrier = SyncBarrier(1, lambda reports: [])
        >>> asyncio.run(barrier.arrive(0, Report(ReportKind.TRAIN_BEGIN)))
        []
    """

    def __init__(self, world_size: int, handler: Callable[[Reports], list[Decision]]) -> None:
        self.world_size = world_size
        self.handler = handler
        self._points: dict[tuple[str, int, int], _SyncPoint] = {}

    @property
    def pending(self) -> tuple[tuple[str, int, int], ...]:
        """The sync points some rank is waiting at, or whose result not every rank has collected yet."""
        return tuple(self._points)

    async def arrive(self, rank: int, report: Report) -> list[Decision]:
        """Wait until every rank has reported this sync point; return the decisions for all ranks."""
        key = (str(report.kind), report.epoch, report.step)
        point = self._points.setdefault(key, _SyncPoint())
        point.reports[rank] = report
        if len(point.reports) == self.world_size:
            try:
                point.result = self.handler(point.reports)
            except BaseException as exc:  # every waiting rank raises it, none hangs
                point.error = exc
            finally:
                point.done.set()
        await point.done.wait()
        point.served += 1
        if point.served == self.world_size:
            del self._points[key]
        if point.error is not None:
            raise point.error
        return point.result
