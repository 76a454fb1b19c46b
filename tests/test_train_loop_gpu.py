"""TrainLoop on a real one-rank NCCL group on a CUDA device (skipped without one): the GPU path without Ray.

Run on a GPU machine with ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` so that cuBLAS is deterministic.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from orchestrator.decisions import Backup
from orchestrator.loop.specs import TrainSpec
from orchestrator.loop.train_loop import TrainLoop
from orchestrator.storage.checkpoint import SHARED_FILE
from orchestrator.loop.state_io import from_bytes
from test_train_loop import (
    BATCH_END,
    STEPS,
    InProcessLink,
    StandInCoordinator,
    _assert_same_weights,
    _config,
    _storage,
    _with_dropout,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nccl path)")


@pytest.fixture
def nccl_group(tmp_path):
    torch.cuda.set_device(0)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'group-store'}", rank=0, world_size=1)
    try:
        yield torch.device("cuda", 0)
    finally:
        dist.destroy_process_group()
        torch.use_deterministic_algorithms(False)


def _run_on(device, coordinator, config, epochs, storage=None, resume_from=None):
    spec = TrainSpec(loop=config, epochs=epochs, batch_sync_every=1, resume_from=resume_from, use_gpu=True)
    return TrainLoop(spec, rank=0, world_size=1, device=device, link=InProcessLink(coordinator),
                     storage=storage).run()


def test_a_cuda_rank_trains_backs_up_from_the_device_and_resumes_bit_identical(nccl_group, tmp_path):
    storage = _storage(tmp_path)
    config = _config(model=_with_dropout)
    straight = StandInCoordinator({(BATCH_END, 1, 2): [Backup(backup_dir="backup")]})
    whole = _run_on(nccl_group, straight, config, epochs=3, storage=storage)
    (_, folder, entries, _), = straight.persisted
    assert entries is not None and folder == f"backup/step-{STEPS + 3}"
    saved = from_bytes(storage.read_bytes(f"{folder}/{SHARED_FILE}"))
    assert all(t.device.type == "cpu" for t in saved["model"].values())  # staged off the device

    resumed = StandInCoordinator()
    rest = _run_on(nccl_group, resumed, config, epochs=3, storage=storage, resume_from=folder)
    _assert_same_weights(rest.state_dict, whole.state_dict)
    assert all(math.isfinite(r.train.totals["loss"]) for r in straight.reports if r.train is not None)
