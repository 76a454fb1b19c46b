"""The examples train through `orchestrator run` with small settings (on the session's Ray cluster)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from orchestrator import cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def epoch_logs(run_dir: Path) -> list[dict]:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e["logs"] for e in events if e["type"] == "epoch_end"]


def event_types(run_dir: Path) -> set[str]:
    return {json.loads(line)["type"] for line in (run_dir / "events.jsonl").read_text().splitlines()}


def test_char_lm_text_is_deterministic_and_windows_predict_the_next_character():
    char_lm = load_example("char_lm")
    assert char_lm.make_text(50, seed=1) == char_lm.make_text(50, seed=1)
    assert set(char_lm.make_text(50)) <= set(char_lm.VOCAB)
    train, val = char_lm.load_data(lines=50, context=16)
    x, y = train[3]
    assert x.shape == y.shape == (16,)
    assert torch.equal(x[1:], y[:-1])
    assert len(val) > 0


@pytest.mark.timeout(180)
def test_char_lm_trains_below_the_uniform_loss_and_saves_a_loadable_best_checkpoint(ray_cluster, tmp_path):
    argv = ["run", str(EXAMPLES / "char_lm.py"), "--storage", str(tmp_path), "--epochs", "2",
            "--set", "lines=240", "--set", "backup_every=3"]
    assert cli.main(argv) == cli.EXIT_FINISHED
    run_dir = tmp_path / "char-lm"
    logs = epoch_logs(run_dir)
    char_lm = load_example("char_lm")
    assert len(logs) == 2
    assert logs[-1]["val_loss"] < math.log(len(char_lm.VOCAB)) - 0.5
    assert logs[-1]["val_loss"] < logs[0]["val_loss"]
    assert 0.0 <= logs[-1]["val_accuracy"] <= 1.0
    assert {"backup_committed", "checkpoint_saved", "finished"} <= event_types(run_dir)
    model = char_lm.CharGRU()
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True))
    text = char_lm.sample(model, "the ", length=20)
    assert len(text) == 24 and set(text) <= set(char_lm.VOCAB)


@pytest.mark.timeout(180)
def test_regression_val_mae_decreases_and_the_learning_rate_is_logged(ray_cluster, tmp_path):
    argv = ["run", str(EXAMPLES / "regression.py"), "--storage", str(tmp_path), "--epochs", "3",
            "--set", "samples=1200", "--run-name", "reg-smoke"]
    assert cli.main(argv) == cli.EXIT_FINISHED
    logs = epoch_logs(tmp_path / "reg-smoke")
    assert len(logs) == 3
    val_mae = [entry["val_mae"] for entry in logs]
    assert val_mae[-1] < val_mae[0]
    assert all(set(entry) >= {"mae", "mse", "val_mse", "learning_rate"} for entry in logs)
    assert logs[-1]["val_mse"] == pytest.approx(logs[-1]["val_loss"])


@pytest.mark.timeout(180)
def test_transformer_lm_bf16_accumulated_warmup_cosine_stream_learns_and_checkpoints(ray_cluster, tmp_path):
    # half the example's steps per epoch (bf16 autocast is slow on CPU), the schedule scaled to match
    argv = ["run", str(EXAMPLES / "transformer_lm.py"), "--storage", str(tmp_path), "--epochs", "3",
            "--set", "cosine_epochs=3", "--set", "steps_per_epoch=8", "--set", "warmup_steps=4"]
    assert cli.main(argv) == cli.EXIT_FINISHED
    run_dir = tmp_path / "transformer-lm"
    tlm = load_example("transformer_lm")
    logs = epoch_logs(run_dir)
    assert len(logs) == 3
    uniform = math.log(len(tlm.VOCAB))
    assert logs[-1]["val_loss"] < uniform - 1.0
    assert logs[-1]["loss"] < logs[0]["loss"]
    # Each epoch starts at the schedule's rate after 8 *optimizer* steps per epoch (2 micro-batches
    # each): stepped per micro-batch or per epoch, the rates would differ. Warm-up, then cosine down.
    rates = [entry["learning_rate"] for entry in logs]
    expected = [3e-3 * tlm.lr_factor(8 * epoch, warmup_steps=4, total_steps=24) for epoch in range(3)]
    assert rates == pytest.approx(expected, rel=1e-6)
    assert rates[0] < rates[1] and rates[2] < rates[1]
    assert {"backup_committed", "checkpoint_saved", "finished"} <= event_types(run_dir)
    # The best checkpoint is the trained weights: loaded into a fresh model, it scores the best val_loss
    # on the same held-out stream (validation counts each of its 128 samples once across the 2 ranks).
    model = tlm.TinyTransformerLM()
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True))
    model.eval()
    inputs, targets = (torch.stack(t) for t in zip(*tlm.CharStream(seed=1, samples=128)))
    with torch.no_grad():
        val_loss = float(tlm.lm_step(model, (inputs, targets))["loss"])
    assert val_loss == pytest.approx(min(entry["val_loss"] for entry in logs), abs=0.01)
    text = tlm.sample(model, "the ", length=40)
    assert len(text) == 44 and set(text) <= set(tlm.VOCAB)
