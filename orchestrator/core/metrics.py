"""The one registry of built-in metrics, and exact cross-rank aggregation.

Built-in metrics: each name (and alias) maps to a :class:`Metric`, its function and the direction
in which it improves. The Trainer's validation, callbacks' ``mode="auto"``
(:func:`metric_directions`) and the per-rank loop (``orchestrator.loop.steps.resolve_metrics``)
all read :data:`BUILTIN_METRICS` through :func:`get_metric`; nothing else lists them.

Aggregation: every rank reports, per phase, the *sums* of ``value * samples`` and the number of
samples it saw. The aggregate is ``sum(sums) / sum(counts)``: a sample-weighted mean over the whole
cluster, never a mean of per-rank means.

No torch here: the metric functions use tensor methods only, and sums are Python floats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

MetricFn = Callable[[Any, Any], Any]
MODES = ("min", "max")
#: Direction of the loss, which every run logs.
LOSS_MODE = "min"


def accuracy(outputs: Any, targets: Any) -> Any:
    """Fraction of correct predictions: argmax over classes, or a 0.5 threshold for one output."""
    if outputs.ndim > 1 and outputs.shape[-1] > 1:
        predicted = outputs.argmax(dim=-1)
    else:
        predicted = (outputs.reshape(targets.shape) > 0.5).to(targets.dtype)
    return (predicted == targets).float().mean()


def mse(outputs: Any, targets: Any) -> Any:
    """Mean squared error between outputs (reshaped like targets) and targets."""
    return (outputs.reshape(targets.shape).float() - targets.float()).square().mean()


def mae(outputs: Any, targets: Any) -> Any:
    """Mean absolute error between outputs (reshaped like targets) and targets."""
    return (outputs.reshape(targets.shape).float() - targets.float()).abs().mean()


@dataclass(frozen=True)
class Metric:
    """A built-in metric.

    Args:
        name: The canonical name.
        fn: ``(outputs, targets) -> scalar tensor``, the batch mean.
        mode: ``"min"`` or ``"max"``: which way is better (callbacks' ``mode="auto"``).
        aliases: Other names that select it. Defaults to none.

    Example:
        >>> get_metric("acc").mode
        'max'
    """

    name: str
    fn: MetricFn
    mode: str
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Metric {self.name!r}: mode must be one of {MODES}, got {self.mode!r}")


#: Canonical name -> built-in metric.
BUILTIN_METRICS: Mapping[str, Metric] = MappingProxyType({m.name: m for m in (
    Metric("accuracy", accuracy, "max", aliases=("acc",)),
    Metric("mse", mse, "min", aliases=("mean_squared_error",)),
    Metric("mae", mae, "min", aliases=("mean_absolute_error",)),
)})
_BY_NAME: Mapping[str, Metric] = MappingProxyType(
    {name: m for m in BUILTIN_METRICS.values() for name in (m.name, *m.aliases)})
_BY_FN: Mapping[MetricFn, Metric] = MappingProxyType({m.fn: m for m in BUILTIN_METRICS.values()})


#: Names the logs (or the values formatted with them) already use, with what for: no metric may
#: be called so.
RESERVED_METRIC_NAMES: Mapping[str, str] = MappingProxyType({
    "loss": "the training loss, which every run logs",
    "learning_rate": "the learning rate each epoch ran with, which every run logs",
    "batch_size": "the number of samples in a batch (the key a train_step returns it under)",
    "epoch": "the 1-based epoch number that ModelCheckpoint formats file paths with, beside the logs",
    "batch": "the 1-based batch number that ModelCheckpoint formats file paths with, beside the logs",
})
#: Prefix of the validation values: a metric ``"x"`` is logged as ``"x"`` and ``"val_x"``.
VALIDATION_PREFIX = "val_"


def check_metric_name(name: str) -> str:
    """``name`` if a metric may be logged under it; ValueError if the logs already use it.

    Reserved are :data:`RESERVED_METRIC_NAMES` and every name starting with ``"val_"`` (the
    validation value of each metric is logged under ``"val_<name>"`` automatically).

    Args:
        name: The name the metric would be logged under.

    Raises:
        ValueError: Naming the metric, what the logs use the name for, and a name to use instead.

    Example:
        >>> check_metric_name("f1")
        'f1'
    """
    if name.startswith(VALIDATION_PREFIX):
        base = name[len(VALIDATION_PREFIX):] or "metric"
        raise ValueError(
            f"metrics: the name {name!r} is reserved: names starting with {VALIDATION_PREFIX!r} hold the "
            f"validation value of each metric, logged automatically (a metric {base!r} is logged as "
            f"{base!r} on training data and as {VALIDATION_PREFIX + base!r} on validation data); "
            f"name the metric {base!r} instead")
    if name in RESERVED_METRIC_NAMES:
        raise ValueError(
            f"metrics: the name {name!r} is reserved for {RESERVED_METRIC_NAMES[name]}; "
            f"log this metric under another name, e.g. metrics={{'my_{name}': fn}}")
    return name


def _known() -> str:
    return ", ".join(f"{m.name} (or {', '.join(m.aliases)})" if m.aliases else m.name
                     for m in BUILTIN_METRICS.values())


def get_metric(name: str) -> Metric:
    """The built-in metric called ``name`` (canonical name or alias).

    Raises:
        ValueError: ``name`` is not a built-in; the message lists the built-ins.

    Example:
        >>> get_metric("acc").name
        'accuracy'
    """
    metric = _BY_NAME.get(name) if isinstance(name, str) else None
    if metric is None:
        raise ValueError(f"unknown metric {name!r}; built-ins are {_known()}, or pass "
                         "{'name': fn(outputs, targets)} for your own")
    return metric


def normalise_metrics(metrics: str | Iterable[str] | Mapping[str, Any] | None) -> dict[str, str | MetricFn]:
    """Validate the ``metrics`` argument; return ``logged name -> canonical built-in name or fn``.

    A built-in is logged under the name the user gave (``["acc"]`` logs ``acc``).

    Raises:
        ValueError: Naming ``metrics`` (or the entry) and what to pass instead; also for a name
            the logs already use (see :func:`check_metric_name`).

    Example:
        >>> normalise_metrics(["acc", "mse"])
        {'acc': 'accuracy', 'mse': 'mse'}
    """
    if metrics is None:
        return {}
    if isinstance(metrics, str):
        metrics = [metrics]
    out: dict[str, str | MetricFn] = {}
    if isinstance(metrics, Mapping):
        for name, fn in metrics.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"metrics: every key must be a non-empty metric name, got {name!r}")
            check_metric_name(name)
            if isinstance(fn, str):
                try:
                    out[name] = get_metric(fn).name
                except ValueError as exc:
                    raise ValueError(f"metrics[{name!r}]: {exc}") from None
            elif callable(fn):
                out[name] = fn
            else:
                raise ValueError(f"metrics[{name!r}] must be a built-in name or fn(outputs, targets) -> "
                                 f"scalar tensor, got {fn!r}")
        return out
    if not isinstance(metrics, Iterable):
        raise ValueError(f"metrics must be a list of built-in names or a dict name -> fn, got {metrics!r}")
    for name in metrics:
        if isinstance(name, str):
            check_metric_name(name)
        try:
            out[name] = get_metric(name).name
        except ValueError as exc:
            raise ValueError(f"metrics: {exc}") from None
    return out


def _builtin_of(spec: Any) -> Metric | None:
    """The built-in a name, an alias or one of the registry's own functions selects, else None."""
    if isinstance(spec, str):
        return _BY_NAME.get(spec)
    try:
        return _BY_FN.get(spec)
    except TypeError:  # an unhashable callable object
        return None


def metric_directions(metrics: Iterable[str] | Mapping[str, Any]) -> dict[str, str]:
    """``"min"``/``"max"`` for ``loss`` and every metric whose direction is known.

    Args:
        metrics: Metric names (built-ins or aliases), or a mapping ``logged name -> built-in name
            or fn`` as :func:`normalise_metrics` returns. A custom function has no known direction
            and is left out (callbacks monitoring it need an explicit ``mode``).

    Example:
        >>> metric_directions({"acc": "accuracy", "f1": lambda o, t: o})
        {'loss': 'min', 'acc': 'max'}
    """
    out = {"loss": LOSS_MODE}
    items = metrics.items() if isinstance(metrics, Mapping) else ((name, name) for name in metrics)
    for name, spec in items:
        metric = _builtin_of(spec)
        if metric is not None:
            out[name] = metric.mode
    return out


@dataclass
class PhaseSums:
    """Sums of ``value * n`` per metric name and the sample count ``n`` for one phase on one rank.

    Args:
        totals: ``name -> sum of value * n``. Defaults to empty.
        count: Samples seen. Defaults to ``0``.
    """

    totals: dict[str, float] = field(default_factory=dict)
    count: int = 0


def aggregate(reports: Iterable[PhaseSums]) -> dict[str, float]:
    """Combine per-rank sums into cluster-wide sample-weighted means.

    Example:
        >>> aggregate([PhaseSums({"loss": 3.0}, 2), PhaseSums({"loss": 1.0}, 1)])
        {'loss': 1.3333333333333333}
    """
    totals: dict[str, float] = {}
    count = 0
    for r in reports:
        count += r.count
        for name, value in r.totals.items():
            totals[name] = totals.get(name, 0.0) + value
    if count == 0:
        return {}
    return {name: value / count for name, value in totals.items()}
