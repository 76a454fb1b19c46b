"""An entry point for `orchestrator run` that trains long enough to be preempted (tests only).

Storage comes from the ORCHESTRATOR_TEST_STORAGE environment variable set by the test. While the
file named by ORCHESTRATOR_TEST_SLOW_FILE exists, every step takes half a second, so that a stop
sent by the test lands mid-training however loaded the machine is.
"""

import os
import time

import torch

from orchestrator import Trainer, callbacks


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x.sum(dim=1) > 0).long()
    return torch.utils.data.TensorDataset(x, y), None


def slow_step(model, batch):
    slow = os.environ.get("ORCHESTRATOR_TEST_SLOW_FILE")
    time.sleep(0.5 if slow and os.path.exists(slow) else 0.02)
    inputs, targets = batch
    return {"loss": torch.nn.functional.cross_entropy(model(inputs), targets)}


def make_trainer():
    return Trainer(
        model=lambda: torch.nn.Linear(8, 2),
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05),
        data=data, train_step=slow_step, batch_size=8, num_workers=2, seed=0,
        storage=os.environ["ORCHESTRATOR_TEST_STORAGE"], run_name="preemptible",
        callbacks=[callbacks.BackupAndRestore(save_freq=10, delete_checkpoint=False)],
        preemption_grace_s=60,
    )
