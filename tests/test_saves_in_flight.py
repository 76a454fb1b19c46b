"""SavesInFlight: the coordinator's bookkeeping of backup saves until every rank's files are durable."""

from __future__ import annotations

import itertools

import pytest

from orchestrator.cluster.saves_in_flight import SavesInFlight
from orchestrator.storage.checkpoint import FileEntry

FOLDER = "backup/step-4"


def entries(rank: int) -> list[FileEntry]:
    return [FileEntry(name=f"rank-{rank}.pt", size=10 + rank, digest=f"{rank:08x}")]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_a_save_completes_once_every_rank_reported_in_any_order_with_files_in_rank_order(order):
    saves = SavesInFlight(world_size=3)
    saves.start(FOLDER)
    done = [saves.add(rank, FOLDER, entries(rank), stall_s=0.1 * (rank + 1)) for rank in order]
    assert done[:2] == [None, None]
    assert done[2].folder == FOLDER
    assert done[2].files == entries(0) + entries(1) + entries(2)
    assert done[2].stall_s == pytest.approx(0.3) and done[2].persist_s >= 0
    assert saves.write_of(FOLDER) is None and not saves.current(FOLDER, None)  # no longer in flight


def test_a_save_that_one_rank_failed_never_completes_whatever_the_others_report():
    saves = SavesInFlight(world_size=2)
    write = saves.start(FOLDER)
    saves.add(0, FOLDER, entries(0), stall_s=0.0)
    saves.fail(FOLDER)
    assert saves.current(FOLDER, write)  # still the save in flight: later reports of it are read, and dropped
    assert saves.add(0, FOLDER, entries(0), stall_s=0.0) is None
    assert saves.add(1, FOLDER, entries(1), stall_s=0.0) is None


def test_a_folder_written_again_makes_the_earlier_saves_reports_stale_and_starts_its_ranks_afresh():
    saves = SavesInFlight(world_size=2)
    first = saves.start(FOLDER)
    saves.add(0, FOLDER, entries(0), stall_s=0.0)
    saves.fail(FOLDER)
    second = saves.start(FOLDER)  # the folder written again (after a rollback)
    assert second != first and saves.write_of(FOLDER) == second
    assert not saves.current(FOLDER, first) and saves.current(FOLDER, second) and saves.current(FOLDER, None)
    assert saves.add(1, FOLDER, entries(1), stall_s=0.0) is None  # rank 0's files of the first save do not count
    assert saves.add(0, FOLDER, entries(0), stall_s=0.0).files == entries(0) + entries(1)


def test_abandoned_saves_are_returned_sorted_and_never_complete():
    saves = SavesInFlight(world_size=1)
    saves.start("backup/step-8")
    saves.start(FOLDER)
    assert saves.abandon() == [FOLDER, "backup/step-8"]
    assert not saves.current(FOLDER, None) and saves.abandon() == []
