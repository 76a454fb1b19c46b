"""Default train/validation steps; metric names resolved through the registry in core/metrics.

A step function takes ``(model, batch)`` and returns a :class:`StepOutput`-like dict:
``{"loss": scalar tensor, "<metric>": scalar tensor (batch mean), ..., "batch_size": int}``.
``batch_size`` is optional; when missing it is taken from the first tensor found in the batch.
The loss of a train step must carry gradients; the framework calls ``backward``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping  # isinstance with typing's aliases costs 3x
from typing import Any

import torch

from orchestrator.core.metrics import get_metric

MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_metrics(metrics: Mapping[str, Any]) -> dict[str, MetricFn]:
    """Map logged metric names to functions; a string selects a built-in of :mod:`orchestrator.core.metrics`.

    Example:
        >>> resolve_metrics({"acc": "accuracy"})["acc"].__name__
        'accuracy'
    """
    return {name: get_metric(fn).fn if isinstance(fn, str) else fn for name, fn in metrics.items()}


def infer_batch_size(batch: Any) -> int:
    """Length of the first tensor in a batch (tensor, sequence or mapping)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        for value in batch.values():
            try:
                return infer_batch_size(value)
            except ValueError:
                continue
    if isinstance(batch, (list, tuple)):
        for value in batch:
            try:
                return infer_batch_size(value)
            except ValueError:
                continue
    raise ValueError("cannot infer the batch size: return 'batch_size' from your step function")


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def make_default_step(loss_fn: Callable[..., torch.Tensor], metric_fns: Mapping[str, MetricFn]):
    """The step for ``(inputs, targets)`` batches: forward, loss, metrics."""

    def step(model: torch.nn.Module, batch: Any) -> dict[str, Any]:
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise ValueError(
                "the default step expects (inputs, targets) batches; pass train_step=fn(model, batch) "
                "returning {'loss': ..., 'batch_size': ...} for other batch shapes"
            )
        inputs, targets = batch
        outputs = model(inputs)
        out: dict[str, Any] = {"loss": loss_fn(outputs, targets)}
        with torch.no_grad():
            for name, fn in metric_fns.items():
                out[name] = fn(outputs.detach(), targets)
        out["batch_size"] = infer_batch_size(targets)
        return out

    return step


