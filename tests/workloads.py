"""Small deterministic models and data for integration tests (imported by the workers too)."""

from __future__ import annotations

import torch
import torch.distributed as dist

N_FEATURES = 8
N_CLASSES = 3


def make_classification(n: int, seed: int) -> torch.utils.data.TensorDataset:
    x = torch.randn(n, N_FEATURES, generator=torch.Generator().manual_seed(seed))
    w = torch.randn(N_FEATURES, N_CLASSES, generator=torch.Generator().manual_seed(1234))  # one task for all splits
    y = (x @ w).argmax(dim=1)
    return torch.utils.data.TensorDataset(x, y)


def tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 16), torch.nn.ReLU(), torch.nn.Linear(16, N_CLASSES))


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def slow_sgd(params):
    return torch.optim.SGD(params, lr=0.02)


def frozen_sgd(params):
    return torch.optim.SGD(params, lr=0.0)


def odd_data():
    """203 training and 101 validation samples: odd counts exercise the no-duplicates rule."""
    return make_classification(203, seed=1), make_classification(101, seed=2)


def train_only_data():
    return make_classification(64, seed=3), None


cross_entropy = torch.nn.functional.cross_entropy

_calls = {"n": 0}


def nan_on_rank1_at_step(step: int):
    """A train step that returns a NaN loss on rank 1 at its ``step``-th call (0-based)."""

    def train_step(model, batch):
        inputs, targets = batch
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        call = _calls["n"]
        _calls["n"] += 1
        if dist.get_rank() == 1 and call == step:
            loss = loss * float("nan")
        return {"loss": loss, "batch_size": len(targets)}

    return train_step


def raise_on_rank1(model, batch):
    if dist.get_rank() == 1:
        raise ArithmeticError("boom from rank 1's train step")
    inputs, targets = batch
    return {"loss": torch.nn.functional.cross_entropy(model(inputs), targets)}


def dict_batches_data():
    base = make_classification(48, seed=4)
    return DictDataset(base), None


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return {"features": x, "label": y}


def dict_step(model, batch):
    outputs = model(batch["features"])
    loss = torch.nn.functional.cross_entropy(outputs, batch["label"])
    acc = (outputs.argmax(1) == batch["label"]).float().mean()
    return {"loss": loss, "acc": acc}


def many_batches_data():
    """250 steps at batch size 8 on 2 ranks: without a rate limit, one progress event a step."""
    return make_classification(4000, seed=5), None


def failing_step(fail_at_call: int, flag_path: str):
    """The default step, but rank 0 raises at its ``fail_at_call``-th training call (0-based; validation
    calls are not counted) while ``flag_path`` exists.

    The flag is removed before raising, so the next attempt (a new fit) runs through.
    """
    import os

    calls = {"n": 0}

    def train_step(model, batch):
        inputs, targets = batch
        outputs = model(inputs)
        if model.training:
            if dist.get_rank() == 0 and calls["n"] == fail_at_call and os.path.exists(flag_path):
                os.remove(flag_path)
                raise RuntimeError(f"injected failure at call {fail_at_call}")
            calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(outputs, targets)
        acc = (outputs.detach().argmax(1) == targets).float().mean()
        return {"loss": loss, "accuracy": acc, "batch_size": len(targets)}

    return train_step


