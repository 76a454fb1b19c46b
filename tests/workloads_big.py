"""A model whose backup takes long enough to persist that a crash can land in the middle of it."""

from __future__ import annotations

import torch

WIDTH = 1024


def big_model() -> torch.nn.Module:
    """~4.2M parameters: with Adam the state is ~50 MB, a persist of about 0.1 s here, while the kill
    lands microseconds after the backup is submitted (the loop's next step begins at once)."""
    return torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(4)])


def adam(params):
    return torch.optim.Adam(params, lr=1e-4)


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, WIDTH, generator=g)
    return torch.utils.data.TensorDataset(x, x.roll(1, dims=1)), None


def mse(outputs, targets):
    return torch.nn.functional.mse_loss(outputs, targets)


def step_killing_rank0_at(call: int, flag_path: str | None):
    """The MSE step; rank 0 SIGKILLs itself at the start of its ``call``-th training step while the flag exists."""
    import os
    import signal

    import torch.distributed as dist

    calls = {"n": 0}

    def train_step(model, batch):
        if model.training:
            if (flag_path is not None and calls["n"] == call and dist.get_rank() == 0
                    and os.path.exists(flag_path)):
                os.remove(flag_path)
                os.kill(os.getpid(), signal.SIGKILL)
            calls["n"] += 1
        inputs, targets = batch
        return {"loss": torch.nn.functional.mse_loss(model(inputs), targets), "batch_size": len(targets)}

    return train_step
