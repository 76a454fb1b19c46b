"""Drive batch hooks the way the trainer and coordinator do: only at sync points."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from callback_helpers import make_list
from orchestrator.callbacks import Callback, CallbackList
from orchestrator.decisions import Decision, SaveModel


def every(n: int, per: str = "global") -> Callable[[int, int, int], bool]:
    """A sync rule: every ``n`` steps counted across epochs (``"global"``) or within each epoch."""
    def rule(epoch: int, step: int, steps: int) -> bool:
        index = epoch * steps + step if per == "global" else step
        return (index + 1) % n == 0
    return rule


def at(points: Iterable[tuple[int, int]]) -> Callable[[int, int, int], bool]:
    """A sync rule that fires at the given ``(epoch, step)`` pairs only (e.g. non-finite losses)."""
    wanted = set(points)
    return lambda epoch, step, steps: (epoch, step) in wanted


def fit_batches(callbacks: Iterable[Callback] | CallbackList, epochs: int, steps: int,
                sync: Callable[[int, int, int], bool], epoch_logs: Callable[[int], Mapping[str, float]] | None = None,
                batch_logs: Callable[[int, int], Mapping[str, float]] | None = None,
                start_epoch: int = 0, **kwargs: Any) -> list[tuple[int, int | None, Decision]]:
    """Run epochs of ``steps`` batches, calling ``on_train_batch_end`` where ``sync`` says.

    Returns ``(epoch, step, decision)`` for every decision; ``step`` is ``None`` at epoch end.
    """
    cl = callbacks if isinstance(callbacks, CallbackList) else make_list(callbacks, epochs=epochs, steps=steps,
                                                                            **kwargs)
    out: list[tuple[int, int | None, Decision]] = []
    if start_epoch == 0:
        cl.call("on_train_begin", {})
    for epoch in range(start_epoch, epochs):
        cl.view.epoch = epoch
        cl.call("on_epoch_begin", epoch, {})
        for step in range(steps):
            if sync(epoch, step, steps):
                cl.view.step = step
                logs = dict(batch_logs(epoch, step)) if batch_logs else {"loss": 1.0}
                out += [(epoch, step, d) for d in cl.call("on_train_batch_end", step, logs)]
        logs = dict(epoch_logs(epoch)) if epoch_logs else {"loss": 1.0}
        out += [(epoch, None, d) for d in cl.call("on_epoch_end", epoch, logs)]
    return out


def saved_paths(decisions: Iterable[Any]) -> list[str]:
    """File paths of the SaveModel decisions, in order (accepts fit_batches tuples too)."""
    items = [d[-1] if isinstance(d, tuple) else d for d in decisions]
    return [d.filepath for d in items if isinstance(d, SaveModel)]
