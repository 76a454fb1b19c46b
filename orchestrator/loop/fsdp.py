"""``strategy="fsdp"``: the model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

- **Wrapping** (:func:`shard_model`): the submodules that ``fsdp_wrap`` selects get their own
  ``fully_shard`` (children before their parents), then the root. Each such unit's parameters are
  all-gathered just before its forward (and backward) and freed after, so a rank holds at a time the
  full parameters of one unit, not of the model. The default (:func:`default_wrap`) selects
  ``torch.nn.TransformerEncoderLayer``/``TransformerDecoderLayer`` and submodules holding at least
  1/8 of the model's parameters and at least 1M of them.
- **Per-step signals** (:class:`ShardedSignals`): under DDP the signals ride the gradient
  all-reduce (:class:`~orchestrator.loop.signalled.SignalledModule`); FSDP reduce-scatters the
  gradients, so every rank holds only its shard of them. The signals (non-finite loss, loss sum,
  count, preemption notice, out of data) and this rank's "my gradient shard holds an inf/NaN" flag
  go into one small all-reduce per optimizer step, after the backward: every rank then reaches the
  same verdict, as under DDP.
- **Accumulation**: all but the last micro-batch of a step run with
  ``set_requires_gradient_sync(False)`` (FSDP2's ``no_sync``): the gradients are reduce-scattered
  once per step.
- **Precision**: ``"bf16-mixed"`` runs under ``torch.autocast``, as with DDP (FSDP2's
  ``MixedPrecisionPolicy`` is not used): parameters, gradients and their reduction stay float32 and
  the numerics match DDP's ``"bf16-mixed"``; the price is float32 all-gathers (twice the bytes of a
  bf16 ``param_dtype``).

Example:
    >>> model = shard_model(build_model(), wrap=None, device=torch.device("cpu"))  # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from orchestrator.loop.steps import nonfinite_flag

#: Submodule classes :func:`default_wrap` always shards on their own.
TRANSFORMER_LAYERS: tuple[type, ...] = (torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)
#: A submodule with at least this many parameters (and 1/8 of the model's) is its own unit by default.
LARGE_SUBMODULE = 1_000_000


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def default_wrap(root: torch.nn.Module) -> Callable[[torch.nn.Module], bool]:
    """The default ``fsdp_wrap`` for ``root``: transformer layers and large submodules.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> default_wrap(net)(net[0])
        False
    """
    threshold = max(LARGE_SUBMODULE, _numel(root) // 8)

    def wrap(module: torch.nn.Module) -> bool:
        return isinstance(module, TRANSFORMER_LAYERS) or _numel(module) >= threshold

    return wrap


def wrap_policy(wrap: Callable[[torch.nn.Module], bool] | tuple[type, ...] | None,
                root: torch.nn.Module) -> Callable[[torch.nn.Module], bool]:
    """``fsdp_wrap=`` as a predicate: a tuple of classes, a callable, or None (:func:`default_wrap`).

    Example:
        >>> wrap_policy((torch.nn.Linear,), torch.nn.Linear(2, 2))(torch.nn.Linear(1, 1))
        True
    """
    if wrap is None:
        return default_wrap(root)
    if isinstance(wrap, tuple):
        classes = wrap
        return lambda module: isinstance(module, classes)
    return lambda module: bool(wrap(module))


def shard_model(model: torch.nn.Module, wrap: Callable[[torch.nn.Module], bool] | tuple[type, ...] | None,
                device: torch.device) -> torch.nn.Module:
    """Shard ``model`` (in place, on ``device``) over the default process group; return it.

    The selected submodules (not the root) get their own ``fully_shard``, deepest first, then the
    root does. Parameter names (``state_dict`` keys) are unchanged.

    Args:
        model: The user's model, on ``device``.
        wrap: ``fsdp_wrap=`` (see :func:`wrap_policy`).
        device: The rank's device.
    """
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    selects = wrap_policy(wrap, model)
    chosen = [m for name, m in model.named_modules() if name and selects(m)]
    for module in reversed(chosen):  # named_modules is pre-order: reversed, children come first
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (a DTensor's local shard; any other tensor as it is)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class ShardedSignals:
    """The per-step signals of ``strategy="fsdp"``: accumulated per micro-batch, all-reduced once per step.

    Args:
        model: The sharded model (an ``FSDPModule``).
        device: Where the signals live (the rank's device).

    Example:
        >>> signals = ShardedSignals(model, torch.device("cpu"))  # doctest: +SKIP
        >>> signals.term(torch.ones(5))  # None: nothing is added to the loss  # doctest: +SKIP
        >>> signals.collect(params)  # [sums over ranks..., gradient flag]  # doctest: +SKIP
    """

    dtype = torch.float32

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        if not isinstance(model, FSDPModule):
            raise TypeError("ShardedSignals needs a model sharded with fully_shard")
        self.model = model
        self.device = device
        self._sums = torch.zeros(5, dtype=self.dtype, device=device)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """A micro-batch whose gradients are only accumulated (no reduce-scatter)."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def term(self, values: torch.Tensor) -> None:
        """Add the step's signal values, summed over its micro-batches (nothing is added to the loss)."""
        self._sums.add_(values.to(self.dtype))

    def collect(self, params: list[torch.Tensor]) -> list[float]:
        """``[sums of the signals over ranks..., ranks whose gradient shard is non-finite]``: one all-reduce
        (each rank checks its own shards of ``params``' gradients)."""
        bad_grads = nonfinite_flag([None if p.grad is None else local(p.grad) for p in params], self.device)
        values = torch.cat([self._sums, bad_grads.to(self.dtype).reshape(1)])
        dist.all_reduce(values)
        self._sums.zero_()
        return values.tolist()


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state on CPU, on rank 0 (every rank must call it: it all-gathers);
    other ranks get ``{}``. Each parameter is gathered and offloaded one at a time, so rank 0 holds one
    full copy (the result) plus one parameter in flight.

    Example:
        >>> state = full_model_state(model)  # doctest: +SKIP
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state (keyed by parameter name) on CPU, on rank 0; collective, like
    :func:`full_model_state`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
