"""Command line: ``orchestrator run FILE`` (the ``ray job submit`` entry point).

``FILE`` is a Python file that defines ``trainer`` (an :class:`orchestrator.Trainer`) or
``make_trainer()`` returning one; ``run`` calls ``fit`` on it.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

import ray

from orchestrator.api import Trainer
from orchestrator.errors import Preempted
from orchestrator.storage import run_status


def load_trainer(path: str) -> Trainer:
    """Import ``path`` as a module and return its ``trainer`` or ``make_trainer()``."""
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"orchestrator run: {path} is not a file")
    spec = importlib.util.spec_from_file_location("orchestrator_user_entry", file)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    ray.cloudpickle.register_pickle_by_value(module)  # workers need not import the file
    spec.loader.exec_module(module)
    if hasattr(module, "make_trainer"):
        trainer = module.make_trainer()
    elif hasattr(module, "trainer"):
        trainer = module.trainer
    else:
        raise SystemExit(f"orchestrator run: {path} defines neither `trainer` nor `make_trainer()`")
    if not isinstance(trainer, Trainer):
        raise SystemExit(f"orchestrator run: {path}: expected an orchestrator.Trainer, got {type(trainer).__name__}")
    return trainer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="load FILE and call trainer.fit(epochs=...)")
    run.add_argument("file")
    run.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    trainer = load_trainer(args.file)
    storage = trainer.storage.open()
    if run_status(storage) == "finished":  # safe for RayJob retries and resubmissions
        print(f"run {storage.url()} already finished; nothing to do")
        return 0
    try:
        history = trainer.fit(epochs=args.epochs)
    except Preempted as exc:
        print(f"preempted: {exc}", file=sys.stderr, flush=True)
        return Preempted.exit_code
    last = {k: v[-1] for k, v in history.history.items() if v}
    print("finished:", ", ".join(f"{k}={v:.4g}" for k, v in last.items()))
    return 0
