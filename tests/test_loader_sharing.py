"""How the framework's loader workers hand batches to the rank: by named shared memory, and nothing
left behind when the rank leaves an epoch before its end (orchestrator/loop/data.py)."""

from __future__ import annotations

import os
import time

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from orchestrator.loop.data import ShardSampler, drain, make_loader, shutdown_workers
from orchestrator.loop.optim_step import micro_batch_groups
from clean_process import in_clean_process


class StrategyProbe(Dataset):
    """Each sample says which sharing strategy the process that loaded it uses."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return torch.full((4,), float(i)), torch.multiprocessing.get_sharing_strategy()


class StuckAfter(Dataset):
    """Samples 0-3 at once; any later one after 2 seconds (a stalled source)."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        if i >= 4:
            time.sleep(2)
        return torch.full((1000,), float(i))


def worker_files(loader: DataLoader) -> list[str]:
    """The shared-memory files that ``loader``'s worker processes created and nobody freed."""
    pids = {w.pid for w in loader._iterator._workers}
    return [f for f in os.listdir("/dev/shm") if f.startswith("torch_") and int(f.split("_")[1]) in pids]


def wait_until(check, timeout_s: float = 60.0) -> bool:
    """Whether ``check()`` held within ``timeout_s`` (a file appears or goes once another process acts)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def big_loader() -> DataLoader:
    data = TensorDataset(torch.arange(2048 * 1000, dtype=torch.float32).reshape(2048, 1000))
    return make_loader(data, ShardSampler(2048, rank=0, world_size=1, shuffle=False), batch_size=64, seed=0,
                       workers=2)


@in_clean_process
def test_loader_workers_send_batches_as_named_files_and_the_rank_keeps_its_own_strategy():
    before = torch.multiprocessing.get_sharing_strategy()
    loader = make_loader(StrategyProbe(), ShardSampler(16, rank=0, world_size=1, shuffle=False), batch_size=4,
                         seed=0, workers=2)
    try:
        batches = list(loader)
    finally:
        shutdown_workers(loader)
    assert torch.cat([x for x, _ in batches]).tolist() == [[float(i)] * 4 for i in range(16)]
    assert {s for _, strategies in batches for s in strategies} == {"file_system"}
    assert torch.multiprocessing.get_sharing_strategy() == before


@in_clean_process
def test_epochs_left_mid_way_leave_no_shared_memory_and_the_next_epoch_reads_every_sample():
    loader = big_loader()
    try:
        for _ in range(3):  # a stop or a rollback mid-epoch: two steps, then the epoch is left
            groups = micro_batch_groups(loader, first_step=0, k=2)
            next(groups), next(groups)
            assert wait_until(lambda: worker_files(loader))  # the workers sent batches ahead, not yet read
            groups.close()
            assert wait_until(lambda: worker_files(loader) == []), worker_files(loader)
        rows = torch.cat([x for (x,) in loader])
        assert rows[:, 0].tolist() == [1000.0 * i for i in range(2048)]
        assert wait_until(lambda: worker_files(loader) == []), worker_files(loader)
    finally:
        shutdown_workers(loader)


@in_clean_process
def test_draining_a_stalled_worker_gives_up_after_its_timeout_and_restores_the_loader_timeout():
    loader = make_loader(StuckAfter(), ShardSampler(64, rank=0, world_size=1, shuffle=False), batch_size=1,
                         seed=0, workers=2)
    try:
        it = iter(loader)
        assert next(it)[:, 0].tolist() == [0.0]
        next(it), next(it), next(it)  # the workers are now on samples 4 and on
        drain(it, timeout_s=0.5)  # gives up on them instead of waiting 2 seconds a batch
        assert it._tasks_outstanding > 0 and it._timeout == 0  # batches left unreceived; the loader as it was
    finally:
        shutdown_workers(loader)


@in_clean_process
def test_an_epoch_finalised_in_a_forked_process_leaves_the_rank_s_loader_alone():
    loader = big_loader()
    try:
        groups = micro_batch_groups(loader, first_step=0, k=2)
        next(groups)
        iterator = loader._iterator
        assert wait_until(lambda: worker_files(loader))  # batches prepared, not yet read
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # as a loader worker forked later whose garbage collector finalises the epoch
            os.close(read)
            outstanding = iterator._tasks_outstanding
            groups.close()
            os.write(write, b"untouched" if iterator._tasks_outstanding == outstanding else b"drained")
            os._exit(0)
        os.close(write)
        assert os.read(read, 16) == b"untouched"
        os.waitpid(child, 0)
        os.close(read)
        groups.close()  # the rank's own drain still receives what its workers prepared
        assert wait_until(lambda: worker_files(loader) == []), worker_files(loader)
        assert torch.cat([x for (x,) in loader])[:, 0].tolist() == [1000.0 * i for i in range(2048)]
    finally:
        shutdown_workers(loader)
