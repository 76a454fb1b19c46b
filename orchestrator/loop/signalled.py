"""The loop's process-level pieces: the signalled model, joining the process group, seeding."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from orchestrator.loop.steps import contiguous_spans, nonfinite_flag, nonfinite_sums


class SignalledModule(torch.nn.Module):
    """The user's model plus a small parameter whose gradient carries per-step signals.

    The loop's ``backward`` starts from the loss and from the dot product of ``signal`` and ``values``; the
    gradient of ``signal`` is then exactly ``values``, and DDP all-reduces it in the same buckets as the
    model's gradients. The model's own gradients are unchanged (``signal`` stays zero; it is
    not given to the optimizer and not saved).
    """

    SIZE = 5  # [non-finite loss, loss * n, n, preemption notice, out of data]

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        self.signal = torch.nn.Parameter(torch.zeros(self.SIZE, device=device))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


class DdpSignals:
    """The per-step signals of ``strategy="ddp"``: they ride the gradient all-reduce as the gradient of
    a :class:`SignalledModule`'s ``signal`` (see :class:`~orchestrator.loop.optim_step.OptimStep`).

    Args:
        ddp: The DDP-wrapped :class:`SignalledModule`.
        signal: Its signal parameter.
        world_size: Number of ranks (DDP averages: the sums are the average times this).

    Example:
        >>> signals = DdpSignals(ddp, signalled.signal, world_size=2)  # doctest: +SKIP
    """

    def __init__(self, ddp: torch.nn.Module, signal: torch.nn.Parameter, world_size: int) -> None:
        self.ddp, self.signal, self.world_size = ddp, signal, world_size
        self.dtype, self.device = signal.dtype, signal.device

    SIZE = SignalledModule.SIZE

    def no_sync(self) -> Any:
        """A micro-batch whose gradients are only accumulated (no all-reduce)."""
        return self.ddp.no_sync()

    def term(self, values: torch.Tensor) -> torch.Tensor:
        """The step's second backward root (on its last micro-batch): its gradient w.r.t. ``signal`` is
        ``values``, the step's signals summed over its micro-batches."""
        return torch.dot(self.signal, values)

    def collect(self, params: list[torch.Tensor]) -> list[float]:
        """``[sums of the signals over ranks..., gradient flag]``: the all-reduced signal gradient, and
        whether an element of ``params``' gradients (all-reduced: the same on every rank) is non-finite.

        On CPU the gradients are summed as few spans (:func:`~orchestrator.loop.steps.contiguous_spans`:
        DDP's bucket views) and read with the signals in one ``tolist``; elsewhere (or with a sparse
        gradient) :func:`~orchestrator.loop.steps.nonfinite_flag` decides, without a device sync.
        """
        signal = self.signal.grad * self.world_size
        self.signal.grad = None
        grads = [g for g in (p.grad for p in params) if g is not None and g.numel()]
        if self.device.type == "cpu" and not any(g.is_sparse or g.device.type != "cpu" for g in grads):
            parts = contiguous_spans(grads)
            if not parts:
                return signal.tolist() + [0.0]
            values = torch.cat([signal, torch.stack([t.sum() for t in parts])]).tolist()
            return values[:self.SIZE] + [float(nonfinite_sums(values[self.SIZE:], parts))]
        return torch.cat([signal, nonfinite_flag(grads, self.device).to(self.dtype).reshape(1)]).tolist()


def init_process_group(backend: str, master_addr: str, master_port: int, rank: int, world_size: int,
                       timeout_s: float = 1800.0) -> None:
    """Join the torch.distributed group over TCP."""
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
