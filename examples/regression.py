"""Regression: an MLP on seeded synthetic data, y = f(x) + noise, 2 workers, mae/mse metrics.

    f(x) = sin(2 x0) + 0.5 x1^2 - x2 x3 + 0.3 x4,   x ~ N(0, 1)^5,   noise ~ N(0, 0.1^2)

The best possible validation MAE is that of the noise alone, about 0.08. ReduceLROnPlateau halves
the learning rate when ``val_loss`` stalls; EarlyStopping watches ``val_mae`` and puts the best
weights back at the end.

Run it on a local Ray instance with local storage:

    python examples/regression.py

through the CLI (``--set`` values go to ``make_trainer``):

    orchestrator run examples/regression.py --storage /tmp/runs --epochs 20 --set samples=8000

or on a cluster: ``ray job submit --working-dir . -- python examples/regression.py``.
"""

from __future__ import annotations

import argparse
import functools

import torch

from orchestrator import Trainer, callbacks

N_FEATURES = 5
NOISE = 0.1


def target_fn(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1] ** 2 - x[:, 2] * x[:, 3] + 0.3 * x[:, 4]


def load_data(samples: int = 4000, seed: int = 0):
    """(train, validation) TensorDatasets, 80/20; targets have shape (n, 1) like the model's output."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, N_FEATURES, generator=gen)
    y = target_fn(x) + NOISE * torch.randn(samples, generator=gen)
    y = y.unsqueeze(1)
    split = int(0.8 * samples)
    return (torch.utils.data.TensorDataset(x[:split], y[:split]),
            torch.utils.data.TensorDataset(x[split:], y[split:]))


def build_model(hidden: int = 64) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 1),
    )


def make_trainer(num_workers: int = 2, samples: int = 4000, hidden: int = 64, lr: float = 0.003,
                 batch_size: int = 32, run_name: str = "regression") -> Trainer:
    return Trainer(
        model=functools.partial(build_model, hidden=hidden),
        optimizer=functools.partial(torch.optim.Adam, lr=lr),
        loss=torch.nn.functional.mse_loss,
        data=functools.partial(load_data, samples=samples),
        metrics=["mae", "mse"],
        batch_size=batch_size,
        num_workers=num_workers,
        run_name=run_name,
        callbacks=[
            callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=1e-5),
            callbacks.EarlyStopping(monitor="val_mae", patience=5, restore_best_weights=True),
            callbacks.TerminateOnNaN(),
        ],
        seed=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--storage", default=None, help="fsspec URL of the run storage")
    parser.add_argument("--samples", type=int, default=4000, help="synthetic samples (80% train)")
    args = parser.parse_args()
    trainer = make_trainer(args.num_workers, samples=args.samples)
    if args.storage:
        trainer = trainer.replace(storage=args.storage)
    history = trainer.fit(epochs=args.epochs)
    val_mae = history.history["val_mae"]
    print(f"epochs run: {len(history.epoch)}; val_mae: first {val_mae[0]:.4f}, best {min(val_mae):.4f} "
          f"(noise alone: {NOISE * (2 / torch.pi) ** 0.5:.4f}); "
          f"final learning_rate: {history.history['learning_rate'][-1]:g}")
    x, y = load_data(samples=args.samples)[1][:5]
    with torch.no_grad():
        predictions = history.model(x).squeeze(1)
    print("validation samples (target -> prediction):",
          ", ".join(f"{t:.2f} -> {p:.2f}" for t, p in zip(y.squeeze(1).tolist(), predictions.tolist())))


if __name__ == "__main__":
    main()
