"""Elastic world size in the per-rank loop, without Ray: the same global batch on fewer ranks, and a
backup written by two ranks resumed on one, every sample of the epoch trained exactly once."""

from __future__ import annotations

import functools
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from rank_processes import CONTEXT, start_ranks
from torch.utils.data import Dataset, TensorDataset

from loop_links import QuietLink
from orchestrator.core.config import LoopConfig
from orchestrator.decisions import Backup, Decision, Report, ReportKind
from orchestrator.loop.specs import TrainSpec
from orchestrator.loop.train_loop import TrainLoop
from orchestrator.storage.fs import StorageSpec

pytestmark = pytest.mark.timeout(240)
TRAIN, BATCH, MAX = 48, 4, 2  # global batch 8: 6 steps an epoch on any world size
EPOCHS = 2


class Recorded(Dataset):
    """A regression set that appends every index it serves to ``<folder>/rank-<r>.jsonl`` (with the epoch)."""

    def __init__(self, folder: str) -> None:
        g = torch.Generator().manual_seed(42)
        x = torch.randn(TRAIN, 4, generator=g)
        self.data = TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]))
        self.folder = Path(folder)
        self.rank, self.epoch = dist.get_rank(), 0
        _BUILT["data"] = self

    def __len__(self) -> int:
        return TRAIN

    def __getitem__(self, index: int):
        with (self.folder / f"rank-{self.rank}.jsonl").open("a") as out:
            out.write(json.dumps([self.epoch, index]) + "\n")
        return self.data[index]


_BUILT: dict[str, Recorded] = {}  # this process's dataset, for the link to tell it the epoch


def _recorded(folder: str) -> tuple[Recorded, None]:
    return Recorded(folder), None


class Link(QuietLink):
    """A rank's stand-in coordinator: scripted decisions by (kind, epoch, step), each given once."""

    def __init__(self, script: dict[tuple[ReportKind, int, int], list[Decision]]) -> None:
        self.script = dict(script)
        self.epoch_ends: list[dict[str, Any]] = []

    def sync(self, report: Report) -> list[Decision]:
        if report.kind == ReportKind.EPOCH_BEGIN:
            _BUILT["data"].epoch = report.epoch
        if report.kind == ReportKind.EPOCH_END:
            self.epoch_ends.append({"epoch": report.epoch, "count": report.train.count,
                                    "loss": report.train.totals.get("loss")})
        return self.script.pop((report.kind, report.epoch, report.step), [])


def _config(folder: str, accumulate: int = 1) -> LoopConfig:
    return LoopConfig(model=lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)),
                      optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
                      data=functools.partial(_recorded, folder), loss=torch.nn.functional.mse_loss, batch_size=BATCH,
                      seed=0, accumulate_grad_batches=accumulate)


def _rank(rank: int, world: int, store: str, folder: str, script: dict, resume: tuple[str, int] | None,
          out: Any) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        config = _config(folder)
        spec = TrainSpec(loop=config, epochs=EPOCHS, batch_sync_every=1, max_workers=MAX,
                         resume_from=resume[0] if resume else None, resume_world_size=resume[1] if resume else None)
        storage = StorageSpec(url=folder, run_name="r").open()
        link = Link(script)
        result = TrainLoop(spec, rank=rank, world_size=world, device=torch.device("cpu"), link=link,
                           storage=storage).run()
        state = {k: v.tolist() for k, v in (result.state_dict or {}).items()}  # no shared-memory tensors
        out.put((rank, state, link.epoch_ends))
    finally:
        dist.destroy_process_group()


def run(world: int, folder: Path, script: dict | None = None, resume: tuple[str, int] | None = None):
    """Every rank's (state dict, epoch-end sums), each rank in its own process (forked from the fork server: tests/rank_processes.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = CONTEXT.SimpleQueue()
    # a file store of its own (not a TCP port chosen before the spawned ranks bind it: another process
    # could take it in between)
    store = folder / f"store-{uuid.uuid4().hex}"
    start_ranks(_rank, (world, str(store), str(folder), script or {}, resume, out), nprocs=world)
    store.unlink(missing_ok=True)
    got = {rank: ({k: torch.tensor(v) for k, v in state.items()}, ends)
           for rank, state, ends in (out.get() for _ in range(world))}
    return got


def seen(folder: Path) -> dict[int, list[int]]:
    """Every index served, by epoch, over every rank's file."""
    by_epoch: dict[int, list[int]] = {}
    for file in folder.glob("rank-*.jsonl"):
        for line in file.read_text().splitlines():
            epoch, index = json.loads(line)
            by_epoch.setdefault(epoch, []).append(index)
    return by_epoch


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    return run(2, folder), folder


def test_one_rank_accumulating_two_micro_batches_trains_like_two_ranks_with_the_same_global_batch(
        two_ranks, tmp_path):
    (both, folder) = two_ranks
    one = run(1, tmp_path / "one")
    close(one[0][0], both[0][0])
    for e in range(EPOCHS):
        assert one[0][1][e]["count"] == both[0][1][e]["count"] + both[1][1][e]["count"] == TRAIN
        assert one[0][1][e]["loss"] == pytest.approx(both[0][1][e]["loss"] + both[1][1][e]["loss"], rel=1e-5)
    for runs in (seen(folder), seen(tmp_path / "one")):
        assert {e: sorted(v) for e, v in runs.items()} == {e: list(range(TRAIN)) for e in range(EPOCHS)}


def test_a_backup_of_two_ranks_resumes_on_one_with_every_sample_once_and_the_epoch_s_sums_carried_over(
        two_ranks, tmp_path):
    (both, _) = two_ranks
    first = tmp_path / "first"
    script = {(ReportKind.BATCH_END, 0, 2): [Backup(backup_dir="backup")]}
    run(2, first, script)  # the backup holds steps 0-2 of epoch 0 (global step 3)
    for file in first.glob("rank-*.jsonl"):
        file.unlink()
    resumed = run(1, first, resume=("backup/step-3", 2))  # the same run directory: it reads the backup
    close(resumed[0][0], both[0][0])
    after = seen(first)
    trained_before = 3 * BATCH * MAX  # the samples of the steps the backup holds
    assert len(after[0]) == TRAIN - trained_before
    assert sorted(after[0] + _first_steps(trained_before)) == list(range(TRAIN))
    assert sorted(after[1]) == list(range(TRAIN))
    assert resumed[0][1][0]["count"] == TRAIN  # the two ranks' sums of steps 0-2 were carried over to rank 0


def _first_steps(n: int) -> list[int]:
    """The first ``n`` indices of epoch 0's permutation: what the steps before the backup trained."""
    from orchestrator.loop.data import ShardSampler

    return ShardSampler(TRAIN, 0, 1, seed=0).permutation()[:n]