def split_output(out: Any, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(loss, metric tensors, batch size) from a step's return value."""
    if isinstance(out, torch.Tensor):
        out = {"loss": out}
    if not isinstance(out, Mapping) or "loss" not in out:
        raise ValueError(f"a step function must return a dict with a 'loss' tensor, got {type(out).__name__}")
    out = dict(out)
    loss = out.pop("loss")
    n = out.pop("batch_size", None)
    n = infer_batch_size(batch) if n is None else int(n)
    metrics = {k: (v if isinstance(v, torch.Tensor) else torch.tensor(float(v))) for k, v in out.items()}
    return loss, metrics, n


_EXACT_IN_FLOAT32 = (torch.float32, torch.bfloat16, torch.float16)


def as_number(value: torch.Tensor) -> float:
    """A one-element CPU tensor's value as a Python float, rounded to float32 (as an accelerator's
    metric sums round it: ``.float()`` first); one ``item()`` for the float dtypes a step returns.

    Example:
        >>> as_number(torch.tensor(0.1, dtype=torch.float64)) == torch.tensor(0.1).item() != 0.1
        True
    """
    return value.item() if value.dtype in _EXACT_IN_FLOAT32 else value.detach().float().item()


def nonfinite_flag(tensors: Iterable[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """A 0-dim tensor on ``device``: ``True`` when any element of ``tensors`` is NaN or infinite.

    ``None`` entries (parameters without a gradient) and empty tensors are ignored.
    On an accelerator (no device sync): one fused max-abs norm (``torch._foreach_norm`` with
    ``ord=inf``, which propagates NaN) per device and dtype, then one ``isfinite``. On CPU that norm
    is a slow element-wise loop (about 20 times the cost of a vectorised pass), so each tensor is
    summed instead, a vectorised pass half as costly as its ``aminmax``: a NaN or infinite element
    makes its tensor's sum NaN or infinite, so when every sum is finite so is every element. A sum
    that is not finite (a bad element, or finite values whose sum overflows) is decided exactly by
    each tensor's ``aminmax`` (both propagate NaN; a tensor is finite exactly when its minimum and
    maximum are).

    Example:
        >>> nonfinite_flag([torch.ones(3), torch.tensor([1.0, float("nan")])], torch.device("cpu"))
        tensor(True)
        >>> nonfinite_flag([torch.full((2,), 3e38), None], torch.device("cpu"))
        tensor(False)
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        if t is None:
            continue
        if t.is_sparse:
            t = t.coalesce().values()
        if t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t)
    flags = []
    for group in groups.values():
        if group[0].device.type != "cpu":
            flags.append(torch.stack(torch._foreach_norm(group, math.inf)).isfinite().all().logical_not().to(device))
        elif _cpu_nonfinite(group):
            return torch.ones((), dtype=torch.bool, device=device)
    if not flags:
        return torch.zeros((), dtype=torch.bool, device=device)
    return flags[0] if len(flags) == 1 else torch.stack(flags).any()


def _cpu_nonfinite(group: list[torch.Tensor]) -> bool:
    """Whether an element of ``group`` (CPU tensors of one dtype) is NaN or infinite."""
    parts = contiguous_spans(group)
    return nonfinite_sums(torch.stack([t.sum() for t in parts]).tolist(), parts)


def nonfinite_sums(sums: list[float], parts: list[torch.Tensor]) -> bool:
    """Whether an element of ``parts`` (CPU tensors) is NaN or infinite, given each one's sum.

    The common case costs nothing more: when every sum is finite so is every element. A sum that is
    not (a bad element, or finite values whose sum overflows) is decided exactly by each tensor's
    ``aminmax`` (see :func:`nonfinite_flag`).

    Example:
        >>> parts = [torch.full((2,), 3e38)]
        >>> nonfinite_sums([t.sum().item() for t in parts], parts)  # the sum overflows, no element is bad
        False
    """
    if all(map(math.isfinite, sums)):
        return False
    return not bool(torch.stack([torch.stack(torch.aminmax(t)) for t in parts]).isfinite().all())


def contiguous_spans(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The elements of ``tensors`` (dense, non-empty) as few tensors: contiguous tensors that lie end to
    end in one storage (as DDP's gradients do with ``gradient_as_bucket_view``: views into its all-reduce
    buckets) become one 1-D view of that span; any other tensor is kept as it is. Every element of
    ``tensors`` is in a result, and nothing else is (tensors that overlap are read once each), so a
    pass (a sum) over each result reads every element: two sums instead of six for
    benchmarks/workload.py's MLP.

    Example:
        >>> flat = torch.arange(6.0)
        >>> [tuple(t.shape) for t in contiguous_spans([flat[3:], flat[:3], torch.ones(2)])]
        [(6,), (2,)]
    """
    loose: list[torch.Tensor] = []
    stored: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        if t.is_contiguous():
            stored.setdefault((t.untyped_storage().data_ptr(), t.dtype), []).append(t)
        else:
            loose.append(t)
    for group in stored.values():
        if len(group) == 1:
            loose.append(group[0])
            continue
        group.sort(key=torch.Tensor.storage_offset)
        first = group[0]
        begin = first.storage_offset()
        end = begin + first.numel()
        for t in group[1:]:
            offset = t.storage_offset()
            if offset != end:  # a gap, or an overlap: the span ends here
                loose.append(_span(first, begin, end))
                first, begin = t, offset
            end = offset + t.numel()
        loose.append(_span(first, begin, end))
    return loose


def _span(base: torch.Tensor, begin: int, end: int) -> torch.Tensor:
    return base if base.storage_offset() == begin and base.numel() == end - begin and base.dim() == 1 \
        else base.as_strided((end - begin,), (1,), begin)
