"""Transformer LM: a tiny decoder-only transformer on a streamed character corpus, 2 workers.

What a GPU job looks like, small enough for 2 CPU cores: ``precision="bf16-mixed"`` (CPU autocast),
``accumulate_grad_batches=2``, a linear warm-up then cosine learning-rate schedule stepped every
optimizer step, and training text that arrives as an unbounded ``IterableDataset`` (bounded per
epoch by ``steps_per_epoch``), with a BackupAndRestore and a ModelCheckpoint.

The text is generated in code from a tiny fixed grammar ("the small cat sees a red ball."): sample
``i`` of data pass ``p`` is a window drawn from its own seeded RNG, so the stream is the same on every
machine and needs no download. It knows nothing of ranks (the framework keeps every N-th sample for
rank r of N) and is stateful (``state_dict``/``load_state_dict``), so a resumed run continues the
stream where the backup left it. The model is ``torch.nn.TransformerEncoder`` with a causal mask.

Run it on a local Ray instance with local storage (2 epochs train in about 10 s on 2 CPU cores):

    python examples/transformer_lm.py

through the CLI (``--set`` values go to ``make_trainer``; the cosine spans ``cosine_epochs``):

    orchestrator run examples/transformer_lm.py --storage /tmp/runs --epochs 4 --set cosine_epochs=4

or on a cluster: ``ray job submit --working-dir . -- python examples/transformer_lm.py``.
"""

from __future__ import annotations

import argparse
import functools
import math
import random

import torch

from orchestrator import Trainer, callbacks

# Every character the grammar can produce; index 0 is the space.
VOCAB = " .\nabcdefghijklmnopqrstuvwxyz"
CHAR_TO_ID = {c: i for i, c in enumerate(VOCAB)}

DETERMINERS = ["the", "a", "my", "one", "that"]
ADJECTIVES = ["small", "red", "quiet", "old", "happy", "green", "brave", "lazy"]
NOUNS = ["cat", "dog", "bird", "fox", "child", "farmer", "horse", "ball", "tree", "river"]
VERBS = ["sees", "likes", "finds", "chases", "hears", "follows", "watches", "helps"]


def sentence(rng: random.Random) -> str:
    def noun_phrase() -> str:
        words = [rng.choice(DETERMINERS)]
        if rng.random() < 0.6:
            words.append(rng.choice(ADJECTIVES))
        return " ".join(words + [rng.choice(NOUNS)])

    return f"{noun_phrase()} {rng.choice(VERBS)} {noun_phrase()}.\n"


def encode(text: str) -> torch.Tensor:
    return torch.tensor([CHAR_TO_ID[c] for c in text], dtype=torch.long)


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


