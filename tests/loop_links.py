"""What in-process tests of the per-rank loop share: a link that ignores what a test does not look at."""

from __future__ import annotations

from typing import Any


class QuietLink:
    """The :class:`~orchestrator.loop.specs.CoordinatorLink` calls a test does not record: progress,
    persisted files and heartbeats are dropped; subclasses define ``sync`` (and override the rest as needed)."""

    def progress(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        pass

    def persisted(self, rank: int, folder: str, entries: Any, meta: dict[str, Any]) -> None:
        pass

    def heartbeat(self) -> None:
        pass
