"""TrainLoop's optimizer step (signal parameter, gradient check) trains bit for bit like a hand-written DDP loop."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from loop_links import QuietLink
from orchestrator.core.config import LoopConfig
from orchestrator.loop.data import ShardSampler
from orchestrator.loop.specs import TrainSpec
from orchestrator.loop.train_loop import TrainLoop

SAMPLES, BATCH, EPOCHS = 48, 8, 2


class _NoDecisions(QuietLink):
    def sync(self, report):
        return []


def _data() -> tuple[TensorDataset, None]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SAMPLES, 6, generator=g)
    return TensorDataset(x, (x @ torch.randn(6, 3, generator=g)).argmax(1)), None


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _optimizer(params):
    return torch.optim.SGD(params, lr=0.2, momentum=0.9)


def _hand_written(accumulate: int) -> dict[str, torch.Tensor]:
    """What a user writes: DDP (default options), forward, loss, backward, step, zero_grad, on the loop's batches."""
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # the loop seeds every stream before building the model
    model = _model()
    ddp, optimizer = DistributedDataParallel(model), _optimizer(model.parameters())
    train, _ = _data()
    sampler = ShardSampler(len(train), 0, 1, shuffle=True, seed=0)
    for epoch in range(EPOCHS):
        sampler.set_offsets(epoch, offset=0)
        batches = list(DataLoader(train, batch_size=BATCH, sampler=sampler))
        for first in range(0, len(batches), accumulate):
            group = batches[first:first + accumulate]
            for x, y in group:
                (torch.nn.functional.cross_entropy(ddp(x), y) / len(group)).backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.state_dict()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_loops_weights_after_two_epochs_equal_a_hand_written_ddp_loops_bit_for_bit(group, accumulate):
    config = LoopConfig(model=_model, optimizer=_optimizer, data=_data, loss=torch.nn.functional.cross_entropy,
                        metrics={"accuracy": "accuracy"}, batch_size=BATCH, seed=0, accumulate_grad_batches=accumulate)
    result = TrainLoop(TrainSpec(loop=config, epochs=EPOCHS), rank=0, world_size=1, device=torch.device("cpu"),
                       link=_NoDecisions()).run()
    assert result.steps_run == EPOCHS * SAMPLES // BATCH // accumulate
    want = _hand_written(accumulate)
    assert result.state_dict.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(result.state_dict[name], value), name