def window(seed: int, data_pass: int, index: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``index`` of pass ``data_pass``: ``context`` characters and the next character of each."""
    rng = random.Random((seed * 1_000_003 + data_pass) * 1_000_003 + index)
    offset = rng.randrange(24)  # start anywhere in the first sentence
    text = ""
    while len(text) < offset + context + 1:
        text += sentence(rng)
    ids = encode(text[offset:offset + context + 1])
    return ids[:-1], ids[1:]


class CharStream(torch.utils.data.IterableDataset):
    """A stream of ``(inputs, targets)`` windows: unbounded (``samples=None``) or ``samples`` long.

    Plain (not rank-aware): every rank iterates the whole stream and keeps its part. Stateful: its
    state is the pass and the samples yielded, so a resume continues without re-reading.
    """

    def __init__(self, context: int = 32, seed: int = 0, samples: int | None = None) -> None:
        self.context, self.seed, self.samples = context, seed, samples
        self.data_pass, self.i = 0, 0

    def set_epoch(self, data_pass: int) -> None:  # called when a data pass starts
        self.data_pass, self.i = data_pass, 0

    def __iter__(self):
        while self.samples is None or self.i < self.samples:
            self.i += 1
            yield window(self.seed, self.data_pass, self.i - 1, self.context)

    def state_dict(self) -> dict:
        return {"pass": self.data_pass, "i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.data_pass, self.i = state["pass"], state["i"]


def load_data(context: int = 32, val_samples: int = 128):
    """(train, validation): an unbounded training stream and a finite held-out one (another seed)."""
    return CharStream(context, seed=0), CharStream(context, seed=1, samples=val_samples)


class TinyTransformerLM(torch.nn.Module):
    """Token + position embeddings -> causal pre-norm TransformerEncoder -> LayerNorm -> vocabulary head."""

    def __init__(self, vocab_size: int = len(VOCAB), context: int = 32, d_model: int = 64, heads: int = 4,
                 layers: int = 2) -> None:
        super().__init__()
        self.context = context
        self.embed = torch.nn.Embedding(vocab_size, d_model)
        self.position = torch.nn.Embedding(context, d_model)
        layer = torch.nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=0.0,
                                                 batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, vocab) logits, T <= context
        steps = ids.shape[1]
        x = self.embed(ids) + self.position(torch.arange(steps, device=ids.device))
        mask = torch.nn.Transformer.generate_square_subsequent_mask(steps, device=ids.device)
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


def lm_step(model: torch.nn.Module, batch) -> dict:
    """Cross-entropy (in float32, also under bf16 autocast) over every position, plus accuracy."""
    inputs, targets = batch
    logits = model(inputs).float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    with torch.no_grad():
        accuracy = (logits.argmax(dim=-1) == targets).float().mean()
    return {"loss": loss, "accuracy": accuracy, "batch_size": inputs.shape[0]}


def lr_factor(step: int, warmup_steps: int, total_steps: int, floor: float = 0.1) -> float:
    """The multiple of the base rate at optimizer step ``step``: linear warm-up, then cosine down to ``floor``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))


@torch.no_grad()
def sample(model: torch.nn.Module, prompt: str = "the ", length: int = 80) -> str:
    """Greedy continuation of ``prompt`` (the model sees the last ``context`` characters)."""
    model.eval()
    ids = encode(prompt).unsqueeze(0)
    for _ in range(length):
        next_id = model(ids[:, -model.context:])[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return decode(ids[0])


def make_trainer(num_workers: int = 2, context: int = 32, d_model: int = 64, layers: int = 2,
                 lr: float = 3e-3, batch_size: int = 16, steps_per_epoch: int = 16, warmup_steps: int = 8,
                 cosine_epochs: int = 2, backup_every: int = 8, run_name: str = "transformer-lm") -> Trainer:
    return Trainer(
        model=functools.partial(TinyTransformerLM, context=context, d_model=d_model, layers=layers),
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.01),
        train_step=lm_step,
        data=functools.partial(load_data, context=context),
        batch_size=batch_size,                  # per worker and micro-batch
        accumulate_grad_batches=2,              # an optimizer step = 2 micro-batches
        precision="bf16-mixed",
        lr_scheduler=functools.partial(warmup_cosine, warmup_steps=warmup_steps,
                                       total_steps=cosine_epochs * steps_per_epoch),
        lr_scheduler_interval="step",
        steps_per_epoch=steps_per_epoch,        # bounds the unbounded stream
        num_workers=num_workers,
        run_name=run_name,
        clip_grad_norm=1.0,
        callbacks=[
            callbacks.ModelCheckpoint("best.pt", monitor="val_loss", save_best_only=True,
                                      save_weights_only=True),
            callbacks.BackupAndRestore(save_freq=backup_every),
            callbacks.TerminateOnNaN(),
        ],
        seed=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--storage", default=None, help="fsspec URL of the run storage")
    args = parser.parse_args()
    trainer = make_trainer(args.num_workers, cosine_epochs=args.epochs)
    if args.storage:
        trainer = trainer.replace(storage=args.storage)
    history = trainer.fit(epochs=args.epochs)
    rates = ", ".join(f"{rate:.2e}" for rate in history.history["learning_rate"])
    print(f"epochs run: {len(history.epoch)}; val_loss: {history.history['val_loss'][-1]:.4f} "
          f"(uniform guess: {math.log(len(VOCAB)):.4f}); "
          f"val_accuracy: {history.history['val_accuracy'][-1]:.4f}; epoch-start learning rates: {rates}")
    print("greedy sample:\n" + sample(history.model))


if __name__ == "__main__":
    main()