def dropout_model() -> torch.nn.Module:
    """Uses the RNG every step, so an exact resume must restore per-rank RNG streams."""
    return torch.nn.Sequential(torch.nn.Linear(N_FEATURES, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                               torch.nn.Linear(16, N_CLASSES))


def adam(params):
    return torch.optim.Adam(params, lr=0.01)


def faulty_step(action: str, rank: int, at_call: int, flag_path: str | None, wait_for_workers: int = 0):
    """The default step, but ``rank`` does ``action`` at its ``at_call``-th training call.

    ``action`` is ``"raise"``, ``"sigkill"`` (the worker process kills itself) or ``"hang"`` (sleeps
    forever). With ``flag_path``, the fault happens only while that file exists (it is removed
    first, so the next attempt runs through); without it, on every attempt. With
    ``wait_for_workers``, the fault waits until that many TrainWorker actors are alive (workers
    plus warm standbys).
    """
    import os
    import signal
    import time

    calls = {"n": 0}

    def train_step(model, batch):
        inputs, targets = batch
        if model.training:
            armed = flag_path is None or os.path.exists(flag_path)
            if dist.get_rank() == rank and calls["n"] == at_call and armed:
                if flag_path is not None:
                    os.remove(flag_path)
                _wait_for_workers(wait_for_workers)
                if action == "raise":
                    raise RuntimeError(f"injected failure on rank {rank} at call {at_call}")
                if action == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if action == "hang":
                    while True:
                        time.sleep(1)
            calls["n"] += 1
        outputs = model(inputs)
        return {"loss": torch.nn.functional.cross_entropy(outputs, targets), "batch_size": len(targets)}

    return train_step


def handshake_then_sigkill(rank: int, pause_call: int, kill_call: int, folder: str):
    """The default step; ``rank``, on its first attempt only (while ``folder/armed`` exists): at its
    ``pause_call``-th training call writes ``folder/paused`` and waits for ``folder/go``; at its
    ``kill_call``-th writes ``folder/dying`` and SIGKILLs its own process."""
    import os
    import signal
    import time

    calls = {"n": 0}
    armed = os.path.join(folder, "armed")

    def train_step(model, batch):
        inputs, targets = batch
        if model.training and dist.get_rank() == rank and os.path.exists(armed):
            if calls["n"] == pause_call:
                open(os.path.join(folder, "paused"), "w").close()
                while not os.path.exists(os.path.join(folder, "go")):
                    time.sleep(0.02)
            if calls["n"] == kill_call:
                os.remove(armed)
                open(os.path.join(folder, "dying"), "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        if model.training:
            calls["n"] += 1
        outputs = model(inputs)
        return {"loss": torch.nn.functional.cross_entropy(outputs, targets), "batch_size": len(targets)}

    return train_step


def sigkill_every_rank(at_call: int, flag_dir: str):
    """The default step, but every rank SIGKILLs itself at its ``at_call``-th training call while its
    flag file ``flag_dir/rank-<r>`` exists (removed first, so the next attempt runs through)."""
    import os
    import signal

    calls = {"n": 0}

    def train_step(model, batch):
        inputs, targets = batch
        if model.training:
            flag = os.path.join(flag_dir, f"rank-{dist.get_rank()}")
            if calls["n"] == at_call and os.path.exists(flag):
                os.remove(flag)
                os.kill(os.getpid(), signal.SIGKILL)
            calls["n"] += 1
        outputs = model(inputs)
        return {"loss": torch.nn.functional.cross_entropy(outputs, targets), "batch_size": len(targets)}

    return train_step


def _wait_for_workers(n: int, timeout_s: float = 120.0) -> None:
    import time

    from ray._private import state

    deadline = time.monotonic() + timeout_s
    while n and time.monotonic() < deadline:
        alive = [a for a in state.actors().values() if a["ActorClassName"] == "TrainWorker" and a["State"] == "ALIVE"]
        if len(alive) >= n:
            return
        time.sleep(0.1)


def step_waiting_for_workers(n: int):
    """The default step; every rank's first training call waits (up to 120 s) until ``n`` TrainWorker
    actors are alive (workers plus warm standbys), so that a fit ends only after its standbys started,
    however the machine's load delays them."""
    waited = {"done": False}

    def train_step(model, batch):
        inputs, targets = batch
        if model.training and not waited["done"]:
            _wait_for_workers(n)
            waited["done"] = True
        return {"loss": torch.nn.functional.cross_entropy(model(inputs), targets), "batch_size": len(targets)}

    return train_step


def slow_step(seconds: float):
    """The default step plus a sleep, so a run lasts long enough for outside events."""
    import time

    def train_step(model, batch):
        inputs, targets = batch
        if model.training:
            time.sleep(seconds)
        return {"loss": torch.nn.functional.cross_entropy(model(inputs), targets), "batch_size": len(targets)}

    return train_step


def poisoned_data():
    """odd_data with one training sample holding a NaN feature: whichever batch carries it has a NaN loss."""
    train, val = odd_data()
    x, y = train.tensors
    x = x.clone()
    x[17, 3] = float("nan")
    return torch.utils.data.TensorDataset(x, y), val


def held_step(seconds: float, hold_file: str, held_seconds: float):
    """:func:`slow_step` whose steps take ``held_seconds`` while ``hold_file`` exists (the same math)."""
    import os
    import time

    def train_step(model, batch):
        inputs, targets = batch
        if model.training:
            time.sleep(held_seconds if os.path.exists(hold_file) else seconds)
        return {"loss": torch.nn.functional.cross_entropy(model(inputs), targets), "batch_size": len(targets)}

    return train_step


def drainable_trainer(storage: str, run_name: str, hold_file: str | None = None):
    """The run that tests/entries/drain_cluster.py drains twice, and its undisturbed reference.

    While ``hold_file`` exists, steps take 0.15 s, so that a drain the test sends always lands before
    training ends, however loaded the machine is; the scenario removes it once it has sent every
    disturbance, and from then on (and in the reference, which nothing disturbs) steps are not paced:
    the same math, without the sleeps.
    """
    from orchestrator import Trainer, callbacks

    step = slow_step(0.0) if hold_file is None else held_step(0.0, hold_file, 0.15)
    return Trainer(model=dropout_model, optimizer=adam, data=odd_data, train_step=step, batch_size=8,
                   num_workers=2, seed=0, storage=storage, run_name=run_name, max_failures=0,
                   callbacks=[callbacks.BackupAndRestore(save_freq=5, delete_checkpoint=False),
                              callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=0, min_delta=0.05)],
                   preemption_grace_s=60, placement_timeout_s=120)
