"""Digits: an MLP on scikit-learn's bundled 8x8 digits, 2 workers, cluster-wide callbacks.

Run it on a local Ray instance with local storage:

    python examples/digits.py

or on a cluster: ``ray job submit --working-dir . -- python examples/digits.py``.
"""

from __future__ import annotations

import argparse

import torch

from orchestrator import Trainer, callbacks


def build_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )


def load_data():
    """(train, validation) TensorDatasets: 80/20 split of sklearn's digits, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    split = int(0.8 * len(x))
    return (torch.utils.data.TensorDataset(x[:split], y[:split]),
            torch.utils.data.TensorDataset(x[split:], y[split:]))


def make_trainer(num_workers: int = 2) -> Trainer:
    return Trainer(
        model=build_model,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        loss=torch.nn.functional.cross_entropy,
        data=load_data,
        metrics=["accuracy"],
        batch_size=32,
        num_workers=num_workers,
        run_name="digits",
        callbacks=[
            callbacks.EarlyStopping(monitor="val_loss", patience=4, restore_best_weights=True),
            callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2),
            callbacks.TerminateOnNaN(),
        ],
        seed=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    history = make_trainer(args.num_workers).fit(epochs=args.epochs)
    best = max(history.history["val_accuracy"])
    print(f"epochs run: {len(history.epoch)}; best val_accuracy: {best:.4f}; "
          f"final learning_rate: {history.history['learning_rate'][-1]:g}")


if __name__ == "__main__":
    main()
