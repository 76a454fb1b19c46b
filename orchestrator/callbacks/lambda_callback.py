"""Build a simple callback from plain functions (Keras 3 ``LambdaCallback``)."""

from __future__ import annotations

from typing import Any, Callable

from orchestrator.callbacks.base import Callback
from orchestrator.decisions import DECISION_TYPES, Decision

#: Every hook the framework calls; a LambdaCallback may set any of them.
HOOK_NAMES = tuple(sorted(n for n in vars(Callback) if n.startswith("on_") and callable(getattr(Callback, n))))
#: Hooks that take an index (epoch or batch) before ``logs``.
_INDEXED = ("on_epoch_", "on_train_batch_", "on_batch_")
_BATCH_HOOKS = ("on_train_batch_begin", "on_train_batch_end", "on_batch_begin", "on_batch_end")


def _decisions_only(value: Any) -> Decision | list[Decision] | None:
    """Keep Decisions from a function's return value; anything else (e.g. print's None) is ignored."""
    if isinstance(value, DECISION_TYPES):
        return value
    if isinstance(value, (list, tuple)):
        kept = [v for v in value if isinstance(v, DECISION_TYPES)]
        return kept or None
    return None


def _as_hook(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if name.startswith(_INDEXED):
        def indexed_hook(index: int, logs: dict | None = None) -> Any:
            return _decisions_only(fn(index, logs))
        indexed_hook.__name__ = name
        return indexed_hook

    def hook(logs: dict | None = None) -> Any:
        return _decisions_only(fn(logs))
    hook.__name__ = name
    return hook


class LambdaCallback(Callback):
    """Callback for creating simple, custom callbacks on the fly.

    The functions are called positionally: ``on_epoch_begin``/``on_epoch_end`` with
    ``(epoch, logs)``, ``on_train_begin``/``on_train_end`` with ``(logs)``, and the batch
    functions with ``(batch, logs)``. They run once for the whole cluster on the coordinator,
    with aggregated logs. A function may return a :class:`~orchestrator.decisions.Decision` (or a
    list of them), which is passed on; any other return value is ignored.

    Batch functions cost one coordinator round trip per step: when any is given,
    ``batch_sync_every`` is set to ``1`` on the instance. Set it higher after construction to
    call them every N steps only (a non-finite loss still triggers a call at its step).

    Args:
        on_epoch_begin: Called at the beginning of every epoch. Defaults to ``None``.
        on_epoch_end: Called at the end of every epoch. Defaults to ``None``.
        on_train_begin: Called at the beginning of training. Defaults to ``None``.
        on_train_end: Called at the end of training. Defaults to ``None``.
        on_train_batch_begin: Called at the beginning of a training batch. Defaults to ``None``.
        on_train_batch_end: Called at the end of a training batch. Defaults to ``None``.
        **kwargs: Any other hook of :class:`Callback` (e.g. ``on_test_begin``,
            ``on_test_end``, ``on_batch_begin``, ``on_batch_end``) by name.

    Raises:
        ValueError: If a name is not a hook the framework calls, or a value is not callable.

    Example:
        >>> from orchestrator.decisions import StopTraining
        >>> stop_at_90 = LambdaCallback(
        ...     on_epoch_end=lambda epoch, logs: StopTraining("target", "lambda")
        ...     if logs.get("val_accuracy", 0) >= 0.9 else None)
        >>> stop_at_90.on_epoch_end(3, {"val_accuracy": 0.95})
        StopTraining(reason='target', source='lambda')
    """

    def __init__(self, on_epoch_begin: Callable[..., Any] | None = None,
                 on_epoch_end: Callable[..., Any] | None = None,
                 on_train_begin: Callable[..., Any] | None = None,
                 on_train_end: Callable[..., Any] | None = None,
                 on_train_batch_begin: Callable[..., Any] | None = None,
                 on_train_batch_end: Callable[..., Any] | None = None,
                 **kwargs: Callable[..., Any]) -> None:
        super().__init__()
        functions = {
            "on_epoch_begin": on_epoch_begin, "on_epoch_end": on_epoch_end,
            "on_train_begin": on_train_begin, "on_train_end": on_train_end,
            "on_train_batch_begin": on_train_batch_begin, "on_train_batch_end": on_train_batch_end,
        }
        for name, fn in kwargs.items():
            if name not in HOOK_NAMES:
                raise ValueError(
                    f"LambdaCallback: {name!r} is not a callback hook this trainer calls; "
                    f"valid names are {', '.join(HOOK_NAMES)}"
                )
            functions[name] = fn
        for name, fn in functions.items():
            if fn is None:
                continue
            if not callable(fn):
                raise ValueError(f"LambdaCallback: {name} must be callable, got {fn!r}")
            setattr(self, name, _as_hook(name, fn))
            if name in _BATCH_HOOKS:
                self.batch_sync_every = 1
