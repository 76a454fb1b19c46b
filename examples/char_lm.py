"""Char LM: a small character-level GRU language model on seeded synthetic text, 2 workers.

The text is generated in code from a tiny fixed grammar ("the small cat sees a red ball."), so the
example needs no download and every worker builds the same corpus. The model reads windows of
``context`` characters and predicts the next character at every position; a custom ``train_step``
returns the sequence cross-entropy, a per-character ``accuracy`` and the ``batch_size``.

Run it on a local Ray instance with local storage (about a minute on 2 CPU cores):

    python examples/char_lm.py

through the CLI (``--set`` values go to ``make_trainer``):

    orchestrator run examples/char_lm.py --storage /tmp/runs --epochs 10 --set hidden=96

or on a cluster: ``ray job submit --working-dir . -- python examples/char_lm.py``.
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
ADVERBS = ["today", "again", "slowly", "at night", "by the river", "every day"]


def make_text(lines: int = 600, seed: int = 0) -> str:
    """``lines`` sentences from a small grammar, the same for a given seed on every machine."""
    rng = random.Random(seed)

    def noun_phrase() -> str:
        words = [rng.choice(DETERMINERS)]
        if rng.random() < 0.6:
            words.append(rng.choice(ADJECTIVES))
        words.append(rng.choice(NOUNS))
        return " ".join(words)

    out = []
    for _ in range(lines):
        sentence = f"{noun_phrase()} {rng.choice(VERBS)} {noun_phrase()}"
        if rng.random() < 0.3:
            sentence += " " + rng.choice(ADVERBS)
        out.append(sentence + ".")
    return "\n".join(out) + "\n"


def encode(text: str) -> torch.Tensor:
    return torch.tensor([CHAR_TO_ID[c] for c in text], dtype=torch.long)


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


class CharWindows(torch.utils.data.Dataset):
    """Map-style: item ``i`` is ``(ids[s : s + context], ids[s + 1 : s + context + 1])``, ``s = i * stride``."""

    def __init__(self, ids: torch.Tensor, context: int, stride: int) -> None:
        if len(ids) <= context:
            raise ValueError(f"text of {len(ids)} characters is too short for context={context}")
        self.ids, self.context, self.stride = ids, context, stride

    def __len__(self) -> int:
        return (len(self.ids) - self.context - 1) // self.stride + 1

    def __getitem__(self, i: int):
        start = i * self.stride
        chunk = self.ids[start:start + self.context + 1]
        return chunk[:-1], chunk[1:]


def load_data(lines: int = 600, context: int = 48, seed: int = 0):
    """(train, validation): the first 90% of the text and the last 10%, as overlapping windows."""
    ids = encode(make_text(lines, seed))
    split = int(0.9 * len(ids))
    return (CharWindows(ids[:split], context, stride=context // 2),
            CharWindows(ids[split:], context, stride=context))


class CharGRU(torch.nn.Module):
    """Embedding -> one GRU layer -> linear head over the vocabulary."""

    def __init__(self, vocab_size: int = len(VOCAB), embed: int = 24, hidden: int = 64) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, embed)
        self.gru = torch.nn.GRU(embed, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, vocab) logits
        out, _ = self.gru(self.embed(ids))
        return self.head(out)


def lm_step(model: torch.nn.Module, batch) -> dict:
    """Cross-entropy over every position of every window, plus next-character accuracy."""
    inputs, targets = batch
    logits = model(inputs)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    with torch.no_grad():
        accuracy = (logits.argmax(dim=-1) == targets).float().mean()
    return {"loss": loss, "accuracy": accuracy, "batch_size": inputs.shape[0]}


@torch.no_grad()
def sample(model: torch.nn.Module, prompt: str = "the ", length: int = 120) -> str:
    """Greedy continuation of ``prompt`` (the most likely next character, one at a time)."""
    model.eval()
    ids = encode(prompt).unsqueeze(0)
    for _ in range(length):
        next_id = model(ids)[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return decode(ids[0])


def make_trainer(num_workers: int = 2, lines: int = 600, context: int = 48, hidden: int = 64,
                 lr: float = 0.01, batch_size: int = 32, backup_every: int = 20,
                 run_name: str = "char-lm") -> Trainer:
    return Trainer(
        model=functools.partial(CharGRU, hidden=hidden),
        optimizer=functools.partial(torch.optim.Adam, lr=lr),
        train_step=lm_step,
        data=functools.partial(load_data, lines=lines, context=context),
        batch_size=batch_size,
        num_workers=num_workers,
        run_name=run_name,
        clip_grad_norm=1.0,
        callbacks=[
            callbacks.ModelCheckpoint("best.pt", monitor="val_loss", save_best_only=True,
                                      save_weights_only=True),
            callbacks.EarlyStopping(monitor="val_loss", patience=3, min_delta=0.002,
                                    restore_best_weights=True),
            callbacks.BackupAndRestore(save_freq=backup_every),
            callbacks.TerminateOnNaN(),
        ],
        seed=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--storage", default=None, help="fsspec URL of the run storage")
    parser.add_argument("--lines", type=int, default=600, help="sentences of synthetic text")
    parser.add_argument("--hidden", type=int, default=64, help="GRU hidden size")
    args = parser.parse_args()
    trainer = make_trainer(args.num_workers, lines=args.lines, hidden=args.hidden)
    if args.storage:
        trainer = trainer.replace(storage=args.storage)
    history = trainer.fit(epochs=args.epochs)
    best = min(history.history["val_loss"])
    print(f"epochs run: {len(history.epoch)}; best val_loss: {best:.4f} "
          f"(uniform guess: {math.log(len(VOCAB)):.4f}); "
          f"final val_accuracy: {history.history['val_accuracy'][-1]:.4f}")
    print("greedy sample:\n" + sample(history.model))


if __name__ == "__main__":
    main()
