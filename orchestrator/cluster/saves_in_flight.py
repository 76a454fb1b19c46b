"""The coordinator's backup saves in flight, until every rank's files are durable (then one commits).

Each save decided at a sync point gets a write number; a folder written again (after a rollback)
gets a new one, and reports of the earlier save, which carry the old number, are ignored. A save
that any rank failed to write never commits; one abandoned (a rollback) never commits either.
Torch- and Ray-free, like :class:`~orchestrator.cluster.coordinator_core.CoordinatorCore`, which
owns one and commits what it returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from orchestrator.storage.checkpoint import FileEntry

__all__ = ["Complete", "SavesInFlight"]


@dataclass(frozen=True)
class Complete:
    """A save whose files every rank reported durable: what its manifest and event need.

    Args:
        folder: The save's step folder.
        files: Every rank's files, in rank order.
        stall_s: The longest training stall its save caused on a rank.
        persist_s: Seconds from the decision to the last rank's files durable.
    """

    folder: str
    files: list[FileEntry]
    stall_s: float
    persist_s: float


class SavesInFlight:
    """The saves decided and not yet complete, with each rank's durable files.

    Args:
        world_size: The number of ranks that write files of every save.

    Example:
        >>> saves = SavesInFlight(world_size=2)
        >>> write = saves.start("backup/step-4")
        >>> saves.current("backup/step-4", write), saves.add(0, "backup/step-4", [], stall_s=0.1)
        (True, None)
        >>> saves.add(1, "backup/step-4", [], stall_s=0.2).stall_s
        0.2
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._files: dict[str, dict[int, list[FileEntry]]] = {}
        self._failed: set[str] = set()
        self._stalls: dict[str, float] = {}
        self._writes: dict[str, int] = {}
        self._decided_at: dict[str, float] = {}
        self._count = 0

    def start(self, folder: str) -> int:
        """A save of ``folder`` decided now; returns its write number (an earlier save's reports are stale)."""
        self._count += 1
        self._writes[folder] = self._count
        self._decided_at[folder] = time.monotonic()
        self._files.pop(folder, None)
        self._failed.discard(folder)
        return self._count

    def write_of(self, folder: str) -> int | None:
        """The write number of the save of ``folder`` in flight, or None."""
        return self._writes.get(folder)

    def current(self, folder: str, write: int | None) -> bool:
        """Whether a report of save ``write`` (None: unnumbered) of ``folder`` is of the save in flight."""
        return folder in self._writes and (write is None or write == self._writes[folder])

    def fail(self, folder: str) -> None:
        """A rank could not write its files: this save never completes."""
        self._files.pop(folder, None)
        self._failed.add(folder)

    def add(self, rank: int, folder: str, entries: list[FileEntry], stall_s: float) -> Complete | None:
        """Record ``rank``'s durable files; the :class:`Complete` save once every rank's are in (it is then
        no longer in flight), else None (also for a save that failed on a rank)."""
        if folder in self._failed:
            return None
        ranks = self._files.setdefault(folder, {})
        ranks[rank] = entries
        self._stalls[folder] = max(self._stalls.get(folder, 0.0), stall_s)
        if len(ranks) < self.world_size:
            return None
        del self._files[folder]
        del self._writes[folder]
        persist_s = time.monotonic() - self._decided_at.pop(folder, time.monotonic())
        return Complete(folder, [e for r in sorted(ranks) for e in ranks[r]], self._stalls.pop(folder, 0.0), persist_s)

    def abandon(self) -> list[str]:
        """Drop every save in flight (none of them will complete); returns their folders, sorted."""
        folders = sorted(self._writes)
        self._writes.clear()
        self._files.clear()
        return folders
